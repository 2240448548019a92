//! reqwest middleware for idempotent APIs: each mutating request is one logical operation, sent
//! under one `Idempotency-Key` for all its attempts and retried while retrying can help.
//!
//! ```no_run
//! use idempotent_client::{IdempotencyMiddleware, Outcome};
//! use reqwest_middleware::ClientBuilder;
//! use std::time::Duration;
//!
//! # async fn pay() -> Result<(), Box<dyn std::error::Error>> {
//! let client = ClientBuilder::new(reqwest::Client::new())
//!     .with(IdempotencyMiddleware::builder().max_attempts(5).attempt_timeout(Some(Duration::from_secs(5))).build())
//!     .build();
//!
//! // One payment, whatever happens on the way: a fresh UUIDv7 key is set once and kept for
//! // every attempt, so a retry after a lost response gets the stored answer, not a second charge.
//! let response = client
//!     .post("http://127.0.0.1:3000/payments")
//!     .bearer_auth("acct_demo")
//!     .json(&serde_json::json!({"amount": 1000, "currency": "EUR", "customer": "cus_1"}))
//!     .send()
//!     .await?;
//! let outcome = Outcome::of(&response).expect("set on every POST the middleware handled");
//! println!("{} in {} attempt(s), replayed: {}", response.status(), outcome.attempts(), outcome.replayed());
//! println!("{}", response.text().await?);
//! # Ok(())
//! # }
//! ```
//!
//! # What it does
//!
//! For `POST` and `PATCH` (and `PUT`, `DELETE` or any method added with
//! [`Builder::protect`]) the middleware:
//!
//! - sets `Idempotency-Key` to a fresh UUIDv7 unless the caller set one (then the caller's key is
//!   used as it is), once per logical operation, and sends every attempt with it;
//! - retries what may succeed when sent again (see [`retry::classify`]): a connection that could
//!   not be opened, a timeout, a connection reset or closed before the whole response arrived
//!   (the response body is read to its end inside the middleware, so a body cut short is retried
//!   too), a `409` whose problem `type` is `urn:idempotent:problem:in-progress`, `429` and `503`.
//!   Everything else is the operation's answer and is returned at once: `400`, `422`, any other
//!   `409`, every `2xx`, and other `4xx`/`5xx`;
//! - waits what the server asked for (`Retry-After` in seconds, else the `retry_after` member of
//!   an `application/problem+json` body), otherwise exponential backoff with full jitter, within
//!   a bound on attempts and one on total time ([`RetryPolicy`]);
//! - reports on the response, as an [`Outcome`] extension, whether it is a replay
//!   (`Idempotent-Replayed: true`), how many attempts it took and the key used;
//! - emits `tracing` events: a span per operation (method, URL without query, and the key as a
//!   short SHA-256 digest, never in clear), one event per attempt (`debug` for the answer, `info`
//!   for a retry and its wait, `warn` when giving up);
//! - refuses a streaming body ([`Error::NonReplayableBody`]): it could not be sent a second time,
//!   so the operation would silently lose its protection against lost responses;
//! - reads a response body of at most [`Builder::max_response_body`] bytes
//!   ([`DEFAULT_MAX_RESPONSE_BODY`], 16 MiB, by default), since it holds the whole body in memory:
//!   a longer one is [`Error::ResponseTooLarge`], and is not sent again.
//!
//! Other methods pass through untouched. When the retries are exhausted, the last response is
//! returned as it is (a `503`, say, with its [`Outcome`]); if the last attempt got no response the
//! error is [`Error::GaveUp`], found with [`Error::of`].
//!
//! Its errors and logs show a request's URL as scheme, host, port and path, never its credentials,
//! query or fragment (which may hold tokens): the errors of its own, and reqwest's errors it
//! returns or keeps as a cause, whose URL it cuts the same way.
//!
//! The retry decision and the backoff schedule are pure functions in [`retry`], with no clock and
//! no randomness of their own.
//!
//! # Compared with `reqwest-retry`
//!
//! `reqwest-retry` (0.9) retries any request on transient failures: connection errors, timeouts,
//! `408`, `429` and every `5xx`, with a `RetryPolicy` from `retry-policies`. It is built for
//! requests that are safe to repeat by themselves. For a mutating call to an idempotent API it
//! does not:
//!
//! - give the operation a key: a retried `POST` without one runs twice on the server, and a key
//!   set by another middleware placed inside the retry loop changes with each attempt, which
//!   defeats it. Here the key is chosen once, before the first attempt;
//! - retry `409` in-progress: it is a `4xx`, so fatal, and the caller gets the conflict of its
//!   own earlier attempt instead of the stored answer a moment later;
//! - honour `Retry-After`, from the header or from a problem response's `retry_after`: its
//!   schedule comes from the policy alone;
//! - retry a response whose body is cut after the headers: it returns the response as soon as
//!   the headers arrive, and the failure surfaces later, on `bytes()`, outside any retry.
//!
//! Both refuse a request whose body cannot be cloned, with an error rather than a single silent
//! try; here only for the protected methods, and the error ([`Error::NonReplayableBody`]) says
//! which request and what to do. Conversely, this middleware does not retry `500`, `502`, `504`
//! or `408`: they are returned as the operation's answer, and the caller decides. Sending the
//! same request again under [`Outcome::key`] is safe: the server replays what it stored, or runs
//! the operation once if it had released the key.
//!
//! # Dependencies and why
//!
//! `reqwest-middleware` (0.5, the release built on reqwest 0.13) is the extension point, with
//! `async-trait` for its trait. `reqwest` and `http` are the types it works on, and `bytes` the
//! buffered bodies. `tokio` (`time`) sleeps between attempts and bounds each one, `uuid` (`v7`)
//! makes keys that sort by creation time, `serde_json` reads a problem body's `type` and
//! `retry_after`, `sha2` digests keys for logs, `tracing` emits the events and `thiserror`
//! derives the error. Jitter comes from the standard library's randomly keyed hasher, so there
//! is no random number crate.
//!
//! No part of the server runtime: the few names of the protocol the client reads ([`KEY_HEADER`],
//! [`REPLAYED_HEADER`], [`PROBLEM_CONTENT_TYPE`], [`retry::IN_PROGRESS_PROBLEM`]) are constants of
//! its own, and a test of the workspace (`tests/tests/client_protocol.rs`) checks that they are
//! the ones `idempotent-core` answers with. An application that only calls such an API builds no
//! store, engine or database driver.

