//! The middleware: a key per logical operation, and the retry loop around the rest of the chain.

use crate::retry::{decide, Answer, Decision, GiveUpReason, Jitter, Observed, RandomJitter, RetryPolicy};
use crate::{AttemptError, Error, Outcome};
use bytes::Bytes;
use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use reqwest::{Request, Response, ResponseBuilderExt, Url};
use reqwest_middleware::{Middleware, Next};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// reqwest middleware that sends each mutating request as one logical operation: under one
/// `Idempotency-Key` for all its attempts, retried while retrying can help and the
/// [`RetryPolicy`] allows it.
///
/// Requests whose method is not protected (by default everything but `POST` and `PATCH`) pass
/// through untouched. Cloning is cheap: the configuration is shared.
#[derive(Clone)]
pub struct IdempotencyMiddleware {
    config: Arc<Config>,
}

struct Config {
    header: HeaderName,
    methods: Vec<Method>,
    policy: RetryPolicy,
    jitter: Arc<dyn Jitter>,
    max_response_body: usize,
}

/// The default of [`Builder::max_response_body`]: 16 MiB.
///
/// The middleware holds each response body whole in memory before handing the response back (so
/// that a body cut short is retried like any lost response), so without a bound a misbehaving or
/// hostile server could make every operation allocate as much as it sends. Answers to mutating
/// calls are small documents: a server built on `idempotent` stores at most 1 MiB of body to
/// replay by default, and 16 MiB leaves room for far larger ones.
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 16 * 1024 * 1024;

impl fmt::Debug for IdempotencyMiddleware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyMiddleware")
            .field("header", &self.config.header)
            .field("methods", &self.config.methods)
            .field("policy", &self.config.policy)
            .field("max_response_body", &self.config.max_response_body)
            .finish_non_exhaustive()
    }
}

impl Default for IdempotencyMiddleware {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl IdempotencyMiddleware {
    /// The middleware with every default: header `Idempotency-Key`, `POST` and `PATCH` protected,
    /// [`RetryPolicy::default`], random jitter.
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder starting from the defaults.
    pub fn builder() -> Builder {
        Builder {
            header: HeaderName::from_static(crate::KEY_HEADER),
            methods: vec![Method::POST, Method::PATCH],
            policy: RetryPolicy::default(),
            jitter: Arc::new(RandomJitter),
            max_response_body: DEFAULT_MAX_RESPONSE_BODY,
        }
    }

    /// The retry policy in force.
    pub fn policy(&self) -> &RetryPolicy {
        &self.config.policy
    }

    /// The largest response body it reads, in bytes ([`Builder::max_response_body`]).
    pub fn max_response_body(&self) -> usize {
        self.config.max_response_body
    }
}

/// Configures an [`IdempotencyMiddleware`].
#[must_use = "a builder does nothing until `build` is called"]
pub struct Builder {
    header: HeaderName,
    methods: Vec<Method>,
    policy: RetryPolicy,
    jitter: Arc<dyn Jitter>,
    max_response_body: usize,
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("header", &self.header)
            .field("methods", &self.methods)
            .field("policy", &self.policy)
            .field("max_response_body", &self.max_response_body)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// The key header, for servers configured with another name. Default `Idempotency-Key`.
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// Protects `method` too. `POST` and `PATCH` always are; add `PUT` or `DELETE` when the server
    /// protects them (a `PUT` that replaces a resource is idempotent by itself and needs no key).
    pub fn protect(mut self, method: Method) -> Self {
        if !self.methods.contains(&method) {
            self.methods.push(method);
        }
        self
    }

    /// The whole retry policy.
    pub fn policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// [`RetryPolicy::max_attempts`]: attempts in all, the first one included.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.policy.max_attempts = attempts;
        self
    }

    /// [`RetryPolicy::max_elapsed`]: the time budget of one operation.
    pub fn max_elapsed(mut self, budget: Duration) -> Self {
        self.policy.max_elapsed = budget;
        self
    }

