//! The retry decision and the backoff schedule, as pure functions.
//!
//! Nothing here reads a clock, sleeps or draws a random number. The middleware hands
//! [`decide`] the number of attempts made, the time elapsed since the operation started and a
//! jitter fraction; it sleeps and sends. So every rule is tested with a fake clock and a
//! deterministic [`Jitter`], and an application can print the schedule a policy allows.
//!
//! ```
//! use idempotent_client::retry::{backoff, decide, Answer, Decision, Observed, RetryPolicy};
//! use std::time::Duration;
//!
//! let policy = RetryPolicy::default();
//! // Full jitter: the wait before retry `n` is drawn from [0, base × 2^(n-1)), capped.
//! assert_eq!(backoff(&policy, 3, 0.5), policy.base_delay * 2);
//! // A 503 naming its wait is retried after exactly that wait.
//! let busy = Observed::Response(Answer::new(503).retry_after(Duration::from_secs(2)));
//! assert_eq!(decide(&policy, 1, Duration::ZERO, &busy, 0.0), Decision::RetryAfter(Duration::from_secs(2)));
//! // A 422 is the operation's answer: never retried.
//! assert_eq!(decide(&policy, 1, Duration::ZERO, &Observed::Response(Answer::new(422)), 0.0), Decision::Return);
//! ```

use http::{HeaderMap, HeaderValue, StatusCode};
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The `type` of the problem a server built on `idempotent` answers, with 409, while the first
/// request with a key is still running: `urn:idempotent:problem:in-progress`.
pub const IN_PROGRESS_PROBLEM: &str = "urn:idempotent:problem:in-progress";

/// Bounds and pacing of the retries of one logical operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included; `0` counts as `1`. Default 5.
    pub max_attempts: u32,
    /// Time budget of the operation, counted from the start of its first attempt: no retry starts
    /// later than this, and a wait that would end later gives up at once. An attempt already
    /// running is bounded by [`attempt_timeout`](Self::attempt_timeout), not by this. Default 30 s.
    pub max_elapsed: Duration,
    /// Ceiling of the backoff before the first retry, doubled for each further retry. Default
    /// 200 ms.
    pub base_delay: Duration,
    /// Largest ceiling the doubling reaches. A server's `Retry-After` is not capped by it (only by
    /// [`max_elapsed`](Self::max_elapsed)). Default 5 s.
    pub max_delay: Duration,
    /// Time one attempt may take, from sending the request to the last byte of its response,
    /// before it counts as lost and is retried with the same key. `None` leaves only the reqwest
    /// client's own timeouts, which are off by default: a stalled connection would then hang the
    /// operation. Default 10 s.
    pub attempt_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            max_elapsed: Duration::from_secs(30),
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            attempt_timeout: Some(Duration::from_secs(10)),
        }
    }
}

/// What one attempt came to, as far as the retry decision is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// A complete response: status line, headers and the whole body.
    Response(Answer),
    /// The connection could not be opened: the request was never sent.
    Connect,
    /// The attempt ran out of time: the server may or may not have executed it.
    Timeout,
    /// The connection broke after the request may have been sent: reset, closed without an
    /// answer, or a response cut short. The server may have executed it.
    Lost,
    /// A failure that sending again cannot fix: an invalid request, a redirect loop, an error of
    /// another middleware.
    Fatal,
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Observed::Response(a) => {
                write!(f, "{}", a.status.as_u16())?;
                if let Some(t) = &a.problem_type {
                    write!(f, " {t}")?;
                }
                Ok(())
            }
            Observed::Connect => f.write_str("connection failed"),
            Observed::Timeout => f.write_str("timed out"),
            Observed::Lost => f.write_str("connection lost before the whole response"),
            Observed::Fatal => f.write_str("failed"),
        }
    }
}

/// The parts of a response that decide whether it is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// The `type` member of an `application/problem+json` body (RFC 9457), if there is one.
    pub problem_type: Option<String>,
    /// The wait the server asked for: the `Retry-After` header (delay in seconds), else the
    /// `retry_after` member (seconds) of a problem body.
    pub retry_after: Option<Duration>,
}

