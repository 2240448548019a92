//! The payments domain, free of any web framework.

use crate::ledger::{Entry, Ledger};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::SystemTime;
use utoipa::ToSchema;

/// The largest amount of an operation, in minor units: 10^12, ten billion in a currency of two
/// decimals. Amounts up to it are exact as JSON numbers read as doubles, and a balance of them
/// overflows no 64-bit integer before millions of operations.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// Reads an amount from any JSON number equal to an integer: `1000`, `1000.0` and `1e3` are one
/// amount, as they are one `integer` to JSON Schema and one number in the request's fingerprint.
/// A fraction, or a number beyond 64 bits, is an error (the request is refused with 422).
pub fn amount<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    struct Amount;
    impl serde::de::Visitor<'_> for Amount {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an integer number of minor units")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i64, E> {
            // -2^63 and 2^63 are exact doubles; every integral double strictly between fits.
            const LIMIT: f64 = 9_223_372_036_854_775_808.0;
            if v.fract() == 0.0 && (-LIMIT..LIMIT).contains(&v) {
                Ok(v as i64)
            } else {
                Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    deserializer.deserialize_any(Amount)
}

/// Whether `amount` is one an operation can have: 422 otherwise.
pub fn check_amount(amount: i64) -> Result<(), Invalid> {
    if (1..=MAX_AMOUNT).contains(&amount) {
        Ok(())
    } else {
        Err(Invalid(format!("amount must be an integer from 1 to {MAX_AMOUNT}, got {amount}")))
    }
}

/// `POST /payments` body.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CreatePayment {
    /// Minor units, from 1 to [`MAX_AMOUNT`].
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    #[serde(deserialize_with = "amount")]
    pub amount: i64,
    /// ISO 4217 code: three uppercase letters.
    #[schema(pattern = "^[A-Z]{3}$", min_length = 3, max_length = 3)]
    pub currency: String,
    /// Customer reference.
    pub customer: String,
    /// Free text; not part of the fingerprint.
    #[serde(default)]
    pub description: Option<String>,
}

/// A created payment.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct Payment {
    /// `pay_...`.
    pub id: String,
    /// Minor units.
    pub amount: i64,
    /// Currency code.
    pub currency: String,
    /// Customer reference.
    pub customer: String,
    /// Free text.
    pub description: Option<String>,
    /// RFC 3339 timestamp.
    pub created_at: String,
}

/// `POST /transfers` body.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CreateTransfer {
    /// Minor units, from 1 to [`MAX_AMOUNT`].
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    #[serde(deserialize_with = "amount")]
    pub amount: i64,
    /// Source account.
    pub from: String,
    /// Destination account.
    pub to: String,
}

/// A created transfer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct Transfer {
    /// `tr_...`.
    pub id: String,
    /// Minor units.
    pub amount: i64,
    /// Source account.
    pub from: String,
    /// Destination account.
    pub to: String,
    /// RFC 3339 timestamp.
    pub created_at: String,
}

/// `POST /webhooks/provider` body: a provider's event.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ProviderEvent {
    /// The event's type, e.g. `charge.succeeded`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What the event is about.
    pub data: ProviderEventData,
}

/// The charge a provider's event is about.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ProviderEventData {
    /// The provider's charge id.
    pub charge: String,
    /// Minor units.
    pub amount: i64,
}

/// `POST /notifications` body.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct SendNotification {
    /// Whom to notify (not blank).
    #[schema(min_length = 1, pattern = "\\S")]
    pub to: String,
    /// What to say (not empty).
    #[schema(min_length = 1)]
    pub text: String,
}

/// A sent notification.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct Notification {
    /// `nt_...`.
    pub id: String,
    /// Whom it was sent to.
    pub to: String,
    /// What it said.
    pub text: String,
    /// RFC 3339 timestamp.
    pub created_at: String,
}

/// `POST /payments/{id}/refunds` body.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CreateRefund {
    /// Minor units, from 1 to [`MAX_AMOUNT`], and at most the payment's unrefunded amount.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    #[serde(deserialize_with = "amount")]
    pub amount: i64,
    /// Free text; not part of the fingerprint.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A created refund.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, ToSchema)]