    /// [`RetryPolicy::attempt_timeout`]: the time one attempt may take (`None`: no limit of the
    /// middleware's own).
    pub fn attempt_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.policy.attempt_timeout = timeout;
        self
    }

    /// [`RetryPolicy::base_delay`] and [`RetryPolicy::max_delay`]: the backoff's first ceiling and
    /// its cap.
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.policy.base_delay = base;
        self.policy.max_delay = max;
        self
    }

    /// The jitter source (default [`RandomJitter`]); a [`FixedJitter`](crate::retry::FixedJitter)
    /// makes the schedule deterministic.
    pub fn jitter(mut self, jitter: impl Jitter) -> Self {
        self.jitter = Arc::new(jitter);
        self
    }

    /// The largest response body read for a protected request, in bytes; default
    /// [`DEFAULT_MAX_RESPONSE_BODY`] (16 MiB, see there why). A larger body is not read: the
    /// request fails with [`Error::ResponseTooLarge`](crate::Error::ResponseTooLarge) and is not
    /// sent again.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_response_body = bytes;
        self
    }

    /// The middleware.
    pub fn build(self) -> IdempotencyMiddleware {
        IdempotencyMiddleware {
            config: Arc::new(Config {
                header: self.header,
                methods: self.methods,
                policy: self.policy,
                jitter: self.jitter,
                max_response_body: self.max_response_body,
            }),
        }
    }
}

#[async_trait::async_trait]
impl Middleware for IdempotencyMiddleware {
    async fn handle(
        &self,
        req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if !self.config.methods.contains(req.method()) {
            return next.run(req, extensions).await;
        }
        self.operation(req, extensions, next).await
    }
}

impl IdempotencyMiddleware {
    async fn operation(
        &self,
        mut req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if req.try_clone().is_none() {
            let err = Error::NonReplayableBody { method: req.method().clone(), url: LogUrl(req.url()).to_string() };
            tracing::warn!(method = %req.method(), url = %LogUrl(req.url()), "{err}");
            return Err(reqwest_middleware::Error::middleware(err));
        }
        let header = &self.config.header;
        let key = match req.headers().get(header) {
            Some(caller) => caller.clone(),
            None => {
                let fresh = uuid::Uuid::now_v7().hyphenated().to_string();
                let value = HeaderValue::from_str(&fresh).expect("a UUID's text is hex digits and hyphens");
                req.headers_mut().insert(header.clone(), value.clone());
                value
            }
        };
        let digest = KeyDigest::of(key.as_bytes());
        let span = tracing::info_span!(
            "idempotent_operation",
            method = %req.method(),
            url = %LogUrl(req.url()),
            key = %digest,
        );
        let key = String::from_utf8_lossy(key.as_bytes()).into_owned();
        self.attempts(req, key, extensions, next).instrument(span).await
    }

