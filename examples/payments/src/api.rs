//! The framework-free part of the demo's HTTP glue, shared by both binaries: who the caller is,
//! and the bodies of the errors the demo itself answers with. Each framework module only turns
//! these into its own request extractor and response type.

use crate::domain::{Invalid, RefundRefused};
use serde_json::json;

/// Media type of every demo error.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Largest request body accepted; larger bodies are 413 before any handler runs.
pub const MAX_BODY: usize = 64 * 1024;

/// Bound on each idempotency store operation. The demo's shortest leases are 3 s (transfers, and
/// quotes, whose records live only 3 s), and a lease must be at least six times this bound, so
/// that one failed or slow renewal is followed by another while the lease still runs.
pub const STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// The authenticated caller: `Authorization: Bearer <account>`.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

impl Caller {
    /// The caller named by the request's `Authorization` header values: exactly one, `Bearer
    /// <account>` where account is 1 to 64 letters, digits, `_` or `-`. `None` is a 401
    /// ([`DemoProblem::unauthorized`]); so is a header sent twice, which a gateway that appends
    /// identity headers rather than replacing them would otherwise let the client pick from.
    pub fn from_authorization<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Option<Caller> {
        let mut values = values.into_iter();
        let (value, None) = (values.next(), values.next()) else { return None };
        let account = value
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|a| {
                !a.is_empty() && a.len() <= 64 && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })?;
        Some(Caller(account.to_owned()))
    }
}

/// An `application/problem+json` error of the demo (as opposed to the framework's own
/// problems), ready to be sent by either framework.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoProblem {
    /// HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: String,
    /// Whether to send `WWW-Authenticate: Bearer` (401 only).
    pub www_authenticate: bool,
    /// The `Allow` header to send (405 only), when the framework does not set it.
    pub allow: Option<String>,
}

impl DemoProblem {
    /// A problem of type `urn:payments-demo:problem:<type_slug>`.
    pub fn new(status: u16, type_slug: &str, title: &str, detail: impl Into<String>) -> Self {
        let body = json!({
            "type": format!("urn:payments-demo:problem:{type_slug}"),
            "title": title,
            "status": status,
            "detail": detail.into(),
        });
        Self { status, body: body.to_string(), www_authenticate: false, allow: None }
    }

    /// 501: deposits on a store without SQL transactions.
    pub fn deposits_unsupported() -> Self {
        Self::new(
            501,
            "deposits-unsupported",
            "Deposits need a SQL store",
            "Deposits live in the idempotency store's database: run the demo on PostgreSQL, MySQL or SQLite.",
        )
    }

    /// 401: no or a malformed `Authorization` header.
    pub fn unauthorized() -> Self {
        let mut p = Self::new(
            401,
            "unauthorized",
            "Authentication required",
            "Send `Authorization: Bearer <account>` where account is 1 to 64 letters, digits, `_` or `-`.",
        );
        p.www_authenticate = true;
        p
    }

    /// 404: no such payment for this caller.
    pub fn payment_not_found(id: &str) -> Self {
        Self::new(404, "not-found", "Payment not found", format!("No payment `{id}` for this account."))
    }

    /// 404: no route has this path.
    pub fn no_route(path: &str) -> Self {
        Self::new(404, "no-route", "No such route", format!("Nothing is served at `{path}`; see /openapi.json."))
    }

    /// 405: the path's routes take other methods; `allow` lists them, for a framework that does
    /// not send `Allow` itself.
    pub fn method_not_allowed(method: &str, path: &str, allow: Option<String>) -> Self {
        let detail = format!("`{path}` does not take {method}; `Allow` lists the methods it takes.");
        let mut p = Self::new(405, "method-not-allowed", "Method not allowed", detail);
        p.allow = allow;
        p
    }

    /// The answer to a request no route takes: 405 with the methods the demo serves at `path`
    /// (from its document), or 404 when it serves nothing there.
    pub fn unrouted(method: &str, path: &str) -> Self {
        let methods = crate::openapi::methods_at(path);
        if methods.is_empty() {
            Self::no_route(path)
        } else {
            Self::method_not_allowed(method, path, Some(methods.join(", ")))
        }
    }

    /// 401: a webhook delivery that does not verify (see [`crate::webhooks`]); nothing was claimed.
    pub fn webhook_refused(why: &crate::webhooks::Refused) -> Self {
        Self::new(
            401,
            "webhook-signature",
            "Webhook delivery refused",
            format!("{why}: sign the delivery per the Standard Webhooks specification with the shared secret. Nothing was executed or stored."),
        )
    }

    /// 400 / 413 / 415 / 422: the request body was rejected before the handler ran (type
    /// [`BAD_BODY`]).
    pub fn bad_body(status: u16, detail: impl Into<String>) -> Self {
        Self::new(status, "bad-body", "Request body rejected", detail)
    }
}

