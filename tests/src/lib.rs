//! Support for the cross-crate tests: the HTTP conformance suite of the payments demo, run
//! unchanged against each framework's binary, and the harness that finds or starts real servers.

/// The store contract suite, from `idempotent-core` (feature `testing`).
pub use idempotent_core::store_contract_tests;
/// The per-caller bound's contract suite, from `idempotent-core` (feature `testing`).
pub use idempotent_core::store_quota_tests;
pub use idempotent_core::testing as contract;
pub mod browser;
pub mod fault_proxy;
pub mod faults;
pub mod http;
pub mod identity;
pub mod issued;
pub mod mysql;
pub mod nats_server;
pub mod netns;
pub mod postgres;
pub mod process;
pub mod rabbitmq;
pub mod redis_cluster;
pub mod redis_server;
pub mod spec;
pub mod tls;
pub mod trace_capture;

/// The README's Rust examples, compiled (and run) as doctests so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