    async fn attempts(
        &self,
        req: Request,
        key: String,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let policy = &self.config.policy;
        let started = tokio::time::Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let Some(this) = req.try_clone() else {
                // Checked before the first attempt; a body cannot turn into a stream.
                let err = Error::NonReplayableBody { method: req.method().clone(), url: LogUrl(req.url()).to_string() };
                return Err(reqwest_middleware::Error::middleware(err));
            };
            let (result, observed) = self.attempt(this, extensions, next.clone()).await;
            let elapsed = started.elapsed();
            let decision = decide(policy, attempts, elapsed, &observed, self.config.jitter.fraction());
            let error = result.as_ref().err().map(|e| Cause(e).to_string());
            let error = error.as_deref();
            let elapsed_ms = elapsed.as_millis() as u64;
            let outcome =
                |buffered: &Buffered| Outcome { key: key.clone(), replayed: buffered.replayed(), attempts, elapsed };
            match decision {
                Decision::RetryAfter(wait) => {
                    tracing::info!(
                        attempt = attempts,
                        outcome = %observed,
                        error,
                        elapsed_ms,
                        wait_ms = wait.as_millis() as u64,
                        "attempt failed; retrying under the same key",
                    );
                    drop(result);
                    tokio::time::sleep(wait).await;
                }
                Decision::Return => {
                    return match result {
                        Ok(buffered) => {
                            let outcome = outcome(&buffered);
                            tracing::debug!(
                                attempt = attempts,
                                outcome = %observed,
                                replayed = outcome.replayed,
                                elapsed_ms,
                                "operation answered",
                            );
                            buffered.into_response(outcome)
                        }
                        Err(AttemptError::Transport(e)) => {
                            tracing::debug!(attempt = attempts, outcome = %observed, error, "attempt failed; not retryable");
                            Err(e)
                        }
                        // Not reached: a timed-out attempt is always retryable.
                        Err(e) => Err(gave_up(&req, attempts, elapsed, GiveUpReason::Attempts, e)),
                    };
                }
                Decision::GiveUp(reason) => {
                    tracing::warn!(
                        attempt = attempts,
                        outcome = %observed,
                        error,
                        elapsed_ms,
                        %reason,
                        "giving up on the operation",
                    );
                    return match result {
                        Ok(buffered) => {
                            let outcome = outcome(&buffered);
                            buffered.into_response(outcome)
                        }
                        Err(e) => Err(gave_up(&req, attempts, elapsed, reason, e)),
                    };
                }
            }
        }
    }

    /// One attempt: the rest of the chain, then the whole response body, within the attempt
    /// timeout.
    async fn attempt(
        &self,
        req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> (Result<Buffered, AttemptError>, Observed) {
        let (method, url) = (req.method().clone(), LogUrl(req.url()).to_string());
        let limit = self.config.max_response_body;
        let exchange = async {
            let response = next.run(req, extensions).await.map_err(redacted)?;
            match Buffered::read(response, limit).await {
                Ok(Ok(buffered)) => Ok(buffered),
                Ok(Err(status)) => {
                    let too_large = Error::ResponseTooLarge { method, url, status, limit };
                    Err(reqwest_middleware::Error::middleware(too_large))
                }
                Err(e) => Err(redacted(reqwest_middleware::Error::Reqwest(e))),
            }
        };
        let result = match self.config.policy.attempt_timeout {
            Some(limit) => match tokio::time::timeout(limit, exchange).await {
                Ok(r) => r.map_err(AttemptError::Transport),
                Err(_) => Err(AttemptError::TimedOut(limit)),
            },
            None => exchange.await.map_err(AttemptError::Transport),
        };
        let observed = match &result {
            Ok(b) => Observed::Response(Answer::from_parts(b.status, &b.headers, &b.body)),
            Err(e) => observe(e),
        };
        (result, observed)
    }
}

/// `error` with the URL it names cut to what logs show ([`LogUrl`]): reqwest's errors display
/// the request's whole URL, credentials and query included, and every error of the middleware
/// (a give-up's cause, or a failure returned as it is) may end up in a log.
fn redacted(error: reqwest_middleware::Error) -> reqwest_middleware::Error {
    match error {
        reqwest_middleware::Error::Reqwest(mut e) => {
            if let Some(url) = e.url_mut() {
                let _ = url.set_username("");
                let _ = url.set_password(None);
                url.set_query(None);
                url.set_fragment(None);
            }
            reqwest_middleware::Error::Reqwest(e)
        }
        other => other,
    }
}

fn gave_up(
    req: &Request,
    attempts: u32,
    elapsed: Duration,
    reason: GiveUpReason,
    source: AttemptError,
) -> reqwest_middleware::Error {
    let (method, url) = (req.method().clone(), LogUrl(req.url()).to_string());
    reqwest_middleware::Error::middleware(Error::GaveUp { method, url, attempts, elapsed, reason, source })
}

/// What a failed attempt means for the retry decision.
fn observe(error: &AttemptError) -> Observed {
    match error {
        AttemptError::TimedOut(_) => Observed::Timeout,
        AttemptError::Transport(reqwest_middleware::Error::Reqwest(e)) => {
            if e.is_builder() || e.is_redirect() || e.is_status() {
                Observed::Fatal
            } else if e.is_timeout() {
                Observed::Timeout
            } else if e.is_connect() {
                Observed::Connect
            } else {
                // Reset, closed before the answer, a body cut short or undecodable: the request
                // may have reached the server.
                Observed::Lost
            }
        }
        AttemptError::Transport(reqwest_middleware::Error::Middleware(_)) => Observed::Fatal,
    }
}