mod middleware;
pub mod retry;

pub use middleware::{Builder, IdempotencyMiddleware, DEFAULT_MAX_RESPONSE_BODY};
/// The middleware framework this crate plugs into (0.5, on reqwest 0.13): a client is built with
/// its `ClientBuilder`.
pub use reqwest_middleware;
pub use retry::RetryPolicy;

use http::Method;
use retry::GiveUpReason;
use std::fmt;
use std::time::Duration;

/// The header that carries the key by default, as servers built on `idempotent` read it
/// (`Idempotency-Key`; header names are case-insensitive).
pub const KEY_HEADER: &str = "idempotency-key";

/// The header on a replayed response: `Idempotent-Replayed: true`.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The media type of problem responses (RFC 9457), whose `type` and `retry_after` are read.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// What the middleware reports on each response to a request it handled, as a response
/// extension: read it with [`Outcome::of`].
#[derive(Clone)]
pub struct Outcome {
    pub(crate) key: String,
    pub(crate) replayed: bool,
    pub(crate) attempts: u32,
    pub(crate) elapsed: Duration,
}

impl Outcome {
    /// The outcome reported on `response`; `None` when the middleware did not handle the request
    /// (a method it does not protect, or a client without the middleware).
    pub fn of(response: &reqwest::Response) -> Option<&Outcome> {
        response.extensions().get::<Outcome>()
    }

    /// Whether the server answered with a stored response (`Idempotent-Replayed: true`): the
    /// operation had run before, on an earlier attempt or an earlier call with the same key.
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// Attempts made, this one included (1 when the first attempt answered).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The `Idempotency-Key` every attempt was sent with: the caller's, or the one generated.
    /// Keep it to resume the operation later; do not log it.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Time from the start of the first attempt to the end of the last one.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outcome")
            .field("key", &format_args!("{}", middleware::KeyDigest::of(self.key.as_bytes())))
            .field("replayed", &self.replayed)
            .field("attempts", &self.attempts)
            .field("elapsed", &self.elapsed)
            .finish()
    }
}

/// Errors of the middleware itself. They reach the caller inside
/// `reqwest_middleware::Error::Middleware`; [`Error::of`] finds them there.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request body is a stream: it cannot be sent a second time, so the operation could not
    /// be retried after a lost response. Nothing was sent.
    #[error(
        "{method} {url}: the request body is a stream, which cannot be sent again if the response is lost; \
         give the body as bytes (`body(Vec<u8>)`, `json`, `form`) to send it under an idempotency key"
    )]
    NonReplayableBody {
        /// The request's method.
        method: Method,
        /// The request's URL, without credentials, query or fragment.
        url: String,
    },
    /// The response's body is longer than [`Builder::max_response_body`] allows: it was not
    /// read, and the request is not sent again. The server answered, so the operation may have
    /// run; raise the limit if such answers are expected.
    #[error(
        "{method} {url}: the response ({status}) has a body longer than {limit} bytes, the most this client reads \
         (`max_response_body`); it was not read and the request was not sent again"
    )]
    ResponseTooLarge {
        /// The request's method.
        method: Method,
        /// The request's URL, without credentials, query or fragment.
        url: String,
        /// The response's status.
        status: http::StatusCode,
        /// The limit in force, in bytes.
        limit: usize,
    },
    /// The last attempt got no response and the policy allows no further one. The operation may
    /// or may not have run: to resume it later, send it again under the same key (set the key on
    /// the request yourself when you may need to resume; errors do not carry it, so that logging
    /// one never leaks it).
    #[error("{method} {url}: gave up after {attempts} attempt(s) in {elapsed:?}: {reason}")]
    GaveUp {
        /// The request's method.
        method: Method,
        /// The request's URL, without credentials, query or fragment.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// Time from the start of the first attempt to the end of the last one.
        elapsed: Duration,
        /// The bound that ended the retries.
        reason: GiveUpReason,
        /// Why the last attempt failed (its URL, too, without credentials, query or fragment).
        #[source]
        source: AttemptError,
    },
}

impl Error {
    /// The middleware's error inside `error`, if it is one.
    pub fn of(error: &reqwest_middleware::Error) -> Option<&Error> {
        match error {
            reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<Error>(),
            reqwest_middleware::Error::Reqwest(_) => None,
        }
    }
}

/// Why an attempt got no response.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttemptError {
    /// No complete response within [`RetryPolicy::attempt_timeout`].
    #[error("no complete response within {0:?}")]
    TimedOut(Duration),
    /// The transport (or another middleware down the chain) failed.
    #[error(transparent)]
    Transport(reqwest_middleware::Error),
}
