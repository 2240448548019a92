//! Installing the runtime and running a protected handler.

use crate::capture::{capture, problem_response, replay_response};
use crate::context::Context;
use axum::response::{IntoResponse, Response};
use idempotent_core::actor::ActorSource;
use idempotent_core::engine::{Config, Outcome, Request, Runtime};
use idempotent_core::fingerprint::{Fingerprint, FingerprintError};
use idempotent_core::policy::Policy;
use idempotent_core::problem::{Problem, ProblemKind};
use idempotent_core::registry::{self, RegistryError};
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

/// Why the runtime refused to start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The route registry has problems; one line each.
    #[error("invalid idempotency policies:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Registry(Vec<RegistryError>),
    /// The header name is not a valid HTTP header name.
    #[error("invalid idempotency key header name `{0}`")]
    HeaderName(String),
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
        if http::HeaderName::from_bytes(self.config.header_name.as_bytes()).is_err() {
            return Err(StartupError::HeaderName(self.config.header_name));
        }
        registry::validate_framework(registry::Framework::Axum).map_err(StartupError::Registry)?;
        Ok(Idempotency { runtime: Runtime::new(self.store, self.config) })
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
