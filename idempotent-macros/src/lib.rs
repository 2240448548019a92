//! The `#[idempotent]` attribute of the `idempotent` framework.
//!
//! The attribute turns an `async fn` request handler into one that runs at most once per
//! `Idempotency-Key`: it parses and validates its arguments at compile time, rewrites the
//! handler to fingerprint the request (its declared fields, or all of it) and run through the
//! adapter's runtime, and registers the route's policy in the link-time route registry. It
//! contains no runtime logic.
//!
//! Applications do not depend on this crate: they use the attribute through an adapter,
//! `idempotent_axum::idempotent` or `idempotent_actix::idempotent`, and the generated code only
//! names paths that adapter re-exports (`::idempotent_axum::__private::...`), so one dependency
//! is enough.
//!
//! # Dependencies and why
//! Only `syn`, `quote` and `proc-macro2`: everything else (durations, scope rules, route forms)
//! is checked by hand so the macro builds fast and cannot disagree with a runtime crate at a
//! different version. The defaults it fills in mirror `idempotent_core::policy::Policy::new`.
//!
//! # Layout
//! `attr` parses the argument list, `duration` parses durations, `valid` checks the values,
//! `expand` rewrites the handler, `consumer` checks and expands a message consumer's handler.

mod attr;
mod consumer;
mod duration;
mod expand;
mod valid;

use expand::Framework;
use proc_macro::TokenStream;

/// Makes an axum handler safe to retry; re-exported as `idempotent_axum::idempotent`.
///
/// ```
/// use axum::{extract::State, http::StatusCode, routing::post, Json, Router};
/// use idempotent_axum::{core::store::MemoryStore, idempotent, Idempotency};
/// use serde::{Deserialize, Serialize};
/// use std::sync::Arc;
///
/// #[derive(Clone)]
/// struct App { currency: &'static str }
///
/// #[derive(Deserialize, Serialize)]
/// struct Customer { id: String, name: String }
///
/// #[derive(Deserialize, Serialize)]
/// struct CreatePayment { amount: u64, currency: String, customer: Customer }
///
/// #[idempotent(scope = "payments.create", fields = [amount, currency, customer.id], ttl = "24h")]
/// async fn create_payment(State(app): State<App>, Json(req): Json<CreatePayment>) -> (StatusCode, String) {
///     // Runs at most once per key; a retry gets this response back.
///     (StatusCode::CREATED, format!("{} {} for {} ({})", req.amount, req.currency, req.customer.name, app.currency))
/// }
///
/// let idempotency = Idempotency::builder(Arc::new(MemoryStore::new())).actor(idempotent_axum::ActorSource::Anonymous).build().unwrap();
/// let _app: Router = Router::new()
///     .route("/payments", post(create_payment))
///     .layer(idempotency.layer())
///     .with_state(App { currency: "EUR" });
/// ```
///
/// # Arguments
/// Only `scope` is required; the others default to `Policy::new`.
///
/// | argument | value | default |
/// |---|---|---|
/// | `scope` | key namespace: lowercase ASCII letters, digits and `_` in dot-separated segments, 1 to 100 characters, e.g. `"payments.create"` | required |
/// | `fields` | what of the request makes up its identity: body fields as dotted paths, `path(name)` for a path parameter, `query(name)` for a query parameter: `[amount, customer.id, path(id)]` | every path parameter, the whole query, the whole body |
/// | `exclude` | parts left out of the identity on purpose: `[path]`, `[query]`, `[body]` | none |
/// | `ttl` | how long a completed response is replayed: `"500ms"`, `"90s"`, `"15m"`, `"24h"`, `"7d"`, `"1h30m"` | `"24h"` |
/// | `lease` | how long an in-progress claim survives without a heartbeat; at most `ttl`, at least 1 s here, and at start-up at least 6 × the runtime's store timeout (6 s with the default 1 s timeout; `.store_timeout(..)` at a sixth of the lease allows shorter ones) | `"10s"` |
/// | `key` | `"required"` (400 without a key) or `"optional"` (run unprotected without one); or where the key comes from: `header("webhook-id")`, `field(event.id)`, `[field(a), field(b)]`, `derived`, or `issued(ttl = "15m", from = form("_idem"))` / `issued(from = header("x-form-token"))`, a token the server minted for a form (see below) | `"required"` |
/// | `on_conflict` | `"reject"` (409 while the first request runs) or `"wait"` (wait and replay) | `"reject"` |
/// | `wait_timeout` | longest wait under `on_conflict = "wait"`; only allowed with it | `"30s"` |
/// | `store` | outcomes stored and replayed: `"final"`, `"success"` or `"all"` | `"final"` |
/// | `fail_open` | `true` runs the handler unprotected when the store is unreachable | `false` |
/// | `transactional` | `true`: the handler writes in a transaction of the store's database (its `Tx` argument) and its outcome's record commits in it; PostgreSQL, MySQL and SQLite stores only (see `idempotent_core::store::transaction`) | `false` |
/// | `route` | `"METHOD /path"` recorded in the route registry and reports before the route has served a request (on axum, the only way the report knows the path at start-up); not needed for enforcement | none (actix-web: the routing attribute) |
///
/// A part of the request that `fields` selects from (body, path or query) is compared only by the
/// values named; the others are compared whole. A `path(name)` is checked on each request, since
/// a router may add parameters when it mounts the handler (`web::scope("/t/{tenant}")`): a route
/// without that parameter answers 500 `misconfigured` and runs nothing. Without a body field the whole body counts,
/// canonicalised by content type, so the body type need not be `Serialize`.
///
/// # Server-issued tokens
/// `key = issued(ttl = "15m", from = form("_idem"))` protects a browser form, which sends no key
/// header: the key is a token the server minted for the caller and the scope while rendering
/// the form (the adapter's `Mint` extractor, or `POST /_idempotency/tokens` for scripts), sent
/// back in the form field (or with `from = header("..")` in a header). `ttl` is how long a token
/// can be submitted (default `"15m"`); it must be at most the route's `ttl`, so that a resubmitted
/// form finds its outcome for as long as its token is accepted. The runtime needs
/// `.token_secret(..)`. See `idempotent_core::issued` for what a token guarantees (and that it is
/// not CSRF protection).
///
/// # Exempt routes
/// `#[idempotent(exempt = "why")]` marks a mutating-looking route as deliberately unprotected:
/// the handler is left as written but for one extra first argument, an extractor that tells
/// enforcement the handler is there, and a registry record with the reason is emitted, so reports
/// list it and enforcement accepts it. An exemption takes a non-empty reason, an optional `route`,
/// and none of the policy arguments.
///
/// # Handler shape
/// The handler must be a free `async fn` (no `self`). Its body argument is the one typed `Json`,
/// `Form`, `Bytes` or `String` (any path), or the one marked `#[body]` (a custom extractor; the
/// mark is removed); body fields must exist on it (reached through `.0` for `Json`/`Form`, by
/// auto-deref otherwise) and be `Serialize`. On axum the body argument is the last one; the
/// rewritten handler wraps the last argument in the adapter's `Protected` extractor (or adds one),
/// so it runs after the handler's own extractors and reads the body once for both.
///
/// # Errors
/// Every mistake is a compile error at the offending argument, value or field; the handler is then
/// left as written so no further errors follow from the first.
#[proc_macro_attribute]
pub fn idempotent_axum(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(Framework::Axum, attr.into(), item.into()).into()
}