impl Answer {
    /// An answer with `status` (which must be a valid status code, else 500), no problem type and
    /// no requested wait.
    pub fn new(status: u16) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self { status, problem_type: None, retry_after: None }
    }

    /// The same answer with a problem `type`.
    pub fn problem(mut self, type_uri: &str) -> Self {
        self.problem_type = Some(type_uri.to_owned());
        self
    }

    /// The same answer with a requested wait.
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// Reads an answer from a response's status, headers and whole body. The body is parsed only
    /// when it is `application/problem+json`.
    pub fn from_parts(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Self {
        let is_problem = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case(crate::PROBLEM_CONTENT_TYPE));
        let problem = if is_problem { serde_json::from_slice::<serde_json::Value>(body).ok() } else { None };
        let problem_type = problem.as_ref().and_then(|p| p.get("type")).and_then(|t| t.as_str()).map(str::to_owned);
        let from_body = problem
            .as_ref()
            .and_then(|p| p.get("retry_after"))
            .and_then(serde_json::Value::as_u64)
            .map(Duration::from_secs);
        let retry_after = headers.get(http::header::RETRY_AFTER).and_then(parse_retry_after).or(from_body);
        Self { status, problem_type, retry_after }
    }
}

/// Parses a `Retry-After` value given as a delay in seconds (`"2"`). An HTTP date, or anything
/// else, is `None`: the backoff schedule applies instead.
pub fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u64>().ok().map(Duration::from_secs)
}

/// Whether an outcome may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The operation's answer, or an error that sending again cannot fix: return it.
    Final,
    /// Sending the same request again, under the same key, may succeed.
    Retryable {
        /// The wait the server asked for, if it named one.
        retry_after: Option<Duration>,
    },
}

/// Classifies an outcome. Retryable: a connection that failed or broke, a timeout, a response
/// lost or cut short, 409 with the [in-progress problem](IN_PROGRESS_PROBLEM), 429 and 503.
/// Everything else is final, among them 400, 422, any other 409 and every 2xx, 3xx, 4xx and other
/// 5xx: a server that stores outcomes has stored those, and asking again only replays them.
pub fn classify(observed: &Observed) -> Verdict {
    match observed {
        Observed::Connect | Observed::Timeout | Observed::Lost => Verdict::Retryable { retry_after: None },
        Observed::Fatal => Verdict::Final,
        Observed::Response(a) => match a.status {
            StatusCode::CONFLICT if a.problem_type.as_deref() == Some(IN_PROGRESS_PROBLEM) => {
                Verdict::Retryable { retry_after: a.retry_after }
            }
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                Verdict::Retryable { retry_after: a.retry_after }
            }
            _ => Verdict::Final,
        },
    }
}

/// The wait before retry number `retry` (1 is the wait before the second attempt) when the
/// server named none: exponential backoff with full jitter, `jitter × min(max_delay, base_delay ×
/// 2^(retry-1))`, where `jitter` is a uniform draw from `[0, 1)` (clamped to `[0, 1]`; not a
/// number counts as 0).
pub fn backoff(policy: &RetryPolicy, retry: u32, jitter: f64) -> Duration {
    let doublings = retry.saturating_sub(1).min(31);
    let ceiling = policy.base_delay.saturating_mul(1u32 << doublings).min(policy.max_delay);
    let fraction = if jitter.is_nan() { 0.0 } else { jitter.clamp(0.0, 1.0) };
    // In floating point a product near `Duration::MAX` can round above it: stay at the ceiling.
    Duration::try_from_secs_f64(ceiling.as_secs_f64() * fraction).map_or(ceiling, |d| d.min(ceiling))
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Return this outcome to the caller: a final answer, or an error retrying cannot fix.
    Return,
    /// Send the request again, under the same key, after this wait.
    RetryAfter(Duration),
    /// Retrying might help, but a bound is reached: return this last outcome.
    GiveUp(GiveUpReason),
}