pub struct Refund {
    /// `re_...`.
    pub id: String,
    /// The refunded payment's id.
    pub payment: String,
    /// Minor units.
    pub amount: i64,
    /// Free text.
    pub reason: Option<String>,
    /// RFC 3339 timestamp.
    pub created_at: String,
}

/// Why a refund was refused: each is a final outcome, answered by the handler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefundRefused {
    /// The caller has no payment with this id (404).
    #[error("no payment `{0}` for this account")]
    UnknownPayment(String),
    /// The amount is not one an operation can have (422).
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The amount is more than what is left to refund of the payment (422, a problem type of its
    /// own: unlike [`Invalid`], it depends on the refunds made before, not on the request).
    #[error("{0}")]
    Exceeds(String),
}

/// A domain validation failure, answered as 422 problem+json by the handler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// The bank: the ledger and every account's executed operations.
#[derive(Debug)]
pub struct Bank {
    ledger: Ledger,
    entries: Mutex<Vec<Entry>>,
}

/// The current time, as the demo writes it.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

impl Bank {
    /// A bank over `ledger`, with the operations already recorded in it.
    pub fn new(ledger: Ledger, entries: Vec<Entry>) -> Self {
        Self { ledger, entries: Mutex::new(entries) }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, kind: &str, account: &str, operation: serde_json::Value) -> Result<(), String> {
        let entry = self.append(kind, account, operation)?;
        self.entries().push(entry);
        Ok(())
    }

    /// Writes an entry to the ledger and returns it, for the caller to add to the entries.
    fn append(&self, kind: &str, account: &str, operation: serde_json::Value) -> Result<Entry, String> {
        let entry = Entry { kind: kind.to_owned(), account: account.to_owned(), operation };
        self.ledger.append(&entry).map_err(|e| format!("ledger write failed: {e}"))?;
        Ok(entry)
    }

