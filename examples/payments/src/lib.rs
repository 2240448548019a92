//! The payments demo: a small payments API whose mutating routes are protected by
//! `#[idempotent]`. See the repository's DEMO contract for the routes.
//!
//! The domain (validation, the ledger, the accounts' operations) is framework-free and shared by
//! the binaries; each binary adds only its framework's glue.

pub mod actix_app;
pub mod api;
pub mod axum_app;
pub mod checkout;
pub mod cli;
pub mod config;
pub mod deposits;
pub mod domain;
pub mod ledger;
pub mod metrics;
pub mod openapi;
pub mod webhooks;
pub mod worker;
pub mod worker_amqp;