/// Which bound ended the retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    /// [`RetryPolicy::max_attempts`] attempts were made.
    Attempts,
    /// The next attempt would start after [`RetryPolicy::max_elapsed`].
    Deadline,
}

impl fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GiveUpReason::Attempts => "no attempts left",
            GiveUpReason::Deadline => "out of time",
        })
    }
}

/// Decides what follows attempt number `attempts` (1 for the first), which ended `elapsed` after
/// the first attempt started with `observed`. `jitter` is a uniform draw from `[0, 1)`, used only
/// when the server named no wait.
pub fn decide(policy: &RetryPolicy, attempts: u32, elapsed: Duration, observed: &Observed, jitter: f64) -> Decision {
    let Verdict::Retryable { retry_after } = classify(observed) else {
        return Decision::Return;
    };
    if attempts >= policy.max_attempts.max(1) {
        return Decision::GiveUp(GiveUpReason::Attempts);
    }
    let wait = retry_after.unwrap_or_else(|| backoff(policy, attempts, jitter));
    if elapsed.saturating_add(wait) > policy.max_elapsed {
        return Decision::GiveUp(GiveUpReason::Deadline);
    }
    Decision::RetryAfter(wait)
}

/// A source of jitter: fractions drawn uniformly from `[0, 1)`.
pub trait Jitter: Send + Sync + 'static {
    /// The next fraction.
    fn fraction(&self) -> f64;
}

/// Jitter drawn from the standard library's randomly keyed SipHash (a fresh key per draw), so no
/// random number crate is needed. Good enough to spread clients' retries; not for cryptography.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomJitter;

