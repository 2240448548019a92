//! Installing the runtime and running a protected handler.

use crate::{Context, Idempotency};
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use idempotent_core::engine::Runtime;
use idempotent_core::fingerprint::{Fingerprint, FingerprintError};
use idempotent_core::policy::Policy;
use idempotent_core::protocol::{self, ResponseBody};
use idempotent_core::registry::{Framework, Site};
use std::future::Future;

impl Idempotency {
    /// The layer that installs this runtime on a router: `router.layer(idempotency.layer())`.
    pub fn layer(&self) -> axum::Extension<Runtime> {
        axum::Extension(self.runtime.clone())
    }
}

/// Runs a protected handler: called by the code `#[idempotent]` generates.
///
/// The protocol runs on a spawned task, so a client that disconnects (which drops this future)
/// cannot cancel the handler between its side effects and the recording of its outcome; the
/// runtime tracks the task, so [`Idempotency::drain`] waits for it at shutdown. The task runs in
/// the request's `idempotent.request` span, a child of the span current here.
pub async fn run<F, T>(
    context: Context,
    policy: &'static Policy,
    site: &'static Site,
    fingerprint: Result<Fingerprint, FingerprintError>,
    future: F,
) -> Response
where
    F: Future<Output = T> + Send + 'static,
    T: IntoResponse,
{
    let Some((runtime, caller)) = context.pending else {
        return protocol::runtime_missing(policy).map(Body::from);
    };
    protocol::observe(Framework::Axum, site, &context.incoming);
    let handler = async move { future.await.into_response() };
    let task = tokio::spawn(protocol::request_task(runtime, policy, caller, fingerprint, handler));
    match task.await {
        Ok(response) => response.map(|body| match body {
            // Bytes in hand and untouched bodies are sent as they are, without another box.
            ResponseBody::Full(bytes) => Body::from(bytes.unwrap_or_default()),
            ResponseBody::Stream { head: None, rest } => rest,
            streaming => Body::new(streaming),
        }),
        Err(e) => protocol::task_failed(policy, &e).map(Body::from),
    }
}

/// Handler serving the policy report of every route registered through this adapter:
/// `.route("/_idempotency/policies", get(policy_report))`. `?format=json` (default), `md` or
/// `html`; an unknown format is 400.
pub async fn policy_report(uri: http::Uri) -> Response {
    protocol::policy_report(Framework::Axum, uri.query()).map(Body::from)
}

/// Renders a [`Problem`](idempotent_core::problem::Problem) as an `application/problem+json`
/// response, for applications that want their own errors to look like the framework's.
pub fn render_problem(problem: &idempotent_core::problem::Problem) -> Response {
    protocol::problem_response(problem).map(Body::from)
}
