//! Per-route idempotency policy.
//!
//! A [`Policy`] is built by the `#[idempotent]` macro as a constant, so every value here is
//! const-constructible and every duration was parsed at compile time.

use std::time::Duration;

/// Whether a request must carry an idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRequirement {
    /// A request without a key is rejected with 400 (the default).
    Required,
    /// A request without a key runs unprotected (gradual rollout).
    Optional,
}

/// Where a request's idempotency key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// The runtime's key header, `Idempotency-Key` unless the builder names another (the
    /// default).
    Header,
    /// A header of the sender's own, lowercase: a webhook's `webhook-id` (Standard Webhooks),
    /// GitHub's `x-github-delivery`, Shopify's `x-shopify-webhook-id`. Parsed like the key header:
    /// 1 to 255 visible ASCII characters, sent once.
    NamedHeader(&'static str),
    /// Fields of the typed body, as dotted paths (a Stripe event's `id`; Adyen's `eventCode` and
    /// `pspReference`), read by the code `#[idempotent]` generates. Several fields make one key,
    /// in order, encoded so that no two different lists of values give the same key.
    Fields(&'static [&'static str]),
    /// No key is read: the request's identity (scope, caller, method, path, query and body as
    /// the route's `fields`/`exclude` define it) is the key, within the route's `ttl`. For
    /// clients that send no key: two identical requests within the ttl are one.
    Derived,
    /// A token the server minted for this scope and this caller while rendering a form (see
    /// [`crate::issued`]), sent back in a form field or a header. Valid for `ttl` from minting;
    /// verified before any store round trip.
    Issued {
        /// How long a minted token can be submitted.
        ttl: Duration,
        /// Where a submit carries it.
        from: TokenField,
    },
}

/// Where a submit carries its server-issued token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenField {
    /// A field of a form-encoded body (`application/x-www-form-urlencoded`), e.g. a hidden
    /// `<input name="_idem">`.
    Form(&'static str),
    /// A request header, lowercase (for scripts that fetched a token from the mint endpoint).
    Header(&'static str),
}

impl TokenField {
    /// `form field `_idem`` or `header `x-form-token``.
    pub fn describe(self) -> String {
        match self {
            TokenField::Form(name) => format!("form field `{name}`"),
            TokenField::Header(name) => format!("`{name}` header"),
        }
    }
}

impl KeySource {
    /// What the report and problems call it: `Idempotency-Key header`, `webhook-id header`,
    /// `field event.id`, `fields eventCode, pspReference`, `derived`.
    pub fn describe(self, header_name: &str) -> String {
        match self {
            KeySource::Header => format!("`{header_name}` header"),
            KeySource::NamedHeader(name) => format!("`{name}` header"),
            KeySource::Fields([field]) => format!("body field `{field}`"),
            KeySource::Fields(fields) => {
                let fields: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
                format!("body fields {}", fields.join(", "))
            }
            KeySource::Derived => "the request itself (derived)".to_owned(),
            KeySource::Issued { from, .. } => format!("server-issued token in the {}", from.describe()),
        }
    }

    /// The token ttl of an [`Issued`](KeySource::Issued) source.
    pub const fn token_ttl(self) -> Option<Duration> {
        match self {
            KeySource::Issued { ttl, .. } => Some(ttl),
            _ => None,
        }
    }

    /// The name the JSON report gives it: `header`, `header:<name>`, `fields:<a>,<b>`, `derived`,
    /// `issued` (the token's ttl and field are reported beside it).
    pub fn as_report(self) -> String {
        match self {
            KeySource::Header => "header".to_owned(),
            KeySource::NamedHeader(name) => format!("header:{name}"),
            KeySource::Fields(fields) => format!("fields:{}", fields.join(",")),
            KeySource::Derived => "derived".to_owned(),
            KeySource::Issued { .. } => "issued".to_owned(),
        }
    }
}

/// What a request does when it finds the same key still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictMode {
    /// Answer 409 with `Retry-After` at once (the default).
    Reject,
    /// Wait (up to [`Policy::wait_timeout`]) for the first request to finish and replay its
    /// response; if the first one releases its claim, run the handler in its place.
    Wait,
}

/// Which handler outcomes are stored and replayed; the others release the claim so a retry
/// runs the handler again. Whatever the setting, a handler whose response body failed after it
/// ran is stored (as a 500 `response-failed`): its effects happened, so it never runs twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredOutcomes {
    /// 2xx, 3xx and 4xx except 408, 425 and 429 (the default): outcomes a retry would only repeat.
    Final,
    /// Only 2xx and 3xx: every error releases the claim.
    Success,
    /// Every status, 5xx included: the handler never runs twice for one key (panics still release).
    All,
}

