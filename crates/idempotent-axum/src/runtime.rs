//! Installing the runtime and running a protected handler.

use crate::capture::{capture, problem_response, replay_response};
use crate::context::Context;
use axum::response::{IntoResponse, Response};
use idempotent_core::actor::ActorSource;
use idempotent_core::engine::{Config, Outcome, Request, Runtime, StartupError};
use idempotent_core::fingerprint::{Fingerprint, FingerprintError};
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

    /// The layer that installs this runtime on a router: `router.layer(idempotency.layer())`.
    pub fn layer(&self) -> axum::Extension<Runtime> {
        axum::Extension(self.runtime.clone())
    }

    /// The framework-free runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Documents every protected axum route on `openapi` (feature `utoipa`): the key header, under
    /// this runtime's header name, the problem responses and the replay header; returns how many
    /// operations were documented. See [`idempotent_core::openapi`].
    #[cfg(feature = "utoipa")]
    pub fn document_openapi(&self, openapi: &mut utoipa::openapi::OpenApi) -> usize {
        let configured = &self.runtime.config().header_name;
        let header = if configured.eq_ignore_ascii_case("idempotency-key") { "Idempotency-Key" } else { configured };
        let routes = idempotent_core::registry::routes_of(Framework::Axum);
        idempotent_core::openapi::document_with_header(openapi, &routes, header)
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

    /// Validates the route registry and the settings; refuses to start with one message per problem.
    pub fn build(self) -> Result<Idempotency, StartupError> {
        let runtime = Runtime::start(self.store, self.config, Framework::Axum)?;
        Ok(Idempotency { runtime })
    }
}

/// Runs a protected handler: called by the code `#[idempotent]` generates.
pub async fn run<F, T>(
    ctx: Context,
    policy: &'static Policy,
    fingerprint: Result<Fingerprint, FingerprintError>,
    handler: F,
) -> Response
where
    F: Future<Output = T> + Send + 'static,
    T: IntoResponse,
{
    let Some(runtime) = ctx.runtime else {
        tracing::error!(scope = policy.scope, "idempotency runtime not installed on this router");
        return problem_response(&Problem::new(
            ProblemKind::Misconfigured,
            "The server has no idempotency runtime installed for this route; this is a server configuration bug.",
        ));
    };
    let request = Request { key: ctx.key, actor: ctx.actor, fingerprint };
    let max = runtime.config().max_stored_body;
    // Spawned so that a client disconnect, which drops this future, does not cancel the
    // handler between its side effects and the recording of its outcome.
    let task = tokio::spawn(async move {
        let handler = async move { capture(handler.await.into_response(), max).await };
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
