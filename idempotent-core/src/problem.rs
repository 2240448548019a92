//! RFC 9457 problem details for every error the framework itself produces.
//!
//! Each problem has a stable `type` URI (`urn:idempotent:problem:<slug>`) that clients can match
//! on, a short `title`, and a `detail` that tells the client what to do next.

use serde::Serialize;
use std::time::Duration;

/// Media type of problem responses.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem response produced by the framework.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Stable URI naming the kind of problem.
    #[serde(rename = "type")]
    pub type_uri: &'static str,
    /// Short, human-readable summary of the kind.
    pub title: &'static str,
    /// HTTP status code.
    pub status: u16,
    /// What happened to this request and what to do about it.
    pub detail: String,
    /// Seconds after which a retry may succeed; sent as `Retry-After` too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// The kinds of problem, with their stable types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// 400: the route requires a key and none was sent.
    KeyMissing,
    /// 400: the key header is malformed.
    KeyInvalid,
    /// 422: the key was used before with a different request.
    KeyReused,
    /// 409: the first request with this key is still running.
    InProgress,
    /// 503: the idempotency store cannot be reached.
    StoreUnavailable,
    /// 500: the handler panicked; its claim was released.
    HandlerPanicked,
    /// 409: the request completed but its response was too large to store.
    ResponseNotStored,
    /// 500: the application is misconfigured (runtime not installed, fingerprint failed).
    Misconfigured,
    /// 401: the configured actor source found no caller identity on the request.
    ActorMissing,
    /// 413: the request body is larger than the route accepts; nothing ran.
    BodyTooLarge,
    /// 400: the request body could not be read; nothing ran.
    BodyUnreadable,
    /// 500: the handler ran but its response failed while being produced; the outcome is stored
    /// as it is and a retry replays it instead of running the handler again.
    ResponseFailed,
    /// 404: a status request found no record of the caller's under that scope and key.
    RecordNotFound,
    /// 501: a transactional route on a store that cannot run transactions; nothing ran.
    TransactionsUnsupported,
    /// 429: the caller holds as many records as the store allows one caller; nothing ran.
    QuotaExceeded,
    /// 403: record status is not shown on a server that does not tell its callers apart.
    StatusDisabled,
    /// 400: the policy report was asked for in a format it does not have.
    ReportFormatUnknown,
    /// 400: a server-issued token that is malformed, expired, or no longer known to the store
    /// (see [`crate::issued`]); nothing ran.
    TokenInvalid,
    /// 403: a server-issued token minted for another caller or another scope, or not minted by
    /// this server; nothing ran.
    TokenForbidden,
    /// 404: a token was asked for a scope no route declares `key = issued(..)`.
    ScopeNotIssued,
}