impl Jitter for RandomJitter {
    fn fraction(&self) -> f64 {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(0x9e37_79b9_7f4a_7c15);
        // The top 53 bits, as a double in [0, 1).
        (h.finish() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The same fraction every time: deterministic schedules in tests, or `FixedJitter(1.0)` for
/// plain exponential backoff without jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedJitter(pub f64);

impl Jitter for FixedJitter {
    fn fraction(&self) -> f64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            max_elapsed: 30 * S,
            base_delay: 100 * MS,
            max_delay: 1000 * MS,
            attempt_timeout: None,
        }
    }

    fn response(status: u16) -> Observed {
        Observed::Response(Answer::new(status))
    }

    /// A deterministic jitter source cycling through fixed fractions.
    struct Cycle(&'static [f64], AtomicUsize);

    impl Jitter for Cycle {
        fn fraction(&self) -> f64 {
            self.0[self.1.fetch_add(1, Ordering::Relaxed) % self.0.len()]
        }
    }

    /// Runs the retry loop on a fake clock: each attempt takes `attempt_time` and ends with the
    /// next outcome of `outcomes` (the last one repeats). Returns each attempt's start time and
    /// the final decision.
    fn simulate(
        policy: &RetryPolicy,
        outcomes: &[Observed],
        attempt_time: Duration,
        jitter: &dyn Jitter,
    ) -> (Vec<Duration>, Decision) {
        let mut now = Duration::ZERO;
        let mut starts = Vec::new();
        for attempt in 1.. {
            starts.push(now);
            now += attempt_time;
            let observed = &outcomes[(attempt as usize - 1).min(outcomes.len() - 1)];
            match decide(policy, attempt, now, observed, jitter.fraction()) {
                Decision::RetryAfter(wait) => now += wait,
                other => return (starts, other),
            }
        }
        unreachable!()
    }

    #[test]
    fn transport_failures_in_progress_429_and_503_are_retryable() {
        for o in [Observed::Connect, Observed::Timeout, Observed::Lost, response(429), response(503)] {
            assert_eq!(classify(&o), Verdict::Retryable { retry_after: None }, "{o}");
        }
        let busy = Observed::Response(Answer::new(409).problem(IN_PROGRESS_PROBLEM).retry_after(2 * S));
        assert_eq!(classify(&busy), Verdict::Retryable { retry_after: Some(2 * S) });
        let limited = Observed::Response(Answer::new(429).retry_after(7 * S));
        assert_eq!(classify(&limited), Verdict::Retryable { retry_after: Some(7 * S) });
    }

    #[test]
    fn final_answers_are_never_retried() {
        for status in [200, 201, 204, 301, 400, 401, 403, 404, 408, 413, 422, 425, 500, 501, 502, 504] {
            assert_eq!(classify(&response(status)), Verdict::Final, "{status}");
            assert_eq!(decide(&policy(), 1, Duration::ZERO, &response(status), 0.5), Decision::Return, "{status}");
        }
        // A 409 that is not the in-progress problem is the server's answer (a stored conflict,
        // a response too large to store), even with a Retry-After.
        let other = Answer::new(409).problem("urn:idempotent:problem:response-not-stored").retry_after(S);
        assert_eq!(classify(&Observed::Response(other)), Verdict::Final);
        assert_eq!(classify(&Observed::Response(Answer::new(409).retry_after(S))), Verdict::Final);
        // A 422 mismatch with a Retry-After is final all the same.
        let mismatch = Answer::new(422).problem("urn:idempotent:problem:key-reused").retry_after(S);
        assert_eq!(classify(&Observed::Response(mismatch)), Verdict::Final);
        assert_eq!(classify(&Observed::Fatal), Verdict::Final);
    }

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap_with_full_jitter() {
        let p = policy();
        let ceilings: Vec<Duration> = (1..=6).map(|n| backoff(&p, n, 1.0)).collect();
        assert_eq!(ceilings, [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]);
        assert_eq!(backoff(&p, 3, 0.0), Duration::ZERO, "full jitter reaches down to zero");
        assert_eq!(backoff(&p, 3, 0.25), 100 * MS);
        assert_eq!(backoff(&p, 3, 0.5), 200 * MS);
        // Out-of-range draws are clamped, never a panic.
        assert_eq!(backoff(&p, 2, 7.0), 200 * MS);
        assert_eq!(backoff(&p, 2, -1.0), Duration::ZERO);
        assert_eq!(backoff(&p, 2, f64::NAN), Duration::ZERO);
        assert_eq!(backoff(&p, 0, 1.0), 100 * MS);
        // Huge retry numbers and bases saturate at the cap.
        assert_eq!(backoff(&p, u32::MAX, 1.0), 1000 * MS);
        let wide = RetryPolicy { base_delay: Duration::MAX, max_delay: Duration::MAX, ..p };
        assert_eq!(backoff(&wide, 40, 1.0), Duration::MAX);
    }

    #[test]
    fn retry_after_is_honoured_instead_of_the_backoff() {
        let busy = Observed::Response(Answer::new(503).retry_after(3 * S));
        assert_eq!(decide(&policy(), 1, Duration::ZERO, &busy, 0.9), Decision::RetryAfter(3 * S));
        // Above max_delay too: the server knows when it can answer.
        let later = Observed::Response(Answer::new(429).retry_after(20 * S));
        assert_eq!(decide(&policy(), 1, Duration::ZERO, &later, 0.9), Decision::RetryAfter(20 * S));
        // Zero means now.
        let now = Observed::Response(Answer::new(503).retry_after(Duration::ZERO));
        assert_eq!(decide(&policy(), 1, Duration::ZERO, &now, 0.9), Decision::RetryAfter(Duration::ZERO));
        // Without one, the jittered backoff of that retry.
        assert_eq!(decide(&policy(), 2, Duration::ZERO, &response(503), 0.5), Decision::RetryAfter(100 * MS));
    }

    #[test]
    fn attempts_are_bounded() {
        let (starts, end) = simulate(&policy(), &[Observed::Lost], 10 * MS, &FixedJitter(1.0));
        assert_eq!(end, Decision::GiveUp(GiveUpReason::Attempts));
        // Attempts of 10 ms, then waits of 100, 200, 400 and 800 ms.
        let ms: Vec<u128> = starts.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 110, 320, 730, 1540]);
        for zero in [0, 1] {
            let one = RetryPolicy { max_attempts: zero, ..policy() };
            let (starts, end) = simulate(&one, &[Observed::Timeout], 10 * MS, &FixedJitter(1.0));
            assert_eq!((starts.len(), end), (1, Decision::GiveUp(GiveUpReason::Attempts)));
        }
    }