/// What a webhook delivery's middleware needs: its one value of header `name`, if it was sent once.
pub fn single_header<'a, I: IntoIterator<Item = &'a [u8]>>(values: I) -> Option<&'a str> {
    let mut values = values.into_iter();
    let (Some(value), None) = (values.next(), values.next()) else { return None };
    std::str::from_utf8(value).ok()
}

/// The `type` of a request body rejected before its handler ran.
pub const BAD_BODY: &str = "urn:payments-demo:problem:bad-body";

/// Errors a handler answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Domain validation: 422, a final outcome (stored and replayed).
    #[error("invalid request: {0}")]
    Invalid(Invalid),
    /// The caller has no payment with this id: 404, a final outcome (stored and replayed).
    #[error("payment not found: {0}")]
    PaymentNotFound(String),
    /// A refund of more than what is left of the payment: 422 `refund-exceeds-payment`, a final
    /// outcome (stored and replayed).
    #[error("refund refused: {0}")]
    RefundExceeds(String),
    /// The operation could not be recorded: 500, released so a retry runs again.
    #[error("internal error: {0}")]
    Internal(String),
    /// The claim's lease could no longer be vouched for when the operation was about to be
    /// recorded, so it was not: 503, released, and the client's retry runs it once.
    #[error("lease lost: {0}")]
    LeaseLost(#[from] idempotent_axum::core::engine::LeaseLost),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::Invalid(_) | ApiError::RefundExceeds(_) => 422,
            ApiError::PaymentNotFound(_) => 404,
            ApiError::Internal(_) => 500,
            ApiError::LeaseLost(_) => 503,
        }
    }

    /// The problem sent for this error; internal errors are logged here.
    pub fn problem(&self) -> DemoProblem {
        match self {
            ApiError::Invalid(e) => DemoProblem::new(422, "validation", "Invalid request", e.0.clone()),
            ApiError::PaymentNotFound(id) => DemoProblem::payment_not_found(id),
            ApiError::LeaseLost(e) => {
                tracing::warn!(error = %e, "operation not recorded: its claim could no longer be vouched for");
                DemoProblem::new(
                    503,
                    "lease-lost",
                    "Operation not executed",
                    "The server lost touch with its idempotency store while processing; nothing was executed. Retry with the same key.",
                )
            }
            ApiError::RefundExceeds(detail) => {
                DemoProblem::new(422, "refund-exceeds-payment", "Refund exceeds the payment", detail.clone())
            }
            ApiError::Internal(e) => {
                tracing::error!(error = %e, "operation failed");
                DemoProblem::new(
                    500,
                    "internal",
                    "Internal error",
                    "The operation was not executed; retry with the same key.",
                )
            }
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::Invalid(e)
    }
}

impl From<RefundRefused> for ApiError {
    fn from(e: RefundRefused) -> Self {
        match e {
            RefundRefused::UnknownPayment(id) => ApiError::PaymentNotFound(id),
            RefundRefused::Invalid(e) => ApiError::Invalid(e),
            RefundRefused::Exceeds(detail) => ApiError::RefundExceeds(detail),
        }
    }
}

/// Flattens a domain call's result: an outer error is internal, an inner one is the domain's
/// refusal (validation, unknown payment), a final outcome.
pub fn done<T, E: Into<ApiError>>(r: Result<Result<T, E>, String>) -> Result<T, ApiError> {
    r.map_err(ApiError::Internal)?.map_err(Into::into)
}

/// The demo's idempotency settings, the same on both frameworks: callers are known by their
/// bearer token, every store operation is bounded by [`STORE_TIMEOUT`], deposits (which need
/// SQL) answer 501 on memory and Redis rather than stop the demo, and callers and keys are
/// digested under `IDEMPOTENCY_DIGEST_SECRET` when it is set.
pub fn idempotency_settings<A: idempotent_axum::core::engine::Adapter>(
    builder: idempotent_axum::core::engine::Builder<A>,
    config: &crate::config::Config,
) -> idempotent_axum::core::engine::Builder<A> {
    let builder = builder
        .actor(idempotent_axum::ActorSource::BearerToken)
        // A body that is not JSON, or JSON of another shape, is a problem+json of the demo's
        // like every other error, not the framework's plain text.
        .rejections_as_problems(BAD_BODY)
        .store_timeout(STORE_TIMEOUT)
        .without_transactions(idempotent_axum::core::engine::WithoutTransactions::NotImplemented)
        // The checkout form's tokens, and its problems as pages for the browser.
        .token_secret(&config.token_secret)
        .problem_page(crate::checkout::problem_page);
    match &config.digest_secret {
        Some(secret) => builder.digest_secret(secret),
        None => builder,
    }
}
