//! Configuration from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the demo reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `PAYMENTS_ADDR`, default `127.0.0.1:3000`.
    pub addr: SocketAddr,
    /// `IDEMPOTENCY_STORE`: `memory`, `sqlite:PATH`, `redis://...`, `postgres://...`, `mysql://...`.
    pub store: String,
    /// `PAYMENTS_LEDGER`, default `payments-ledger.jsonl`.
    pub ledger: PathBuf,
    /// `PAYMENTS_TRANSFER_DELAY_MS`, default 1500.
    pub transfer_delay: Duration,
}

impl Config {
    /// Reads the environment; a malformed value is an error naming the variable.
    pub fn from_env() -> Result<Self, String> {
        let addr = std::env::var("PAYMENTS_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
        let addr = addr.parse().map_err(|e| format!("PAYMENTS_ADDR `{addr}` is not a socket address: {e}"))?;
        let ledger = PathBuf::from(std::env::var("PAYMENTS_LEDGER").unwrap_or_else(|_| "payments-ledger.jsonl".into()));
        let delay = std::env::var("PAYMENTS_TRANSFER_DELAY_MS").unwrap_or_else(|_| "1500".into());
        let delay: u64 =
            delay.parse().map_err(|e| format!("PAYMENTS_TRANSFER_DELAY_MS `{delay}` is not a number of ms: {e}"))?;
        let store = std::env::var("IDEMPOTENCY_STORE").unwrap_or_else(|_| default_store(&ledger));
        Ok(Self { addr, store, ledger, transfer_delay: Duration::from_millis(delay) })
    }
}

/// The embedded default store when `IDEMPOTENCY_STORE` is unset: a SQLite file next to the
/// ledger, so a restarted demo still replays every completed operation.
pub fn default_store(ledger: &std::path::Path) -> String {
    let dir = ledger.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    format!("sqlite:{}", dir.join("payments-idempotency.sqlite").display())
}
