//! Installing the runtime, running a protected handler, and the conversions between actix-web's
//! responses and the `http` types the protocol speaks.

use crate::{Context, Idempotency};
use actix_web::body::{BodySize, BodyStream, BoxBody, MessageBody};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, Responder};
use bytes::Bytes;
use idempotent_core::protocol::{
    self, status, tokens, Fingerprint, FingerprintError, Framework, Policy, Problem, RequestHead, ResponseBody,
    Runtime, Site,
};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

impl Idempotency {
    /// The application data that installs this runtime: `App::new().app_data(idempotency.data())`
    /// (`web::Data::new(idempotency)` works too). Set on a `web::scope`, it protects only the
    /// routes below it.
    pub fn data(&self) -> Idempotency {
        self.clone()
    }
}

/// The runtime installed as application data: `app_data(idempotency.data())` or
/// `app_data(web::Data::new(idempotency))`.
pub(crate) fn runtime_of(request: &HttpRequest) -> Option<Runtime> {
    let data = || request.app_data::<web::Data<Idempotency>>().map(|d| d.get_ref());
    request.app_data::<Idempotency>().or_else(data).map(|i| i.runtime().clone())
}

/// A protected request's actix-web request, as the protocol reads its head (and the handler's
/// response is made for it).
#[derive(Debug)]
pub struct Request(pub(crate) HttpRequest);

impl RequestHead for Request {
    fn header_values(&self, name: &str) -> Vec<&[u8]> {
        self.0.headers().get_all(name).map(|v| v.as_bytes()).collect()
    }
}

/// Runs a protected handler: called by the code `#[idempotent]` generates.
///
/// actix-web handlers are not `Send`, so the protocol runs here until it first has to wait, then
/// on the worker's local task set (`actix_web::rt::spawn`, see [`protocol::run_task`]): a client
/// that disconnects drops this future, not the task, so the
/// handler is never cancelled between its side effects and the recording of its outcome; the
/// runtime tracks the task, so [`Idempotency::drain`] waits for it at shutdown, and it runs in the
/// request's `idempotent.request` span, a child of the span current here. The key
/// and actor are read here, once every extractor of the handler has run, so an authentication
/// extractor anywhere in the argument list can set an [`Actor`](crate::Actor) first.
pub async fn run<F, T>(
    context: Context,
    policy: &'static Policy,
    site: &'static Site,
    fingerprint: Result<Fingerprint, FingerprintError>,
    future: F,
) -> HttpResponse
where
    F: Future<Output = T> + 'static,
    T: Responder + 'static,
{
    let request = context.head().0.clone();
    let handler = async move { from_actix(future.await.respond_to(&request).map_into_boxed_body()) };
    let task = context.task(Framework::Actix, policy, site, fingerprint, handler);
    into_actix(protocol::finish(policy, task, actix_web::rt::spawn).await)
}

/// Handler serving the policy report of every route registered through this adapter:
/// `.route("/_idempotency/policies", web::get().to(policy_report))`. `?format=json` (default),
/// `md` or `html`; an unknown format is 400.
pub async fn policy_report(request: HttpRequest) -> HttpResponse {
    reply(protocol::policy_report(Framework::Actix, Some(request.query_string())))
}

/// Handler of `GET /_idempotency/records/{scope}/{key}`: the caller's own record of `key` on
/// `scope` (state, stored status, times), 404 for any other caller's. The caller is known by the
/// same rule as on protected routes ([`protocol::identify_actor`]): an [`Actor`](crate::Actor) in the
/// request's extensions (set by the application's authentication middleware, or by an extractor
/// of a handler that calls this one after it: `async fn mine(_: Authenticated, r: HttpRequest)
/// -> HttpResponse { record_status(r).await }`), then the configured source:
/// `.route("/_idempotency/records/{scope}/{key}", web::get().to(record_status))`. See
/// [`protocol::status::record_status`] for the answers.
pub async fn record_status(request: HttpRequest) -> HttpResponse {
    let param = |name| protocol::decode_partly_encoded(request.match_info().get(name).unwrap_or_default()).into_owned();
    let (scope, key) = (param("scope"), param("key"));
    reply(status::record_status_of(&Request(request), &scope, &key).await)
}

