//! Installing the runtime and running a protected handler.

use crate::capture::{capture, problem_response, replay_response};
use crate::context::Context;
use axum::response::{IntoResponse, Response};
use idempotent_core::engine::{Adapter, Builder, Outcome, Request, Runtime};
use idempotent_core::fingerprint::{Fingerprint, FingerprintError};
use idempotent_core::policy::Policy;
use idempotent_core::problem::{Problem, ProblemKind};
use idempotent_core::registry::Framework;
use idempotent_core::store::Store;
use std::future::Future;
use std::sync::Arc;

/// The installed idempotency runtime; cheap to clone.
#[derive(Debug, Clone)]
pub struct Idempotency {
    runtime: Runtime,
}

/// Settings of an [`Idempotency`] runtime: header name, actor source, stored-body cap,
/// `Retry-After` of an unreachable store; `build` validates the routes written for this adapter.
pub type IdempotencyBuilder = Builder<Idempotency>;

impl Adapter for Idempotency {
    const FRAMEWORK: Framework = Framework::Axum;

    fn from_runtime(runtime: Runtime) -> Self {
        Self { runtime }
    }
}

impl Idempotency {
    /// Starts configuring a runtime on `store`.
    pub fn builder(store: Arc<dyn Store>) -> IdempotencyBuilder {
        Builder::new(store)
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
