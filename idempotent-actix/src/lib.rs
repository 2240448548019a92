//! actix-web adapter of `idempotent`: one attribute makes a mutating handler safe to retry.
//!
//! ```
//! use actix_web::{post, test, web, App, HttpResponse};
//! use idempotent_actix::{idempotent, ActorSource, Idempotency};
//! use idempotent_actix::core::store::MemoryStore;
//! use serde::{Deserialize, Serialize};
//! use std::sync::Arc;
//!
//! #[derive(Deserialize, Serialize)]
//! struct Charge { amount: u64, currency: String, note: Option<String> }
//!
//! // Runs once per `Idempotency-Key`; retries get the stored response back. The registry records
//! // `POST /charges` from the routing attribute below.
//! #[idempotent(scope = "charges.create", fields = [amount, currency], ttl = "24h")]
//! #[post("/charges")]
//! async fn charge(c: web::Json<Charge>) -> HttpResponse {
//!     HttpResponse::Created().body(format!("charged {} {}", c.amount, c.currency))
//! }
//!
//! # actix_web::rt::System::new().block_on(async {
//! let idempotency = Idempotency::builder(Arc::new(MemoryStore::new()))
//!     .actor(ActorSource::Anonymous)
//!     .build()
//!     .unwrap();
//! let app = test::init_service(App::new().app_data(idempotency.data()).service(charge)).await;
//! for replayed in [false, true] {
//!     let req = test::TestRequest::post()
//!         .uri("/charges")
//!         .insert_header(("Idempotency-Key", "order-42"))
//!         .set_json(serde_json::json!({"amount": 100, "currency": "EUR"}))
//!         .to_request();
//!     let res = test::call_service(&app, req).await;
//!     assert_eq!(res.status(), 201);
//!     assert_eq!(res.headers().contains_key("idempotent-replayed"), replayed);
//! }
//! # });
//! ```
//!
//! # How it works
//! The attribute rewrites the handler: it keeps every extractor of the original and wraps its body
//! extractor (`web::Json`, `web::Form`, `Bytes`, `String`, or one marked `#[body]`; without one it
//! adds a last argument) in a [`Protected`] extractor that reads the payload within actix-web's
//! `PayloadConfig` limit, computes the request's identity (method, path parameters, canonical
//! query, whole body by content type or the declared `fields`; see `idempotent_axum` for the
//! rules, which are the same) and hands the same bytes to the original extractor. The protocol
//! itself is [`idempotent_core::protocol`]. When the whole body is part of the identity it is read
//! under the route's `web::PayloadConfig` limit (256 KiB by default) before the body extractor's
//! own limit applies, so a route that accepts larger JSON (`JsonConfig::limit`) needs a
//! `PayloadConfig` at least as large. That read decodes a compressed request body
//! (`Content-Encoding`), and the body extractor is then handed the decoded bytes under the
//! original headers: a route that accepts compressed request bodies should declare its body
//! `fields` (the body extractor then reads the payload itself) or `exclude = [body]`. actix-web
//! handlers are not `Send`, so once it has to wait it runs on the
//! worker's local task set (`actix_web::rt::spawn`): a client that disconnects drops the request,
//! not the task, so the handler still runs to completion and its outcome is recorded.
//!
//! The key header and the actor are read once every extractor of the handler has run: an
//! authentication extractor (or middleware) that inserts an [`Actor`] into the request's
//! extensions decides the caller's namespace; otherwise the configured [`ActorSource`] reads it
//! from the headers.
//!
//! The runtime is installed once as application data with [`Idempotency::data`]; a protected
//! route called without it answers 500 problem+json saying so. The key header, the actor source
//! and the stored-body cap are set on the [`IdempotencyBuilder`]; its `build` validates the routes
//! registered through this adapter (duplicate scopes, impossible settings) and refuses to start on
//! error.
//!
//! # Routing attributes
//! Write `#[idempotent]` above actix-web's routing attribute (`#[post("/path")]`, `#[put]`,
//! `#[patch]`, `#[delete]`, `#[route("/path", method = "POST")]`): it then records the method and
//! path in the registry and reports. The reverse order also compiles and protects the handler
//! the same way, but the routing attribute has already consumed its arguments, so the record has
//! no method and path unless the attribute's `route = "POST /path"` argument gives them. Handlers
//! registered with `web::post().to(handler)` work unchanged. Either way the reports also list the
//! full paths each handler has served (`web::scope` prefixes included), and enforcement
//! ([`enforce::Enforce`]) recognises handlers by what their generated code does, never by path.
//!
//! # Responses
//! A replay carries the stored status, headers and body plus `Idempotent-Replayed: true`;
//! framework errors are `application/problem+json` with stable types (see
//! [`idempotent_core::problem`]). A response body over the cap still reaches the client whole (a
//! body of known size is passed through, a stream is re-sent from the part already read), and is
//! recorded without its body so the handler never runs twice for its key.
//!
//! # Dependencies and why
//! `actix-web` (the framework: extractors, responders, bodies, and `rt::spawn` to run the handler
//! on the worker's local task set so it survives disconnects), `http`, `http-body` and
//! `http-body-util` (the types the protocol in core speaks, converted to and from actix-web's),
//! `bytes` and `futures-util` (bodies and payload streams), `idempotent-core` (which also
//! re-exports `inventory` for the macro's registry records) and `idempotent-macros`.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod enforce;
mod extract;
mod runtime;

pub use idempotent_core as core;
pub use idempotent_core::actor::{Actor, ActorSource};
pub use idempotent_core::engine::StartupError;
pub use idempotent_macros::idempotent_actix as idempotent;
pub use runtime::{health, mint_token, policies_command, policy_report, record_status, render_problem, Request};

idempotent_core::__adapter_types!(Actix, runtime::Request, ::actix_web::HttpResponse);