/// A response read to its last byte, so that a body lost mid-flight is retried like any other
/// lost response, then handed back as a `reqwest::Response`.
struct Buffered {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    extensions: Extensions,
    url: Url,
    body: Bytes,
}

impl Buffered {
    /// Reads `response` to its end, or `Ok(Err(status))` as soon as its body is known to be
    /// longer than `limit` bytes (from its `Content-Length`, else while reading it).
    async fn read(mut response: Response, limit: usize) -> reqwest::Result<Result<Self, StatusCode>> {
        let status = response.status();
        if response.content_length().is_some_and(|length| length > limit as u64) {
            return Ok(Err(status));
        }
        let version = response.version();
        let headers = response.headers().clone();
        let extensions = std::mem::take(response.extensions_mut());
        let url = response.url().clone();
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut length = 0usize;
        while let Some(chunk) = response.chunk().await? {
            length += chunk.len();
            if length > limit {
                return Ok(Err(status));
            }
            chunks.push(chunk);
        }
        let body = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop().unwrap_or_default(),
            _ => chunks.concat().into(),
        };
        Ok(Ok(Self { status, version, headers, extensions, url, body }))
    }

    fn replayed(&self) -> bool {
        self.headers
            .get(crate::REPLAYED_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }

    fn into_response(self, outcome: Outcome) -> reqwest_middleware::Result<Response> {
        let mut builder = http::Response::builder().status(self.status).version(self.version).url(self.url);
        if let Some(headers) = builder.headers_mut() {
            *headers = self.headers;
        }
        if let Some(extensions) = builder.extensions_mut() {
            extensions.extend(self.extensions);
            extensions.insert(outcome);
        }
        builder.body(reqwest::Body::from(self.body)).map(Response::from).map_err(reqwest_middleware::Error::middleware)
    }
}

/// A key as it may appear in logs: the first 12 hex digits of its SHA-256, enough to correlate
/// the attempts of one operation and nothing to replay it with.
pub(crate) struct KeyDigest([u8; 6]);

impl KeyDigest {
    pub(crate) fn of(key: &[u8]) -> Self {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(key);
        let mut short = [0u8; 6];
        short.copy_from_slice(&hash[..6]);
        Self(short)
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A failed attempt's causes as logs show them: the chain of underlying errors, without the
/// request's URL (whose query may carry secrets).
struct Cause<'a>(&'a AttemptError);

impl fmt::Display for Cause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let AttemptError::Transport(reqwest_middleware::Error::Reqwest(e)) = self.0 else {
            return write!(f, "{}", self.0);
        };
        let mut source = std::error::Error::source(e);
        if source.is_none() {
            return f.write_str(if e.is_timeout() { "timed out" } else { "request failed" });
        }
        let mut first = true;
        while let Some(s) = source {
            if !first {
                f.write_str(": ")?;
            }
            write!(f, "{s}")?;
            first = false;
            source = s.source();
        }
        Ok(())
    }
}

/// A URL as logs show it: scheme, host, port and path; no credentials, query or fragment.
struct LogUrl<'a>(&'a Url);

impl fmt::Display for LogUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = self.0;
        write!(f, "{}://{}", url.scheme(), url.host_str().unwrap_or(""))?;
        if let Some(port) = url.port() {
            write!(f, ":{port}")?;
        }
        f.write_str(url.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_digests_are_short_stable_and_hide_the_key() {
        let d = KeyDigest::of(b"order-42").to_string();
        assert_eq!(d, KeyDigest::of(b"order-42").to_string());
        assert_ne!(d, KeyDigest::of(b"order-43").to_string());
        assert!(d.starts_with("sha256:") && d.len() == "sha256:".len() + 12, "{d}");
        assert!(!d.contains("order"));
    }

    #[test]
    fn logged_urls_drop_credentials_query_and_fragment() {
        let url = Url::parse("https://user:secret@api.example:8443/v1/payments?token=abc#frag").unwrap();
        assert_eq!(LogUrl(&url).to_string(), "https://api.example:8443/v1/payments");
    }
}
