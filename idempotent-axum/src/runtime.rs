//! Installing the runtime and running a protected handler.

use crate::extract::View;
use crate::{Context, Idempotency};
use axum::body::Body;
use axum::extract::{FromRequestParts, RawPathParams, Request};
use axum::response::{IntoResponse, Response};
use idempotent_core::protocol::{
    self, status, tokens, Fingerprint, FingerprintError, Framework, Policy, Problem, ResponseBody, Runtime, Site,
};
use std::future::Future;

impl Idempotency {
    /// The layer that installs this runtime on a router: `router.layer(idempotency.layer())`.
    pub fn layer(&self) -> axum::Extension<Runtime> {
        axum::Extension(self.runtime.clone())
    }
}

/// Runs a protected handler: called by the code `#[idempotent]` generates.
///
/// The protocol runs here until it first has to wait, then on a spawned task
/// ([`protocol::run_task`]), so a client that disconnects (which drops this future) cannot cancel
/// the handler between its side effects and the recording of its outcome; the
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
    let handler = async move { future.await.into_response() };
    let task = context.task(Framework::Axum, policy, site, fingerprint, handler);
    protocol::finish(policy, task, tokio::spawn).await.map(|body| match body {
        // Bytes in hand and untouched bodies are sent as they are, without another box.
        ResponseBody::Full(bytes) => Body::from(bytes.unwrap_or_default()),
        ResponseBody::Stream { head: None, rest } => rest,
        streaming => Body::new(streaming),
    })
}

/// Handler serving the policy report of every route registered through this adapter:
/// `.route("/_idempotency/policies", get(policy_report))`. `?format=json` (default), `md` or
/// `html`; an unknown format is 400.
pub async fn policy_report(uri: http::Uri) -> Response {
    protocol::policy_report(Framework::Axum, uri.query()).map(Body::from)
}

/// Handler of `GET /_idempotency/records/{scope}/{key}`: the caller's own record of `key` on
/// `scope` (state, stored status, times), 404 for any other caller's. The caller is known by the
/// same rule as on protected routes ([`protocol::identify_actor`]): an [`Actor`](crate::Actor) in the request's
/// extensions, set by the application's authentication middleware, else the configured actor
/// source. Mount it below [`Idempotency::layer`]:
/// `.route("/_idempotency/records/{scope}/{key}", get(record_status))`. An application whose
/// authentication is an extractor that inserts the [`Actor`](crate::Actor) calls it from a handler of its own,
/// after that extractor:
///
/// ```
/// # use axum::{extract::{FromRequestParts, Request}, http::request::Parts, response::Response};
/// # use idempotent_axum::{record_status, Actor};
/// struct Authenticated;
/// impl<S: Send + Sync> FromRequestParts<S> for Authenticated {
///     type Rejection = Response;
///     async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
///         parts.extensions.insert(Actor("acct_1".into())); // the verified caller
///         Ok(Authenticated)
///     }
/// }
/// async fn my_record_status(_: Authenticated, request: Request) -> Response {
///     record_status(request).await
/// }
/// ```
///
/// See [`protocol::status::record_status`] for the answers.
pub async fn record_status(request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let params = match RawPathParams::from_request_parts(&mut parts, &()).await {
        Ok(params) => params,
        Err(rejection) => return rejection.into_response(),
    };
    let param = |name: &str| params.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_owned()).unwrap_or_default();
    let (scope, key) = (param("scope"), param("key"));
    status::record_status_of(&View { parts: &parts, params: None }, &scope, &key).await.map(Body::from)
}

/// Handler of `POST /_idempotency/tokens` (`.route("/_idempotency/tokens", post(mint_token))`,
/// below [`Idempotency::layer`] and the application's authentication): body `{"scope": ".."}`,
/// 201 `{"scope", "token", "expires_at"}` for the caller, for a script to send as the form field
/// or header of a route declared `key = issued(..)`. Never cached; a body over 4 KiB is 413. It
/// is exempt from enforcement: a retried mint mints another token, bounded by the caller's
/// quota. See [`protocol::tokens::mint_of`] for the answers.
pub async fn mint_token(request: Request) -> Response {
    let (parts, body) = request.into_parts();
    idempotent_core::protocol::transport::exempt(parts.extensions.get());
    let body = match axum::body::to_bytes(body, 4096).await {
        Ok(body) => body,
        Err(e) => return protocol::transport::unreadable_body::<http_body_util::LengthLimitError>(&e).map(Body::from),
    };
    tokens::mint_of(&View { parts: &parts, params: None }, &body).await.map(Body::from)
}

/// Handler of a health check (`.route("/healthz", get(health))`, below [`Idempotency::layer`]):
/// 200 when the idempotency store answers, 503 problem+json when it does not.
pub async fn health(request: Request) -> Response {
    let (parts, _) = request.into_parts();
    status::health_of(&View { parts: &parts, params: None }).await.map(Body::from)
}

/// The `policies [--format md|json|html]` subcommand for your `main`: prints the policy report of
/// this binary's routes and answers the exit code, or `None` when the command line is something
/// else (then serve as usual).
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     if let Some(code) = idempotent_axum::policies_command() {
///         return code; // `my-service policies --format md` printed the report
///     }
///     // ... build the runtime and serve
///     std::process::ExitCode::SUCCESS
/// }
/// ```
pub fn policies_command() -> Option<std::process::ExitCode> {
    protocol::policies_command(Framework::Axum)
}

/// Renders a [`Problem`] as an `application/problem+json` response, for applications that want
/// their own errors to look like the framework's.
pub fn render_problem(problem: &Problem) -> Response {
    protocol::problem_response(problem).map(Body::from)
}
