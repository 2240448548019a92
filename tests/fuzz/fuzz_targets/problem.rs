//! Problem responses (RFC 9457): `Problem::to_json`, `Problem::with_retry_after`,
//! `protocol::problem_response` and `protocol::body_problem`.
//!
//! The input is bytes read as: a kind (byte 0), flags (byte 1: a title of its own, a status of
//! its own, a `Retry-After`, a body too large), the status (2 bytes, big-endian) and the
//! `Retry-After` (8 bytes of seconds, 4 of nanoseconds) when flagged, then a title's index
//! when flagged (1 byte, into [`TITLES`]: titles are `&'static str`, written in code) and the
//! detail: arbitrary Unicode (control characters, quotes, backslashes, NUL, any plane), invalid
//! UTF-8 read as U+FFFD.
//!
//! Checked:
//! - the body is valid JSON that parses back to exactly the problem's fields, and its `type` is
//!   one of the stable types;
//! - `with_retry_after` rounds up to whole seconds, at least one, for every duration;
//! - the response has the problem's status (500 for one that is not an HTTP status), the
//!   problem media type, a `Retry-After` of the problem's seconds, and the body of `to_json`;
//! - `body_problem` with any error text is a 413 or a 400 whose detail quotes that text.
#![no_main]

use idempotent_core::problem::{Problem, ProblemKind, CONTENT_TYPE};
use idempotent_core::protocol::{body_problem, problem_response};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::time::Duration;

/// The stable problem types, as the README and clients know them.
const TYPES: [&str; 14] = [
    "urn:idempotent:problem:key-missing",
    "urn:idempotent:problem:key-invalid",
    "urn:idempotent:problem:key-reused",
    "urn:idempotent:problem:in-progress",
    "urn:idempotent:problem:store-unavailable",
    "urn:idempotent:problem:handler-panicked",
    "urn:idempotent:problem:response-not-stored",
    "urn:idempotent:problem:misconfigured",
    "urn:idempotent:problem:actor-missing",
    "urn:idempotent:problem:body-too-large",
    "urn:idempotent:problem:body-unreadable",
    "urn:idempotent:problem:response-failed",
    "urn:idempotent:problem:record-not-found",
    "urn:idempotent:problem:transactions-unsupported",
];

const KINDS: [ProblemKind; 14] = [
    ProblemKind::KeyMissing,
    ProblemKind::KeyInvalid,
    ProblemKind::KeyReused,
    ProblemKind::InProgress,
    ProblemKind::StoreUnavailable,
    ProblemKind::HandlerPanicked,
    ProblemKind::ResponseNotStored,
    ProblemKind::Misconfigured,
    ProblemKind::ActorMissing,
    ProblemKind::BodyTooLarge,
    ProblemKind::BodyUnreadable,
    ProblemKind::ResponseFailed,
    ProblemKind::RecordNotFound,
    ProblemKind::TransactionsUnsupported,
];

/// Titles other than the kinds' own, each with characters JSON must escape or carry as they are.
const TITLES: &[&str] = &[
    "",
    "Quoted \"title\" with a back\\slash",
    "Control \u{0}\u{1}\u{1f}\u{7f} characters\n\r\t",
    "Unicode: \u{e9}\u{2028}\u{2029}\u{fffd}\u{1f600}\u{10ffff}",
    "</script><script>alert(1)</script>",
    "A very long title that goes on and on well past what anyone would write in one line of code",
];

#[derive(Debug)]
struct Input {
    kind: ProblemKind,
    detail: String,
    /// A title other than the kind's (the field is public).
    title: Option<&'static str>,
    /// A status other than the kind's (the field is public).
    status: Option<u16>,
    retry_after: Option<Duration>,
    too_large: bool,
}

impl Input {
    fn read(data: &[u8]) -> Self {
        let mut rest = data;
        let mut take = |n: usize| -> u128 {
            let (head, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            head.iter().fold(0, |acc, b| acc << 8 | u128::from(*b))
        };
        let kind = KINDS[take(1) as usize % KINDS.len()];
        let flags = take(1);
        let status = (flags & 2 != 0).then(|| take(2) as u16);
        let retry_after = (flags & 4 != 0).then(|| {
            let secs = take(8) as u64;
            Duration::new(secs, (take(4) % 1_000_000_000) as u32)
        });
        let title = (flags & 1 != 0).then(|| TITLES[take(1) as usize % TITLES.len()]);
        Input {
            kind,
            detail: String::from_utf8_lossy(rest).into_owned(),
            title,
            status,
            retry_after,
            too_large: flags & 8 != 0,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let input = Input::read(data);
    let kind = input.kind;
    let mut problem = Problem::new(kind, input.detail.clone());
    assert_eq!(problem.type_uri, kind.type_uri());
    assert!(TYPES.contains(&problem.type_uri), "{:?} is not a stable type", problem.type_uri);
    assert_eq!(problem.detail, input.detail);

    if let Some(after) = input.retry_after {
        problem = problem.with_retry_after(after);
        let whole = after.as_secs().saturating_add(u64::from(after.subsec_nanos() > 0)).max(1);
        assert_eq!(problem.retry_after, Some(whole), "Retry-After of {after:?}");
    }
    if let Some(status) = input.status {
        problem.status = status;
    }

    match input.title {
        Some(title) => check(&Problem { title, ..problem.clone() }),
        None => check(&problem),
    }

    // The body problems quote the error they were given.
    let response = body_problem(input.too_large, &input.detail);
    assert_eq!(response.status().as_u16(), if input.too_large { 413 } else { 400 });
    let body: Value = serde_json::from_slice(response.body()).expect("a body problem is JSON");
    assert!(TYPES.contains(&body["type"].as_str().unwrap_or_default()), "{body}");
    let detail = body["detail"].as_str().expect("a detail");
    assert!(detail.contains(&format!("({})", input.detail)), "{detail:?} does not quote {:?}", input.detail);
});

/// Renders `problem` both ways and reads it back.
fn check(problem: &Problem) {
    let json = problem.to_json();
    let value: Value = serde_json::from_slice(&json)
        .unwrap_or_else(|e| panic!("to_json is not JSON ({e}): {:?}", String::from_utf8_lossy(&json)));
    let object = value.as_object().expect("a JSON object");
    let mut expected = vec!["detail", "status", "title", "type"];
    if problem.retry_after.is_some() {
        expected.push("retry_after");
    }
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    keys.sort_unstable();
    expected.sort_unstable();
    assert_eq!(keys, expected);
    assert_eq!(object["type"], problem.type_uri);
    assert!(TYPES.contains(&object["type"].as_str().unwrap_or_default()));
    assert_eq!(object["title"], problem.title);
    assert_eq!(object["detail"], problem.detail.as_str());
    assert_eq!(object["status"], problem.status);
    if let Some(secs) = problem.retry_after {
        assert_eq!(object["retry_after"], secs);
    }

    let response = problem_response(problem);
    let status = http::StatusCode::from_u16(problem.status).map_or(500, |s| s.as_u16());
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(response.headers().get(http::header::CONTENT_TYPE).map(|v| v.as_bytes()), Some(CONTENT_TYPE.as_bytes()));
    let retry_after = response.headers().get(http::header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(retry_after, problem.retry_after.map(|s| s.to_string()));
    assert_eq!(response.body().as_ref(), json.as_slice());
}
