//! Installing the runtime and running a protected handler.

use crate::capture::{capture, problem_response, replay_response};
use crate::context::Context;
use actix_web::http::header::HeaderMap;
use actix_web::{HttpMessage, HttpResponse, Responder};
use idempotent_core::actor::{Actor, RequestHead};
use idempotent_core::engine::{Adapter, Builder, Outcome, Request, Runtime};
use idempotent_core::fingerprint::{Fingerprint, FingerprintError};
use idempotent_core::key::IdempotencyKey;
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
    const FRAMEWORK: Framework = Framework::Actix;

    fn from_runtime(runtime: Runtime) -> Self {
        Self { runtime }
    }
}

impl Idempotency {
    /// Starts configuring a runtime on `store`.
    pub fn builder(store: Arc<dyn Store>) -> IdempotencyBuilder {
        Builder::new(store)
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