impl ProblemKind {
    /// The stable `type` URI.
    pub const fn type_uri(self) -> &'static str {
        match self {
            ProblemKind::KeyMissing => "urn:idempotent:problem:key-missing",
            ProblemKind::KeyInvalid => "urn:idempotent:problem:key-invalid",
            ProblemKind::KeyReused => "urn:idempotent:problem:key-reused",
            ProblemKind::InProgress => "urn:idempotent:problem:in-progress",
            ProblemKind::StoreUnavailable => "urn:idempotent:problem:store-unavailable",
            ProblemKind::HandlerPanicked => "urn:idempotent:problem:handler-panicked",
            ProblemKind::ResponseNotStored => "urn:idempotent:problem:response-not-stored",
            ProblemKind::Misconfigured => "urn:idempotent:problem:misconfigured",
            ProblemKind::ActorMissing => "urn:idempotent:problem:actor-missing",
            ProblemKind::BodyTooLarge => "urn:idempotent:problem:body-too-large",
            ProblemKind::BodyUnreadable => "urn:idempotent:problem:body-unreadable",
            ProblemKind::ResponseFailed => "urn:idempotent:problem:response-failed",
            ProblemKind::RecordNotFound => "urn:idempotent:problem:record-not-found",
            ProblemKind::TransactionsUnsupported => "urn:idempotent:problem:transactions-unsupported",
            ProblemKind::QuotaExceeded => "urn:idempotent:problem:quota-exceeded",
            ProblemKind::StatusDisabled => "urn:idempotent:problem:status-disabled",
            ProblemKind::ReportFormatUnknown => "urn:idempotent:problem:report-format-unknown",
            ProblemKind::TokenInvalid => "urn:idempotent:problem:token-invalid",
            ProblemKind::TokenForbidden => "urn:idempotent:problem:token-forbidden",
            ProblemKind::ScopeNotIssued => "urn:idempotent:problem:scope-not-issued",
        }
    }

    /// The HTTP status.
    pub const fn status(self) -> u16 {
        match self {
            ProblemKind::KeyMissing | ProblemKind::KeyInvalid => 400,
            ProblemKind::KeyReused => 422,
            ProblemKind::InProgress | ProblemKind::ResponseNotStored => 409,
            ProblemKind::StoreUnavailable => 503,
            ProblemKind::HandlerPanicked | ProblemKind::Misconfigured | ProblemKind::ResponseFailed => 500,
            ProblemKind::ActorMissing => 401,
            ProblemKind::BodyTooLarge => 413,
            ProblemKind::BodyUnreadable | ProblemKind::ReportFormatUnknown => 400,
            ProblemKind::RecordNotFound => 404,
            ProblemKind::TransactionsUnsupported => 501,
            ProblemKind::QuotaExceeded => 429,
            ProblemKind::StatusDisabled | ProblemKind::TokenForbidden => 403,
            ProblemKind::TokenInvalid => 400,
            ProblemKind::ScopeNotIssued => 404,
        }
    }

    /// The title.
    pub const fn title(self) -> &'static str {
        match self {
            ProblemKind::KeyMissing => "Idempotency key missing",
            ProblemKind::KeyInvalid => "Idempotency key invalid",
            ProblemKind::KeyReused => "Idempotency key reused with a different request",
            ProblemKind::InProgress => "Request with this idempotency key is in progress",
            ProblemKind::StoreUnavailable => "Idempotency store unavailable",
            ProblemKind::HandlerPanicked => "Request failed",
            ProblemKind::ResponseNotStored => "Response not stored",
            ProblemKind::Misconfigured => "Idempotency misconfigured",
            ProblemKind::ActorMissing => "Caller identity missing",
            ProblemKind::BodyTooLarge => "Request body too large",
            ProblemKind::BodyUnreadable => "Request body unreadable",
            ProblemKind::ResponseFailed => "Response failed after the request ran",
            ProblemKind::RecordNotFound => "No such idempotency record",
            ProblemKind::TransactionsUnsupported => "Operation needs a transactional store",
            ProblemKind::QuotaExceeded => "Too many idempotent requests held for this caller",
            ProblemKind::StatusDisabled => "Record status not available",
            ProblemKind::ReportFormatUnknown => "Unknown report format",
            ProblemKind::TokenInvalid => "Form token invalid or expired",
            ProblemKind::TokenForbidden => "Form token not issued to this caller for this form",
            ProblemKind::ScopeNotIssued => "No tokens are issued for this scope",
        }
    }
}

impl Problem {
    /// A problem of `kind` with `detail`.
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Self {
            type_uri: kind.type_uri(),
            title: kind.title(),
            status: kind.status(),
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After`, rounded up to whole seconds (at least 1, at most `u64::MAX`).
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        // Saturating: `Duration::MAX` has a fraction of a second above `u64::MAX` seconds, and a
        // wrapped sum would tell the client to retry in one second.
        let secs = after.as_secs().saturating_add(u64::from(after.subsec_nanos() > 0));
        self.retry_after = Some(secs.max(1));
        self
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_rfc9457() {
        let p = Problem::new(ProblemKind::InProgress, "retry later").with_retry_after(Duration::from_millis(1500));
        let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        assert_eq!(v["type"], "urn:idempotent:problem:in-progress");
        assert_eq!(v["status"], 409);
        assert_eq!(v["retry_after"], 2);
        assert_eq!(v["title"], "Request with this idempotency key is in progress");
    }

    #[test]
    fn retry_after_of_duration_max_saturates_instead_of_overflowing() {
        let p = Problem::new(ProblemKind::StoreUnavailable, "later").with_retry_after(Duration::MAX);
        assert_eq!(p.retry_after, Some(u64::MAX));
        let p = Problem::new(ProblemKind::StoreUnavailable, "later").with_retry_after(Duration::from_secs(u64::MAX));
        assert_eq!(p.retry_after, Some(u64::MAX));
        let p = Problem::new(ProblemKind::InProgress, "later").with_retry_after(Duration::from_nanos(1));
        assert_eq!(p.retry_after, Some(1));
    }
}