    #[test]
    fn total_time_is_bounded_and_a_wait_past_the_deadline_gives_up_at_once() {
        let p = RetryPolicy { max_attempts: 100, max_elapsed: 10 * S, ..policy() };
        let busy = Observed::Response(Answer::new(503).retry_after(2 * S));
        let (starts, end) = simulate(&p, &[busy], 100 * MS, &FixedJitter(0.0));
        assert_eq!(end, Decision::GiveUp(GiveUpReason::Deadline));
        assert!(starts.iter().all(|s| *s <= p.max_elapsed), "{starts:?}");
        let ms: Vec<u128> = starts.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 2100, 4200, 6300, 8400]);
        // A server asking for more than what is left: no pointless wait.
        let long = Observed::Response(Answer::new(429).retry_after(60 * S));
        assert_eq!(decide(&p, 1, S, &long, 0.5), Decision::GiveUp(GiveUpReason::Deadline));
        // Exactly at the deadline is still in time.
        let busy = Observed::Response(Answer::new(503).retry_after(2 * S));
        assert_eq!(decide(&p, 1, 8 * S, &busy, 0.5), Decision::RetryAfter(2 * S));
    }

    #[test]
    fn a_409_then_a_replay_ends_the_operation() {
        let busy = Observed::Response(Answer::new(409).problem(IN_PROGRESS_PROBLEM).retry_after(2 * S));
        let outcomes = [Observed::Timeout, busy, response(201)];
        let jitter = Cycle(&[0.5, 0.25], AtomicUsize::new(0));
        let (starts, end) = simulate(&policy(), &outcomes, 100 * MS, &jitter);
        assert_eq!(end, Decision::Return);
        // The timeout waits half its 100 ms ceiling; the 409 waits what it asked for.
        let ms: Vec<u128> = starts.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 150, 2250]);
    }

    #[test]
    fn answers_are_read_from_headers_and_problem_bodies() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/problem+json; charset=utf-8"));
        let body = br#"{"type":"urn:idempotent:problem:in-progress","status":409,"retry_after":3}"#;
        let a = Answer::from_parts(StatusCode::CONFLICT, &h, body);
        assert_eq!(a, Answer::new(409).problem(IN_PROGRESS_PROBLEM).retry_after(3 * S));
        // The header wins over the body.
        h.insert("retry-after", HeaderValue::from_static("1"));
        assert_eq!(Answer::from_parts(StatusCode::CONFLICT, &h, body).retry_after, Some(S));
        // Not a problem document: the body is not looked at.
        let mut plain = HeaderMap::new();
        plain.insert("content-type", HeaderValue::from_static("application/json"));
        assert_eq!(Answer::from_parts(StatusCode::CONFLICT, &plain, body), Answer::new(409));
        // A broken problem body is just an answer without a type.
        assert_eq!(Answer::from_parts(StatusCode::CONFLICT, &h, b"{nope").problem_type, None);
    }

    #[test]
    fn retry_after_takes_delay_seconds_only() {
        let parse = |s: &'static str| parse_retry_after(&HeaderValue::from_static(s));
        assert_eq!(parse("2"), Some(2 * S));
        assert_eq!(parse(" 0 "), Some(Duration::ZERO));
        for bad in ["", "-1", "1.5", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", "99999999999999999999999"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn random_jitter_stays_in_the_unit_interval_and_varies() {
        let draws: Vec<f64> = (0..1000).map(|_| RandomJitter.fraction()).collect();
        assert!(draws.iter().all(|f| (0.0..1.0).contains(f)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((0.4..0.6).contains(&mean), "{mean}");
        assert!(draws.windows(2).any(|w| w[0] != w[1]));
    }
}
