//! axum adapter of `idempotent`: one attribute makes a mutating handler safe to retry.
//!
//! ```
//! use axum::{routing::post, Json, Router};
//! use idempotent_axum::{idempotent, ActorSource, Idempotency};
//! use idempotent_axum::core::store::MemoryStore;
//! use serde::{Deserialize, Serialize};
//! use std::sync::Arc;
//!
//! #[derive(Deserialize, Serialize)]
//! struct Charge { amount: u64, currency: String, note: Option<String> }
//!
//! // Runs once per `Idempotency-Key`; retries get the stored response back.
//! #[idempotent(scope = "charges.create", fields = [amount, currency], ttl = "24h")]
//! async fn charge(Json(c): Json<Charge>) -> (axum::http::StatusCode, String) {
//!     (axum::http::StatusCode::CREATED, format!("charged {} {}", c.amount, c.currency))
//! }
//!
//! let idempotency = Idempotency::builder(Arc::new(MemoryStore::new()))
//!     .actor(ActorSource::Anonymous)
//!     .build()
//!     .unwrap();
//! let app: Router = Router::new().route("/charges", post(charge)).layer(idempotency.layer());
//! ```
//!
//! # How it works
//! The attribute rewrites the handler: it keeps every extractor of the original and wraps the
//! last one (the only one axum lets read the body) in a [`Protected`] extractor. That runs after
//! the handler's other extractors (so an authentication extractor or middleware can set an
//! [`Actor`] first), reads the body within axum's `DefaultBodyLimit`, computes the request's
//! identity, and hands the same bytes to the original extractor. The protocol itself (key and
//! actor, identity, claim, capture, replay, problems) is [`idempotent_core::protocol`]; this crate
//! runs it in place until it first has to wait and then on a spawned task, so a client that
//! disconnects does not cancel the handler and its outcome is still recorded.
//!
//! # A request's identity
//! By default it is the scope, the method, every path parameter (`Path`), the canonical query
//! and the whole body by content type: JSON per RFC 8785 (`1000` and `1e3` are one number, key
//! order does not matter), forms as sorted pairs, anything else byte for byte. `fields = [..]`
//! narrows it to what the handler acts on: body fields (`amount`, `customer.id`, read from the
//! `Json<T>` or `Form<T>` argument, or one marked `#[body]`; a `HashSet` field compares as a
//! set), path parameters (`path(id)`) and query parameters (`query(page)`). `exclude = [query]`
//! leaves a part out. Both show in the policy report. The prefix a router is nested under is not
//! part of the identity: one key on `/payments` and `/v1/payments` is one operation.
//!
//! The runtime is installed once with [`Idempotency::layer`]; a protected route called without it
//! answers 500 problem+json saying so. The key header, the actor source and the stored-body cap are
//! set on the [`IdempotencyBuilder`]. [`Idempotency::builder`]'s `build` validates the route
//! registry (duplicate scopes, impossible settings) and refuses to start on error.
//!
//! Responses: a replay carries the stored status, headers and body plus `Idempotent-Replayed:
//! true`; framework errors are `application/problem+json` with stable types (see
//! [`idempotent_core::problem`]).
//!
//! # Dependencies and why
//! `axum`, `http` and `http-body-util` (the framework, and collecting a request body), `tokio`
//! (spawning the protocol so it survives disconnects), `idempotent-core` (which also re-exports
//! `inventory` for the macro's registry records) and `idempotent-macros`, `tower-layer`/`tower-service` (the two
//! traits the [`enforce::Enforce`] layer implements; axum already depends on them).
//!
//! # Enforcement
//! [`enforce::Enforce`] is a layer that warns about (or refuses) requests to mutating routes
//! that no `#[idempotent]` handler protects or exempts. It recognises handlers by what their
//! generated code does, so nested routers need nothing and no path is written twice. A route that
//! needs no key is declared with `#[idempotent(exempt = "reason")]`: its handler is left as
//! written but for one marker extractor, and the reports list it apart with the reason.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod enforce;
mod extract;
mod runtime;

pub use idempotent_core as core;
pub use idempotent_core::actor::{Actor, ActorSource};
pub use idempotent_core::engine::StartupError;
pub use idempotent_macros::idempotent_axum as idempotent;
pub use runtime::{health, mint_token, policies_command, policy_report, record_status, render_problem};

idempotent_core::__adapter_types!(Axum, http::HeaderMap, ::axum::response::Response);