/// Handler of `POST /_idempotency/tokens` (`.route("/_idempotency/tokens",
/// web::post().to(mint_token))`, where the runtime is installed, after the application's
/// authentication): body `{"scope": ".."}`, 201 `{"scope", "token", "expires_at"}` for the
/// caller, for a script to send as the form field or header of a route declared
/// `key = issued(..)`. Never cached; a body over 4 KiB is 413. It is exempt from enforcement: a
/// retried mint mints another token, bounded by the caller's quota. See
/// [`protocol::tokens::mint_of`] for the answers.
pub async fn mint_token(request: HttpRequest, body: web::Payload) -> HttpResponse {
    protocol::transport::exempt(actix_web::HttpMessage::extensions(&request).get());
    let body = match body.to_bytes_limited(4096).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => return reply(protocol::body_problem(false, &e)),
        Err(e) => return reply(protocol::body_problem(true, &e)),
    };
    reply(tokens::mint_of(&Request(request), &body).await)
}

/// Handler of a health check (`.route("/healthz", web::get().to(health))`): 200 when the
/// idempotency store answers, 503 problem+json when it does not.
pub async fn health(request: HttpRequest) -> HttpResponse {
    reply(status::health_of(&Request(request)).await)
}

/// The `policies [--format md|json|html]` subcommand for your `main`: prints the policy report of
/// this binary's routes and answers the exit code, or `None` when the command line is something
/// else (then serve as usual).
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     if let Some(code) = idempotent_actix::policies_command() {
///         return code; // `my-service policies --format md` printed the report
///     }
///     // ... build the runtime and serve
///     std::process::ExitCode::SUCCESS
/// }
/// ```
pub fn policies_command() -> Option<std::process::ExitCode> {
    protocol::policies_command(Framework::Actix)
}

/// Renders a [`Problem`] as an `application/problem+json` response, for applications that want
/// their own errors to look like the framework's.
pub fn render_problem(problem: &Problem) -> HttpResponse {
    reply(protocol::problem_response(problem))
}

/// An actix-web response body seen as an `http_body::Body`.
pub(crate) struct ActixBody(BoxBody);

impl http_body::Body for ActixBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.0).poll_next(cx).map(|chunk| chunk.map(|r| r.map(http_body::Frame::data)))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.0.size() {
            BodySize::None => http_body::SizeHint::with_exact(0),
            BodySize::Sized(n) => http_body::SizeHint::with_exact(n),
            BodySize::Stream => http_body::SizeHint::default(),
        }
    }
}

fn from_actix(response: HttpResponse) -> http::Response<ActixBody> {
    let (head, body) = response.into_parts();
    let headers = head.headers().iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    protocol::response_from_parts(head.status().as_u16(), headers, ActixBody(body))
}

/// A response of the protocol with its body in hand, as actix-web's.
pub(crate) fn reply(response: http::Response<Bytes>) -> HttpResponse {
    into_actix(response.map(ResponseBody::full))
}

/// Converts a response of the protocol to actix-web's; a body passed through untouched keeps its
/// own size (and so its `Content-Length`).
pub(crate) fn into_actix(response: http::Response<ResponseBody<ActixBody>>) -> HttpResponse {
    let (parts, body) = response.into_parts();
    let mut out =
        HttpResponse::build(StatusCode::from_u16(parts.status.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    for (name, value) in &parts.headers {
        out.append_header((name.as_str(), value.as_bytes()));
    }
    out.body(match body {
        ResponseBody::Full(bytes) => BoxBody::new(bytes.unwrap_or_default()),
        ResponseBody::Stream { head: None, rest } => rest.0,
        streaming => BoxBody::new(BodyStream::new(http_body_util::BodyDataStream::new(streaming))),
    })
}
