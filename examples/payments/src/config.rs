//! Configuration from the environment.

use idempotent_axum::core::digest::DigestKey;
use idempotent_axum::core::store::{self, spec::Redacted, Store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the demo reads from its environment. Its `Debug` shows the store specification
/// without its password.
#[derive(Clone)]
pub struct Config {
    /// `PAYMENTS_ADDR`, default `127.0.0.1:3000`.
    pub addr: SocketAddr,
    /// `IDEMPOTENCY_STORE`: `memory`, `sqlite:PATH`, `redis://...`, `postgres://...`, `mysql://...`.
    pub store: String,
    /// `PAYMENTS_LEDGER`, default `payments-ledger.jsonl`.
    pub ledger: PathBuf,
    /// `PAYMENTS_TRANSFER_DELAY_MS`, default 1500.
    pub transfer_delay: Duration,
    /// `PAYMENTS_WEBHOOK_SECRET`: the Standard Webhooks signing secret of `POST /webhooks/provider`.
    pub webhook_secret: crate::webhooks::Secret,
    /// `IDEMPOTENCY_DIGEST_SECRET`: when set, callers and keys are digested with HMAC-SHA256
    /// under it (see `idempotent_core::digest`); the `records` subcommand needs the same one.
    pub digest_secret: Option<String>,
    /// `PAYMENTS_TOKEN_SECRET`: the secret the checkout form's tokens are minted under (the same
    /// on every instance sharing the store); a fixed demo value by default.
    pub token_secret: String,
    /// `PAYMENTS_CHECKOUT_FAILURES`: the first N checkout submits fail with 500, a simulated
    /// provider outage (default 0).
    pub checkout_failures: usize,
    /// `PAYMENTS_CHECKOUT_DELAY_MS`: the payment provider's processing time of a checkout
    /// submit (default 0).
    pub checkout_delay: Duration,
}

/// The token secret of the checkout form when `PAYMENTS_TOKEN_SECRET` is not set. A deployment
/// sets its own: whoever knows it can mint tokens for any account.
pub const DEFAULT_TOKEN_SECRET: &str = "payments-demo checkout token secret, not for production";

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
        let digest_secret = std::env::var("IDEMPOTENCY_DIGEST_SECRET").ok().filter(|s| !s.is_empty());
        let webhook_secret =
            std::env::var("PAYMENTS_WEBHOOK_SECRET").unwrap_or_else(|_| crate::webhooks::DEFAULT_SECRET.to_owned());
        let webhook_secret = crate::webhooks::Secret::parse(&webhook_secret)?;
        let token_secret = std::env::var("PAYMENTS_TOKEN_SECRET")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_TOKEN_SECRET.to_owned());
        let failures = std::env::var("PAYMENTS_CHECKOUT_FAILURES").unwrap_or_else(|_| "0".into());
        let checkout_failures =
            failures.parse().map_err(|e| format!("PAYMENTS_CHECKOUT_FAILURES `{failures}` is not a count: {e}"))?;
        let checkout_delay = std::env::var("PAYMENTS_CHECKOUT_DELAY_MS").unwrap_or_else(|_| "0".into());
        let checkout_delay: u64 = checkout_delay
            .parse()
            .map_err(|e| format!("PAYMENTS_CHECKOUT_DELAY_MS `{checkout_delay}` is not a number of ms: {e}"))?;
        Ok(Self {
            addr,
            store,
            ledger,
            transfer_delay: Duration::from_millis(delay),
            webhook_secret,
            digest_secret,
            token_secret,
            checkout_failures,
            checkout_delay: Duration::from_millis(checkout_delay),
        })
    }

    /// A configuration for tests and embedding: `store` and `ledger`, any free loopback port, the
    /// default webhook secret, no digest secret.
    pub fn new(store: impl Into<String>, ledger: impl Into<PathBuf>, transfer_delay: Duration) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            store: store.into(),
            ledger: ledger.into(),
            transfer_delay,
            webhook_secret: crate::webhooks::Secret::parse(crate::webhooks::DEFAULT_SECRET)
                .expect("the default secret parses"),
            digest_secret: None,
            token_secret: DEFAULT_TOKEN_SECRET.to_owned(),
            checkout_failures: 0,
            checkout_delay: Duration::ZERO,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("store", &self.store_shown())
            .field("ledger", &self.ledger)
            .field("transfer_delay", &self.transfer_delay)
            .field("webhook_secret", &self.webhook_secret)
            .field("digest_secret", &self.digest_secret.as_ref().map(|_| "(set)"))
            .field("token_secret", &"(set)")
            .field("checkout_failures", &self.checkout_failures)
            .field("checkout_delay", &self.checkout_delay)
            .finish()
    }
}

impl Config {
    /// The store specification as messages show it: without its password.
    pub fn store_shown(&self) -> Redacted<'_> {
        Redacted(&self.store)
    }

    /// How callers and keys are digested: under `IDEMPOTENCY_DIGEST_SECRET` when it is set.
    pub fn digests(&self) -> DigestKey {
        self.digest_secret.as_ref().map(DigestKey::new).unwrap_or_default()
    }

    /// Opens the idempotency store to serve with; the error names it, redacted.
    pub async fn open_store(&self) -> Result<std::sync::Arc<dyn Store>, String> {
        store::connect(&self.store).await.map_err(|e| format!("idempotency store `{}`: {e}", self.store_shown()))
    }
}

/// The embedded default store when `IDEMPOTENCY_STORE` is unset: a SQLite file next to the
/// ledger, so a restarted demo still replays every completed operation.
pub fn default_store(ledger: &std::path::Path) -> String {
    let dir = ledger.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    format!("sqlite:{}", dir.join("payments-idempotency.sqlite").display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_neither_the_store_password_nor_the_digest_secret() {
        let config = Config {
            digest_secret: Some("s3cret-digest".into()),
            ..Config::new("postgres://app:hunter2@db/payments", "l.jsonl", Duration::ZERO)
        };
        let shown = format!("{config:?}");
        assert!(shown.contains("postgres://app:***@db/payments"), "{shown}");
        assert!(!shown.contains("hunter2") && !shown.contains("s3cret"), "{shown}");
        assert_eq!(config.store_shown().to_string(), "postgres://app:***@db/payments");
    }
}
