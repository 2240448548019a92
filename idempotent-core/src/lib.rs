//! Framework-free runtime of `idempotent`: make mutating HTTP handlers safe to retry.
//!
//! ```
//! use idempotent_core::{engine::{Captured, Config, Outcome, Request, Runtime}, fingerprint::FingerprintBuilder,
//!     key::IdempotencyKey, policy::Policy, response::StoredResponse, store::MemoryStore};
//! use std::sync::{Arc, atomic::{AtomicUsize, Ordering}};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! const POLICY: Policy = Policy::new("payments.create");
//! let runtime = Runtime::new(Arc::new(MemoryStore::new()), Config::default());
//! let runs = AtomicUsize::new(0);
//! for _ in 0..3 {
//!     let request = Request {
//!         key: IdempotencyKey::parse(b"\"order-42\"").map(Some),
//!         actor: Some("acct_1".into()),
//!         fingerprint: Ok(FingerprintBuilder::new(POLICY.scope).field("amount", &100).unwrap().finish()),
//!     };
//!     let outcome = runtime.execute(&POLICY, request, async {
//!         runs.fetch_add(1, Ordering::SeqCst);
//!         Captured::new(StoredResponse::new(201, [("content-type", "text/plain")], "charged".into()), "charged")
//!     }).await;
//!     assert!(matches!(outcome, Outcome::Executed(_) | Outcome::Replayed(_)));
//! }
//! assert_eq!(runs.load(Ordering::SeqCst), 1); // three requests, one execution
//! # });
//! ```
//!
//! Adapters (`idempotent-axum`, `idempotent-actix`) wrap this crate; applications normally use
//! one of them and never depend on this crate directly.
//!
//! # Modules
//! - [`key`]: the `Idempotency-Key` header (sf-String or bare token, 1–255 visible ASCII).
//! - [`policy`]: per-route settings, const-built by the macro.
//! - [`fingerprint`]: SHA-256 over a canonical, versioned encoding of a request's identity:
//!   scope, method, path parameters, query, body (RFC 8785 JSON, sorted form pairs, bytes) or
//!   declared fields.
//! - [`engine`]: the state machine: claim, run with a lease heartbeat, complete or release.
//! - [`store`]: the [`Store`](store::Store) trait, the in-memory store and, behind features of the
//!   same name, the `sqlite`, `postgres`, `mysql` (MySQL and MariaDB) and `redis` stores.
//! - [`response`]: captured responses, header filtering, the stored encoding.
//! - [`problem`]: RFC 9457 problem details with stable types.
//! - [`protocol`]: the HTTP protocol over `http` types, shared by every adapter: the request's
//!   identity, key and actor, capture under the cap, replays, problem responses, the report.
//! - [`actor`]: the caller identity that namespaces keys (stores see only its digest).
//! - [`digest`]: what stores and logs see of actors and keys: SHA-256, or HMAC-SHA256 under a
//!   server secret.
//! - [`registry`] and [`report`]: every annotated route, validated and rendered, with the full
//!   paths it has served.
//! - [`enforce`]: recognising unprotected mutating routes by what generated code does.
//! - [`telemetry`]: the span of each protected request and the metrics (requests by outcome,
//!   store operation latency, lease renewals, claims in flight), with what each counts.
//! - `testing` (feature `testing`): the store contract suite, for a custom store to run.
//! - `openapi` (feature `utoipa`): the key header and problem responses added to a `utoipa`
//!   OpenAPI document for every protected operation.
//!
//! # Dependencies and why
//! `sha2` (the fingerprint, and the digests of actors and of keys in traces), `hmac` (the same
//! digests keyed by a server secret, when one is set: [`digest`]), `serde`/`serde_json` (field values and reports; its
//! `float_roundtrip` feature so a number parses to the same double whatever other crates enable),
//! `ryu-js` (RFC 8785 prescribes ECMAScript's number-to-string for floats; this is that
//! algorithm), `percent-encoding` (decoding query and form pairs to their exact bytes),
//! `http`, `http-body` and `http-body-util` (the protocol is written once over these types, which
//! axum uses directly and actix-web converts to),
//! `tokio` (timers for leases, heartbeats and waits; both adapters run on it), `tokio-util`
//! (its `TaskTracker` is the set of running protected requests that a graceful shutdown waits
//! for), `async-trait`
//! (an object-safe async [`Store`](store::Store) trait), `futures-util` (catching a handler's
//! panic as a value so its claim is released), `inventory` (the link-time route registry),
//! `uuid` (random claim tokens), `bytes`, `thiserror`, `tracing` (the span of each protected
//! request and the engine's events; the application chooses the subscriber), `metrics` 0.24 (the
//! facade every Rust metrics exporter implements: the engine counts and times through it, and the
//! application installs the recorder it wants, Prometheus or another; without one every call is
//! a no-op. No exporter is a dependency of this crate).
//! Tests only: `metrics-util` (its debugging recorder, installed for one test's thread, reads
//! back what the engine recorded).
//! Optional, behind the features `sqlite`, `postgres` and `mysql`: `sqlx`, major version 0.9 (the
//! SQL stores: one async driver and pool for the three databases, used through its runtime query
//! API, so building needs no database; the migrations and statements are SQL rendered once for
//! the configured table, values always bound). An application that hands its own pool to
//! `PostgresStore::from_pool`, `SqliteStore::from_pool` or `MySqlStore::from_pool` must build it
//! with sqlx 0.9: a pool of sqlx 0.8 is another type; the crate is re-exported as
//! `idempotent_core::sqlx`. The `sqlite` feature builds SQLite from source (sqlx's
//! `sqlite-bundled`, and `sqlite-unlock-notify` so that a shared-cache in-memory database waits
//! for a lock rather than failing). The `mysql` feature is sqlx's pure-Rust MySQL protocol, which
//! speaks to MariaDB too; the MySQL store files records under a SHA-256 of their key with the
//! `sha2` the fingerprint already uses.
//! With `sqlite`, on Linux only, `rustix` 1 (its `time` module): the SQLite store counts leases on
//! the host's monotonic clock, which every process sharing the database file must read alike;
//! `std::time::Instant` reads that clock but never shows its value, and this crate forbids
//! `unsafe` code, so `clock_gettime(CLOCK_MONOTONIC)` comes from rustix's safe wrapper.
//! Optional, behind the feature of the same name: `utoipa` 6 (its OpenAPI model: the document an
//! application already builds with it is the one the protected operations are added to;
//! re-exported as `idempotent_core::utoipa`).
//! Optional, behind the feature of the same name: `redis`, major version 1 (the Redis store: its
//! connection manager reconnects by itself, its cluster connection follows the slot map, and its
//! script support runs each operation as one atomic `EVALSHA`). It is re-exported as
//! `idempotent_core::redis`, and an application's own connection handed to the store must come
//! from this same major version (redis 1.x).
//! Optional, behind the feature `tls`: TLS to the managed stores (`rediss://`,
//! `rediss+cluster://`, PostgreSQL's `sslmode=verify-full`, MySQL's `ssl-mode=VERIFY_IDENTITY`), with the clients' own rustls
//! support (redis's `tokio-rustls-comp`, sqlx's `tls-rustls-ring-native-roots`): rustls needs no
//! system TLS library to build or link, ring is its cryptography (nothing more to install to
//! build), and servers are verified against the platform's root certificates
//! (`rustls-native-certs`), so a private CA installed on the host is trusted like a public one.
//! `rustls` 0.23 itself is a dependency only to install ring as the process's default
//! cryptography provider when the application has not installed one: the redis crate asks for
//! that default. Off by default, so a build without TLS carries no TLS stack.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod actor;
pub mod digest;
pub mod enforce;
pub mod engine;
pub mod fingerprint;
pub mod issued;
pub mod key;
#[cfg(feature = "utoipa")]
pub mod openapi;
pub mod policy;
pub mod problem;
pub mod protocol;
pub mod registry;
pub mod report;
pub mod response;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