    /// Validates and executes a payment, recording it in the ledger.
    pub fn create_payment(&self, account: &str, req: CreatePayment) -> Result<Result<Payment, Invalid>, String> {
        if let Err(e) = check_amount(req.amount) {
            return Ok(Err(e));
        }
        if req.currency.len() != 3 || !req.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Ok(Err(Invalid(format!("currency must be three uppercase letters, got `{}`", req.currency))));
        }
        let payment = Payment {
            id: new_id("pay"),
            amount: req.amount,
            currency: req.currency,
            customer: req.customer,
            description: req.description,
            created_at: now(),
        };
        self.record("payment", account, serde_json::to_value(&payment).map_err(|e| e.to_string())?)?;
        Ok(Ok(payment))
    }

    /// Validates and executes a transfer (the caller has already waited the processing time).
    pub fn create_transfer(&self, account: &str, req: CreateTransfer) -> Result<Result<Transfer, Invalid>, String> {
        if let Err(e) = check_amount(req.amount) {
            return Ok(Err(e));
        }
        let transfer = Transfer { id: new_id("tr"), amount: req.amount, from: req.from, to: req.to, created_at: now() };
        self.record("transfer", account, serde_json::to_value(&transfer).map_err(|e| e.to_string())?)?;
        Ok(Ok(transfer))
    }

    /// Prices a quote for any JSON object.
    pub fn create_quote(
        &self,
        account: &str,
        request: serde_json::Value,
    ) -> Result<Result<serde_json::Value, Invalid>, String> {
        if !request.is_object() {
            return Ok(Err(Invalid("a quote request must be a JSON object".into())));
        }
        let id = uuid::Uuid::new_v4();
        let price = (id.as_u128() % 100_000) as i64 + 100;
        let quote = serde_json::json!({ "id": format!("qt_{}", id.simple()), "price": price, "request": request });
        self.record("quote", account, quote.clone())?;
        Ok(Ok(quote))
    }

    /// Records a provider's event, delivered as `webhook_id`, and answers `{"received": id}`.
    pub fn receive_webhook(
        &self,
        sender: &str,
        webhook_id: &str,
        event: ProviderEvent,
    ) -> Result<serde_json::Value, String> {
        let operation = serde_json::json!({ "webhook_id": webhook_id, "type": event.kind, "data": event.data });
        self.record("webhook", sender, operation)?;
        Ok(serde_json::json!({ "received": webhook_id }))
    }

    /// Validates and sends a notification, recording it in the ledger.
    pub fn send_notification(
        &self,
        account: &str,
        req: SendNotification,
    ) -> Result<Result<Notification, Invalid>, String> {
        if req.to.trim().is_empty() || req.text.is_empty() {
            return Ok(Err(Invalid("a notification needs a recipient (`to`) and a `text`".into())));
        }
        let notification = Notification {
            id: format!("nt_{}", uuid::Uuid::new_v4().simple()),
            to: req.to,
            text: req.text,
            created_at: now(),
        };
        self.record("notification", account, serde_json::to_value(&notification).map_err(|e| e.to_string())?)?;
        Ok(Ok(notification))
    }

    /// Validates and executes a refund of one of the account's payments, recording it in the
    /// ledger. An unknown payment is refused before the amount is looked at.
    ///
    /// The check against the unrefunded amount and the recording happen under one lock, so two
    /// concurrent refunds (under different keys) can never refund more than the payment.
    pub fn create_refund(
        &self,
        account: &str,
        payment: &str,
        req: CreateRefund,
    ) -> Result<Result<Refund, RefundRefused>, String> {
        let mut entries = self.entries();
        let Some(paid) = find_payment(&entries, account, payment).map(|p| p["amount"].as_i64().unwrap_or(0)) else {
            return Ok(Err(RefundRefused::UnknownPayment(payment.to_owned())));
        };
        if let Err(e) = check_amount(req.amount) {
            return Ok(Err(e.into()));
        }
        let refunded: i64 = refunds_of(&entries, account, payment).filter_map(|r| r["amount"].as_i64()).sum();
        let left = paid - refunded;
        if req.amount > left {
            return Ok(Err(RefundRefused::Exceeds(format!(
                "amount {} exceeds what is left to refund of payment `{payment}`: {left} of {paid}",
                req.amount
            ))));
        }
        let refund = Refund {
            id: new_id("re"),
            payment: payment.to_owned(),
            amount: req.amount,
            reason: req.reason,
            created_at: now(),
        };
        let entry = self.append("refund", account, serde_json::to_value(&refund).map_err(|e| e.to_string())?)?;
        entries.push(entry);
        Ok(Ok(refund))
    }

    /// The account's executed operations of `kind`, oldest first.
    pub fn list(&self, account: &str, kind: &str) -> Vec<serde_json::Value> {
        let entries = self.entries();
        entries.iter().filter(|e| e.account == account && e.kind == kind).map(|e| e.operation.clone()).collect()
    }

    /// One of the account's payments.
    pub fn payment(&self, account: &str, id: &str) -> Option<serde_json::Value> {
        find_payment(&self.entries(), account, id).cloned()
    }

    /// The refunds of one of the account's payments, oldest first; `None` when the account has
    /// no such payment.
    pub fn refunds(&self, account: &str, payment: &str) -> Option<Vec<serde_json::Value>> {
        let entries = self.entries();
        find_payment(&entries, account, payment)?;
        Some(refunds_of(&entries, account, payment).cloned().collect())
    }
}

fn find_payment<'a>(entries: &'a [Entry], account: &str, id: &str) -> Option<&'a serde_json::Value> {
    entries
        .iter()
        .find(|e| e.account == account && e.kind == "payment" && e.operation["id"] == id)
        .map(|e| &e.operation)
}

