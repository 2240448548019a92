//! Checkout in a browser, the framework-free part shared by both binaries: who the caller is (the
//! `session` cookie `/login` sets, or `Authorization: Bearer`), the pages, and the simulated
//! provider outage. Each framework module adds only its handlers.
//!
//! The form's hidden `_idem` field holds a token the server minted for the caller (see
//! `idempotent_core::issued`): a double click, a reload, Back and submit again all find the first
//! submit's outcome (the same 303), an edited stale form is a 422 page, and a failed submit can be
//! submitted again. The token is not CSRF protection: the session cookie is `SameSite=Lax`, which
//! keeps other sites from posting the form with it.

use idempotent_axum::core::issued::IssuedToken;
use idempotent_axum::core::problem::Problem;
use serde::Deserialize;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The scope of `POST /checkout`.
pub const SCOPE: &str = "checkout.create";
/// The form field that carries the token.
pub const TOKEN_FIELD: &str = "_idem";
/// The name of the session cookie.
pub const COOKIE: &str = "session";

/// The checkout form as submitted.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct CheckoutForm {
    /// Minor units.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// Customer reference.
    pub customer: String,
}

impl From<CheckoutForm> for crate::domain::CreatePayment {
    fn from(form: CheckoutForm) -> Self {
        Self { amount: form.amount, currency: form.currency, customer: form.customer, description: None }
    }
}

/// The account a checkout request is made as: exactly one `Authorization: Bearer <account>`, or
/// else the `session` cookie (the same account syntax).
pub fn caller<'a>(
    authorization: impl IntoIterator<Item = &'a [u8]>,
    cookies: impl IntoIterator<Item = &'a [u8]>,
) -> Option<String> {
    let authorization: Vec<&[u8]> = authorization.into_iter().collect();
    if !authorization.is_empty() {
        return crate::api::Caller::from_authorization(authorization).map(|c| c.0);
    }
    let session = cookies
        .into_iter()
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix("session="))?;
    account(session)
}

/// `account` when it is 1 to 64 letters, digits, `_` or `-` (what a bearer account may be).
pub fn account(account: &str) -> Option<String> {
    let valid = !account.is_empty()
        && account.len() <= 64
        && account.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    valid.then(|| account.to_owned())
}

/// The `Set-Cookie` value of `GET /login?account=ACCT`.
pub fn session_cookie(account: &str) -> String {
    format!("{COOKIE}={account}; Path=/; HttpOnly; SameSite=Lax")
}

/// The account `GET /login` was asked for: the `account` query parameter.
pub fn login_account(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| pair.strip_prefix("account=")).and_then(account)
}

/// HTML-escapes `text`.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title></head>\n<body>\n<h1>{}</h1>\n{body}\n</body></html>\n",
        esc(title),
        esc(title)
    )
}

/// `GET /checkout`: the form, with a fresh token in its hidden field.
pub fn form_page(account: &str, token: &IssuedToken) -> String {
    page(
        "Checkout",
        &format!(
            "<p>Paying as <b id=\"account\">{}</b>.</p>\n\
             <form method=\"post\" action=\"/checkout\">\n\
             <input type=\"hidden\" name=\"{TOKEN_FIELD}\" value=\"{}\">\n\
             <label>Amount <input name=\"amount\" id=\"amount\" type=\"number\" value=\"1000\"></label>\n\
             <label>Currency <input name=\"currency\" id=\"currency\" value=\"EUR\"></label>\n\
             <label>Customer <input name=\"customer\" id=\"customer\" value=\"cus_1\"></label>\n\
             <button type=\"submit\" id=\"pay\">Pay</button>\n\
             </form>\n<p>This form can be submitted until {}.</p>",
            esc(account),
            esc(&token.token),
            humantime::format_rfc3339_seconds(token.expires_at)
        ),
    )
}

