//! The payments domain, free of any web framework.

use crate::ledger::{Entry, Ledger};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::SystemTime;

/// `POST /payments` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CreatePayment {
    /// Minor units, > 0.
    pub amount: i64,
    /// ISO 4217 code: three uppercase letters.
    pub currency: String,
    /// Customer reference.
    pub customer: String,
    /// Free text; not part of the fingerprint.
    #[serde(default)]
    pub description: Option<String>,
}

/// A created payment.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CreateTransfer {
    /// Minor units, > 0.
    pub amount: i64,
    /// Source account.
    pub from: String,
    /// Destination account.
    pub to: String,
}

/// A created transfer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
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

fn now() -> String {
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

    fn record(&self, kind: &str, account: &str, operation: serde_json::Value) -> Result<(), String> {
        let entry = Entry { kind: kind.to_owned(), account: account.to_owned(), operation };
        self.ledger.append(&entry).map_err(|e| format!("ledger write failed: {e}"))?;
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).push(entry);
        Ok(())
    }

    /// Validates and executes a payment, recording it in the ledger.
    pub fn create_payment(&self, account: &str, req: CreatePayment) -> Result<Result<Payment, Invalid>, String> {
        if req.amount <= 0 {
            return Ok(Err(Invalid(format!("amount must be a positive integer, got {}", req.amount))));
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
        if req.amount <= 0 {
            return Ok(Err(Invalid(format!("amount must be a positive integer, got {}", req.amount))));
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

    /// The account's executed operations of `kind`, oldest first.
    pub fn list(&self, account: &str, kind: &str) -> Vec<serde_json::Value> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().filter(|e| e.account == account && e.kind == kind).map(|e| e.operation.clone()).collect()
    }

    /// One of the account's payments.
    pub fn payment(&self, account: &str, id: &str) -> Option<serde_json::Value> {
        self.list(account, "payment").into_iter().find(|p| p["id"] == id)
    }
}