fn refunds_of<'a>(
    entries: &'a [Entry],
    account: &'a str,
    payment: &'a str,
) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
    entries
        .iter()
        .filter(move |e| e.account == account && e.kind == "refund" && e.operation["payment"] == payment)
        .map(|e| &e.operation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn ledger_path(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("payments-domain-{}-{name}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn open(path: &std::path::Path) -> Bank {
        let (ledger, entries) = Ledger::open(path).unwrap();
        Bank::new(ledger, entries)
    }

    fn pay(bank: &Bank, account: &str, amount: i64) -> Payment {
        let req = CreatePayment { amount, currency: "EUR".into(), customer: "c".into(), description: None };
        bank.create_payment(account, req).unwrap().unwrap()
    }

    fn refund(bank: &Bank, account: &str, payment: &str, amount: i64) -> Result<Refund, RefundRefused> {
        bank.create_refund(account, payment, CreateRefund { amount, reason: None }).unwrap()
    }

    /// `1000.0` and `1e3` are the integer 1000 to JSON Schema and to the fingerprint; serde's i64
    /// refused them.
    #[test]
    fn an_amount_is_any_json_number_equal_to_an_integer() {
        let read = |amount: &str| {
            serde_json::from_str::<CreateRefund>(&format!(r#"{{"amount": {amount}}}"#))
                .map(|r| r.amount)
                .map_err(|e| e.to_string())
        };
        for (text, amount) in
            [("1000", 1000), ("1000.0", 1000), ("1e3", 1000), ("-0.0", 0), ("-5", -5), ("1e12", MAX_AMOUNT)]
        {
            assert_eq!(read(text), Ok(amount), "{text}");
        }
        for bad in ["1000.5", "1e-3", "9223372036854775808", "1e19", "\"1000\"", "null"] {
            let error = read(bad).unwrap_err();
            assert!(error.contains("an integer number of minor units"), "{bad}: {error}");
        }
        assert_eq!(check_amount(MAX_AMOUNT), Ok(()));
        for out in [0, -1, MAX_AMOUNT + 1] {
            assert!(check_amount(out).unwrap_err().0.contains("from 1 to 1000000000000"), "{out}");
        }
    }

    /// The document's `maximum` is the one the domain checks.
    #[test]
    fn the_documented_maximum_is_max_amount() {
        use utoipa::PartialSchema;
        let schema = serde_json::to_value(CreatePayment::schema()).unwrap();
        assert_eq!(schema["properties"]["amount"]["maximum"], MAX_AMOUNT);
        assert_eq!(schema["properties"]["amount"]["minimum"], 1);
    }

    #[test]
    fn refunds_never_exceed_the_payment() {
        let path = ledger_path("exceed");
        let bank = open(&path);
        let p = pay(&bank, "a", 1000);
        let r = refund(&bank, "a", &p.id, 600).unwrap();
        assert!(r.id.starts_with("re_"), "{}", r.id);
        assert_eq!((r.payment.as_str(), r.amount), (p.id.as_str(), 600));
        assert!(matches!(refund(&bank, "a", &p.id, 401), Err(RefundRefused::Exceeds(_))));
        assert!(matches!(refund(&bank, "a", &p.id, 0), Err(RefundRefused::Invalid(_))));
        assert!(matches!(refund(&bank, "a", &p.id, -1), Err(RefundRefused::Invalid(_))));
        refund(&bank, "a", &p.id, 400).unwrap();
        assert!(matches!(refund(&bank, "a", &p.id, 1), Err(RefundRefused::Exceeds(_))));
        assert_eq!(bank.refunds("a", &p.id).unwrap().len(), 2);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn an_unknown_or_foreign_payment_has_no_refunds() {
        let path = ledger_path("unknown");
        let bank = open(&path);
        let p = pay(&bank, "a", 1000);
        assert_eq!(refund(&bank, "b", &p.id, 1), Err(RefundRefused::UnknownPayment(p.id.clone())));
        assert_eq!(refund(&bank, "a", "pay_nope", 0), Err(RefundRefused::UnknownPayment("pay_nope".into())));
        assert_eq!(bank.refunds("b", &p.id), None);
        assert_eq!(bank.refunds("a", &p.id), Some(vec![]));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn refunds_survive_a_restart() {
        let path = ledger_path("restart");
        let (p, r) = {
            let bank = open(&path);
            let p = pay(&bank, "a", 1000);
            (p.clone(), refund(&bank, "a", &p.id, 700).unwrap())
        };
        let bank = open(&path);
        assert_eq!(bank.refunds("a", &p.id), Some(vec![serde_json::to_value(&r).unwrap()]));
        assert!(matches!(refund(&bank, "a", &p.id, 301), Err(RefundRefused::Exceeds(_))));
        refund(&bank, "a", &p.id, 300).unwrap();
        let _ = std::fs::remove_file(path);
    }
}