/// `GET /checkout/receipt/{id}`: the payment.
pub fn receipt_page(payment: &serde_json::Value) -> String {
    let field = |name: &str| esc(&payment[name].as_str().map_or_else(|| payment[name].to_string(), str::to_owned));
    page(
        "Payment received",
        &format!(
            "<p>Payment <code id=\"payment\">{}</code>: {} {} for {}.</p>\n<p><a href=\"/checkout\">New payment</a></p>",
            field("id"),
            field("amount"),
            field("currency"),
            field("customer")
        ),
    )
}

/// The page of an error of the checkout (the framework's problems of the route, and the
/// handler's own): what happened, and a link to a fresh form.
pub fn error_page(status: u16, title: &str, detail: &str) -> String {
    page(
        title,
        &format!(
            "<p id=\"problem\" data-status=\"{status}\">{}</p>\n<p><a id=\"fresh\" href=\"/checkout\">Start a new checkout</a></p>",
            esc(detail)
        ),
    )
}

/// The runtime's page for the problems of `POST /checkout` answered to a browser.
pub fn problem_page(problem: &Problem) -> String {
    error_page(problem.status, problem.title, &problem.detail)
}

/// What a checkout submit answers, for a framework to send: a status, its `Location` (303 to
/// the receipt) and an HTML body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `Location`, for the 303.
    pub location: Option<String>,
    /// HTML.
    pub body: String,
}

/// `POST /checkout` once the form is read: the payment, created once per token by `bank` as
/// `account` (303 to its receipt), a 422 page for a form the domain refuses (a final outcome,
/// replayed), or a 500 page (released: the same form can be submitted again) while `outage` lasts
/// or when the ledger cannot be written.
pub fn submit(bank: &crate::domain::Bank, outage: &Outage, account: &str, form: CheckoutForm) -> Answer {
    let failed = |status: u16, title: &str, detail: &str| Answer {
        status,
        location: None,
        body: error_page(status, title, detail),
    };
    if outage.fails() {
        return failed(
            500,
            "Payment failed",
            "The payment provider did not answer; nothing was charged. Submit the form again.",
        );
    }
    match crate::api::done(bank.create_payment(account, form.into())) {
        Ok(payment) => {
            Answer { status: 303, location: Some(format!("/checkout/receipt/{}", payment.id)), body: String::new() }
        }
        Err(crate::api::ApiError::Invalid(e)) => failed(422, "Payment refused", &e.0),
        Err(e) => failed(e.status(), "Payment failed", &format!("{e}. Submit the form again.")),
    }
}

/// The simulated outage of the payment provider: the first `n` checkout submits fail with 500
/// before anything is created (`PAYMENTS_CHECKOUT_FAILURES`, default 0), so that the retry of a
/// failed submit can be tried.
#[derive(Debug, Default)]
pub struct Outage(AtomicUsize);

impl Outage {
    /// An outage of `n` failures.
    pub fn new(n: usize) -> Self {
        Self(AtomicUsize::new(n))
    }

    /// Whether this submit fails (and counts one failure off).
    pub fn fails(&self) -> bool {
        self.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caller_is_the_bearer_else_the_session_cookie() {
        let bearer: &[u8] = b"Bearer acct_1";
        let cookie: &[u8] = b"theme=dark; session=acct_2";
        assert_eq!(caller([bearer], [cookie]).as_deref(), Some("acct_1"));
        assert_eq!(caller([], [cookie]).as_deref(), Some("acct_2"));
        assert_eq!(caller([], [b"session=a b".as_slice()]), None);
        assert_eq!(caller([b"Basic x".as_slice()], [cookie]), None, "a bad Authorization is not overridden");
        assert_eq!(caller([], []), None);
    }

    #[test]
    fn login_takes_a_valid_account() {
        assert_eq!(login_account("account=acct_1").as_deref(), Some("acct_1"));
        assert_eq!(login_account("x=1&account=b"), Some("b".into()));
        assert_eq!(login_account("account=<script>"), None);
        assert_eq!(login_account(""), None);
    }

    #[test]
    fn an_outage_fails_n_times() {
        let outage = Outage::new(2);
        assert_eq!([outage.fails(), outage.fails(), outage.fails()], [true, true, false]);
    }
}
