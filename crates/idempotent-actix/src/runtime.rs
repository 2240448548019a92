//! Installing the runtime and running a protected handler.

use crate::capture::{capture, problem_response, replay_response};
use crate::context::Context;
use actix_web::http::header::HeaderMap;
use actix_web::{HttpMessage, HttpResponse, Responder};
use idempotent_core::actor::{Actor, ActorSource, RequestHead};
use idempotent_core::engine::{Config, Outcome, Request, Runtime, StartupError};
use idempotent_core::fingerprint::{Fingerprint, FingerprintError};
use idempotent_core::key::IdempotencyKey;
use idempotent_core::policy::Policy;
use idempotent_core::problem::{Problem, ProblemKind};
use idempotent_core::registry::Framework;
use idempotent_core::store::Store;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// The installed idempotency runtime; cheap to clone.
#[derive(Debug, Clone)]
pub struct Idempotency {
    runtime: Runtime,
}

/// Settings of an [`Idempotency`] runtime.
pub struct IdempotencyBuilder {
    store: Arc<dyn Store>,
    config: Config,
}

impl std::fmt::Debug for IdempotencyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyBuilder").field("store", &self.store.name()).field("config", &self.config).finish()
    }
}

impl Idempotency {
    /// Starts configuring a runtime on `store`.
    pub fn builder(store: Arc<dyn Store>) -> IdempotencyBuilder {
        IdempotencyBuilder { store, config: Config::default() }
    }

    /// The application data that installs this runtime:
    /// `App::new().app_data(idempotency.data())`. It may also be set on a `web::scope`, which
    /// then protects only the routes below it.
    pub fn data(&self) -> Idempotency {
        self.clone()
    }

    /// The framework-free runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }
}

impl IdempotencyBuilder {
    /// Name of the key header (default `Idempotency-Key`).
    pub fn header_name(mut self, name: &str) -> Self {
        self.config.header_name = name.to_ascii_lowercase();
        self
    }

    /// Where the caller's identity comes from when no [`Actor`](crate::Actor) extension is set.
    pub fn actor(mut self, source: ActorSource) -> Self {
        self.config.actor = source;
        self
    }

    /// Largest response body stored for replay (default 1 MiB).
    pub fn max_stored_body(mut self, bytes: usize) -> Self {
        self.config.max_stored_body = bytes;
        self
    }

    /// `Retry-After` sent with 503 when the store is unreachable (default 2s).
    pub fn store_retry_after(mut self, after: Duration) -> Self {
        self.config.store_retry_after = after;
        self
    }

    /// Validates the route registry (the routes written for this adapter) and the settings;
    /// refuses to start with one message per problem.
    pub fn build(self) -> Result<Idempotency, StartupError> {
        let runtime = Runtime::start(self.store, self.config, Framework::Actix)?;
        Ok(Idempotency { runtime })
    }
}

struct Head<'a>(&'a HeaderMap);

impl RequestHead for Head<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(|v| v.as_bytes())
    }
}

/// Runs a protected handler: called by the code `#[idempotent]` generates.
///
/// actix-web handlers are not `Send`, so the execution is spawned on the worker's local task set
/// (`actix_web::rt::spawn`): a client that disconnects drops this future, not the task, so the
/// handler is never cancelled between its side effects and the recording of its outcome.
pub async fn run<F, T>(
    ctx: Context,
    policy: &'static Policy,
    fingerprint: Result<Fingerprint, FingerprintError>,
    handler: F,
) -> HttpResponse
where
    F: Future<Output = T> + 'static,
    T: Responder + 'static,
{
    let Some(runtime) = ctx.runtime else {
        tracing::error!(scope = policy.scope, "idempotency runtime not installed on this app");
        return problem_response(&Problem::new(
            ProblemKind::Misconfigured,
            "The server has no idempotency runtime installed for this route; this is a server configuration bug.",
        ));
    };
    let req = ctx.request;
    let headers = req.headers();
    let config = runtime.config();
    let key = IdempotencyKey::from_header_values(headers.get_all(config.header_name.as_str()).map(|v| v.as_bytes()));
    let actor = match req.extensions().get::<Actor>() {
        Some(a) => Some(a.0.clone()),
        None => config.actor.resolve(&Head(headers)),
    };
    let request = Request { key, actor, fingerprint };
    let max = config.max_stored_body;
    let task = actix_web::rt::spawn(async move {
        let handler = async move { capture(handler.await.respond_to(&req).map_into_boxed_body(), max).await };
        runtime.execute(policy, request, handler).await
    });
    match task.await {
        Ok(Outcome::Executed(response)) => response,
        Ok(Outcome::Replayed(stored)) => replay_response(stored),
        Ok(Outcome::Problem(problem)) => problem_response(&problem),
        Err(e) => {
            tracing::error!(scope = policy.scope, error = %e, "idempotent execution task failed");
            problem_response(&Problem::new(
                ProblemKind::HandlerPanicked,
                "The request failed before completing. Retry with the same key.",
            ))
        }
    }
}
