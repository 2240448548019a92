//! actix-web adapter of `idempotent`: one attribute makes a mutating handler safe to retry.
//!
//! ```
//! use actix_web::{post, test, web, App, HttpResponse};
//! use idempotent_actix::{idempotent, Idempotency};
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
//! let idempotency = Idempotency::builder(Arc::new(MemoryStore::new())).build().unwrap();
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
//! The attribute rewrites the handler: it keeps every extractor of the original, adds a
//! [`Context`](__private::Context) extractor just before the body, fingerprints the declared body
//! fields, and hands the original handler to [`idempotent_core::engine::Runtime::execute`].
//! actix-web handlers are not `Send`, so the execution is spawned on the worker's local task set
//! (`actix_web::rt::spawn`): a client that disconnects drops the request, not the task, so the
//! handler still runs to completion and its outcome is recorded.
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
//! registered with `web::post().to(handler)` work unchanged; give them `route` for the reports.
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
//! on the worker's local task set so it survives disconnects), `bytes` and `futures-util`
//! (reading a response body and re-streaming one too large to store), `inventory` (re-exported
//! for the macro's registry records), `tracing`, `thiserror`, `idempotent-core` and
//! `idempotent-macros`.

pub mod enforce;
mod extract;
mod runtime;

pub use idempotent_core as core;
pub use idempotent_core::actor::{Actor, ActorSource};
pub use idempotent_core::engine::StartupError;
pub use idempotent_macros::idempotent_actix as idempotent;
pub use runtime::{policy_report, render_problem};

idempotent_core::__adapter_types!(Actix, (actix_web::HttpRequest, Option<idempotent_core::engine::Runtime>));

/// Items used by the code `#[idempotent]` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::extract::Exempt;
    pub use crate::runtime::run;
    pub use crate::{Context, Protected};
    pub use ::actix_web::HttpResponse as Response;
    pub use ::core::time::Duration;
    pub use ::idempotent_core::inventory;
    pub use ::idempotent_core::policy::{ConflictMode, Identity, KeyRequirement, Part, Policy, StoredOutcomes};
    pub use ::idempotent_core::protocol::field::{Field, PlainField, SetField};
    pub use ::idempotent_core::registry::{Framework, RouteRecord};
}