impl StoredOutcomes {
    /// Whether a response with `status` is stored (and replayed) under this setting.
    pub const fn stores(self, status: u16) -> bool {
        match self {
            StoredOutcomes::All => true,
            StoredOutcomes::Success => status >= 200 && status < 400,
            StoredOutcomes::Final => status < 500 && !matches!(status, 408 | 425 | 429),
        }
    }

    /// The name used in attributes and reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            StoredOutcomes::Final => "final",
            StoredOutcomes::Success => "success",
            StoredOutcomes::All => "all",
        }
    }
}

impl KeyRequirement {
    /// The name used in attributes and reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            KeyRequirement::Required => "required",
            KeyRequirement::Optional => "optional",
        }
    }
}

impl ConflictMode {
    /// The name used in attributes and reports.
    pub const fn as_str(self) -> &'static str {
        match self {
            ConflictMode::Reject => "reject",
            ConflictMode::Wait => "wait",
        }
    }
}

/// How much of one part of a request (its path parameters, its query, its body) belongs to the
/// request's identity, and so to its fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// All of it (the default): every path parameter, the whole canonical query, the whole body
    /// canonicalised by its content type.
    Whole,
    /// Only these names: path parameters, query parameters, or dotted paths of declared body
    /// fields.
    Only(&'static [&'static str]),
    /// None of it, deliberately (`exclude = [..]` in the attribute); shown in the policy report.
    Omitted,
}

impl Part {
    /// How the report shows this part: `all`, the names, or `excluded`.
    pub fn describe(self) -> String {
        match self {
            Part::Whole => "all".to_owned(),
            Part::Only(names) => names.join(", "),
            Part::Omitted => "excluded".to_owned(),
        }
    }
}

/// What makes two requests with one key the same request: the method and scope always, plus
/// these three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The path parameters (`/payments/{id}`): names and values.
    pub path: Part,
    /// The query string, decoded and sorted.
    pub query: Part,
    /// The body: declared fields of the typed body, or the whole body by content type.
    pub body: Part,
}

impl Identity {
    /// Everything: every path parameter, the whole query, the whole body.
    pub const WHOLE: Identity = Identity { path: Part::Whole, query: Part::Whole, body: Part::Whole };
}

/// The idempotency policy of one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Namespace of the route's keys, e.g. `payments.create`.
    pub scope: &'static str,
    /// What of the request makes up its fingerprint (see [`Identity`]).
    pub identity: Identity,
    /// How long a completed record is kept and replayed, counted from completion.
    pub ttl: Duration,
    /// How long an in-progress claim is held without a heartbeat; renewed while the handler runs.
    pub lease: Duration,
    /// Whether the key is required.
    pub key: KeyRequirement,
    /// Where the key comes from.
    pub key_source: KeySource,
    /// What a concurrent duplicate does.
    pub on_conflict: ConflictMode,
    /// Longest wait of a duplicate under [`ConflictMode::Wait`] before it answers 409.
    pub wait_timeout: Duration,
    /// Which outcomes are stored.
    pub outcomes: StoredOutcomes,
    /// When the store is unreachable, run the handler unprotected (logged) instead of answering 503.
    pub fail_open: bool,
    /// The handler writes in a transaction of the store's database, and its outcome is recorded
    /// in that same transaction (see [`crate::store::transaction`]).
    pub transactional: bool,
}

impl Policy {
    /// Default lease of an in-progress claim.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
    /// Default wait of a duplicate under [`ConflictMode::Wait`].
    pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default record ttl.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

    /// The declared body fields, empty when the whole body (or none of it) is fingerprinted.
    pub const fn fields(&self) -> &'static [&'static str] {
        match self.identity.body {
            Part::Only(names) => names,
            _ => &[],
        }
    }

    /// A policy with the defaults: the whole request is its identity, key required, 24h ttl, 10s lease, 409 on conflict, final
    /// outcomes stored, fail closed.
    pub const fn new(scope: &'static str) -> Self {
        Self {
            scope,
            identity: Identity::WHOLE,
            ttl: Self::DEFAULT_TTL,
            lease: Self::DEFAULT_LEASE,
            key: KeyRequirement::Required,
            key_source: KeySource::Header,
            on_conflict: ConflictMode::Reject,
            wait_timeout: Self::DEFAULT_WAIT_TIMEOUT,
            outcomes: StoredOutcomes::Final,
            fail_open: false,
            transactional: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_outcomes_release_retryable_statuses() {
        let f = StoredOutcomes::Final;
        for s in [200, 201, 204, 301, 400, 404, 409, 422] {
            assert!(f.stores(s), "{s} should be stored");
        }
        for s in [408, 425, 429, 500, 502, 503, 504] {
            assert!(!f.stores(s), "{s} should be released");
        }
        assert!(!StoredOutcomes::Success.stores(422));
        assert!(StoredOutcomes::All.stores(503));
    }
}