/// The attribute a custom [`Store`](store::Store) implementation is written with: the trait is
/// declared with `async_trait`, so `#[idempotent_core::async_trait]` on the impl is all it needs.
pub use async_trait::async_trait;
pub use inventory;

/// The sqlx the SQL stores are built on (features `sqlite`, `postgres` and `mysql`). A pool given
/// to `PostgresStore::from_pool`, `SqliteStore::from_pool` or `MySqlStore::from_pool` must come
/// from sqlx 0.9: this re-export, or the application's own `sqlx = "0.9"` dependency, which Cargo
/// resolves to this same crate.
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub use sqlx;

/// The OpenAPI model [`openapi`] documents: `utoipa` 6. An application's document must come from
/// this major (`idempotent_core::utoipa` is the same crate).
#[cfg(feature = "utoipa")]
pub use utoipa;

/// The `redis` client crate (feature `redis`), major version 1, that the Redis store is built on.
/// A connection passed to [`RedisStore::from_connection_manager`](store::RedisStore::from_connection_manager)
/// or [`RedisStore::from_cluster_connection`](store::RedisStore::from_cluster_connection) must come
/// from redis 1.x: depend on `redis = "1"` or use this re-export (a connection of redis 0.x or 2.x
/// is another type and does not compile).
#[cfg(feature = "redis")]
pub use ::redis;

/// Appends `bytes` to `out` in lowercase hexadecimal, without an allocation per byte (digests of
/// keys and actors are made on every request).
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
}

/// `bytes` in lowercase hexadecimal.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    push_hex(&mut out, bytes);
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hex_is_two_lowercase_digits_per_byte(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            prop_assert_eq!(super::hex(&bytes), expected);
            let mut appended = "x".to_owned();
            super::push_hex(&mut appended, &bytes);
            prop_assert_eq!(&appended[1..], super::hex(&bytes));
        }
    }
}