/// Makes an actix-web handler safe to retry; re-exported as `idempotent_actix::idempotent`.
///
/// Takes the same arguments as [`macro@idempotent_axum`]. When `route` is absent (for a protected
/// or an exempt route), the method and
/// path are read from an actix-web routing attribute written below this one (`#[post("/path")]`,
/// `#[put]`, `#[patch]`, `#[delete]`, or `#[route("/path", method = "POST")]`); write
/// `#[idempotent]` above the routing attribute so it can see it.
#[proc_macro_attribute]
pub fn idempotent_actix(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(Framework::Actix, attr.into(), item.into()).into()
}

/// Makes a NATS JetStream consumer's handler run once per message key; re-exported as
/// `idempotent_nats::idempotent`.
///
/// Takes the arguments of [`macro@idempotent_axum`] that apply to a message (`scope`, `fields`
/// of the body, `exclude = [body]`, `ttl`, `lease`, `store`, `fail_open`, `transactional`), and
/// requires `key`: where a message's key comes from, `header("Nats-Msg-Id")` (or any header),
/// `field(path)`, a composite `[field(a), field(b)]`, or `derived` (the message itself). `route`,
/// `on_conflict`, `wait_timeout` and `exempt` do not apply to a consumer.
///
/// The handler is an `async fn` whose arguments are taken from the delivery (`Json<T>` decodes
/// the body; `State<S>`, `Fence`, `Tx`, the headers and the delivery's info are the others) and
/// which returns `Result<R, ConsumeError>` where `R` is its reply (`()`, `String`, `Json<T>`..).
/// It becomes a constant of the same name, the `Handler` its runner takes.
#[proc_macro_attribute]
pub fn idempotent_nats(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(Framework::Nats, attr.into(), item.into()).into()
}

/// Makes a RabbitMQ (AMQP 0-9-1) consumer's handler run once per message key; re-exported as
/// `idempotent_rabbitmq::idempotent`.
///
/// The same arguments as [`macro@idempotent_nats`]; the key's header may be a header of the
/// message's header table or one of its properties (`message-id`, `correlation-id`, `type`,
/// `app-id`, `user-id`, as the runner presents them).
#[proc_macro_attribute]
pub fn idempotent_rabbitmq(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(Framework::RabbitMq, attr.into(), item.into()).into()
}
