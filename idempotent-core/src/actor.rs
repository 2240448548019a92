//! Who is calling: the actor that namespaces idempotency keys.
//!
//! Keys are stored under scope + actor + key, so a caller can never replay another caller's
//! response by guessing or reusing its key. The actor is resolved once per request: an [`Actor`]
//! placed in the request's extensions by the application's authentication wins; otherwise the
//! [`ActorSource`] configured at start-up reads it from the request head.
//!
//! # Which identity
//! The actor should be the *verified* principal, not the credential: the `sub` of a JWT your
//! authentication layer has checked, an account id looked up from an API key. Set it as an
//! [`Actor`] request extension from that layer (an axum middleware or extractor, an actix-web
//! middleware or `FromRequest` impl that runs before the handler's body). A client that refreshes
//! its token between two attempts then keeps its namespace and gets its replay.
//! [`ActorSource::BearerToken`] namespaces by the raw token instead: a fallback for services whose
//! tokens are long-lived opaque account keys, where a new token is a new caller.
//!
//! # What is stored
//! Stores never see the actor itself, only [`digest`] of it: a fixed 64-character SHA-256 hex
//! string, so a credential used as an actor is never written in clear, and a 3 kB JWT cannot
//! overflow a database index.
//!
//! # A source that finds nobody
//! [`ActorSource::Anonymous`] (the default) means "no caller identity": every request shares one
//! namespace, for single-tenant services. Any other source that finds no actor on a request makes
//! it a `401` problem (`urn:idempotent:problem:actor-missing`) rather than letting unrelated
//! callers share the anonymous namespace.

use std::fmt;
use std::sync::Arc;

/// The caller's identity, as a request extension set by authentication middleware or extractors.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Actor(pub String);

/// Read access to a request's headers, implemented by each framework adapter.
pub trait RequestHead {
    /// Every value of header `name` (case-insensitive), in order. Required, never derived from
    /// the first value: the key header must appear exactly once, and only every value shows a
    /// repeated one.
    fn header_values(&self, name: &str) -> Vec<&[u8]>;

    /// The first value of header `name`, if any.
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.header_values(name).into_iter().next()
    }
}

impl RequestHead for ::http::HeaderMap {
    fn header_values(&self, name: &str) -> Vec<&[u8]> {
        self.get_all(name).iter().map(|v| v.as_bytes()).collect()
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(::http::HeaderValue::as_bytes)
    }
}

/// Why a request has no usable actor: both are a 401 (`urn:idempotent:problem:actor-missing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ActorMissing {
    /// The configured source found no caller identity on the request.
    #[error("the configured actor source found no caller identity on this request")]
    NotFound,
    /// The header the source reads was sent more than once. Picking one would let whatever added
    /// the other (a gateway that appends an identity header rather than replacing it, a client
    /// that adds its own) choose the namespace, so the request has no identity at all.
    #[error("the request carries its identity header more than once; send it exactly once")]
    Repeated,
}

/// What stores see of an actor without a server secret: SHA-256 over a tagged encoding of it, as
/// 64 lowercase hex characters; the empty string for the anonymous namespace. With a secret, the
/// runtime uses [`DigestKey::actor`](crate::digest::DigestKey::actor) instead.
pub fn digest(actor: &str) -> String {
    crate::digest::DigestKey::default().actor(actor)
}

/// A custom resolver function.
pub type ActorFn = Arc<dyn Fn(&dyn RequestHead) -> Option<String> + Send + Sync>;

/// Where the actor comes from when no [`Actor`] extension is present.
#[derive(Clone, Default)]
pub enum ActorSource {
    /// Every caller shares one namespace (single-tenant services, tests).
    #[default]
    Anonymous,
    /// The value of a header, e.g. `X-Account-Id` set by a trusted gateway.
    Header(String),
    /// The token of `Authorization: Bearer <token>`.
    BearerToken,
    /// A function of the request head.
    Custom(ActorFn),
}

impl fmt::Debug for ActorSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActorSource::Anonymous => f.write_str("Anonymous"),
            ActorSource::Header(h) => write!(f, "Header({h:?})"),
            ActorSource::BearerToken => f.write_str("BearerToken"),
            ActorSource::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl ActorSource {
    /// A custom resolver.
    pub fn custom(f: impl Fn(&dyn RequestHead) -> Option<String> + Send + Sync + 'static) -> Self {
        ActorSource::Custom(Arc::new(f))
    }

    /// The actor of a request: `extension` (an [`Actor`] set by the application's
    /// authentication) when present, else what this source finds. `Ok(None)` is the anonymous
    /// namespace, only for [`ActorSource::Anonymous`]; any other source that finds nothing is
    /// [`ActorMissing::NotFound`], and a header source whose header was sent more than once
    /// [`ActorMissing::Repeated`] (both a 401).
    pub fn actor_of(&self, extension: Option<&Actor>, head: &dyn RequestHead) -> Result<Option<String>, ActorMissing> {
        // An empty identity is none: it must never land in the shared anonymous namespace.
        if let Some(actor) = extension.filter(|a| !a.0.is_empty()) {
            return Ok(Some(actor.0.clone()));
        }
        let header = match self {
            ActorSource::Anonymous => return Ok(None),
            ActorSource::Header(name) => Some(name.as_str()),
            ActorSource::BearerToken => Some("authorization"),
            ActorSource::Custom(_) => None,
        };
        if header.is_some_and(|name| head.header_values(name).len() > 1) {
            return Err(ActorMissing::Repeated);
        }
        self.resolve(head).filter(|a| !a.is_empty()).map(Some).ok_or(ActorMissing::NotFound)
    }

    /// What this source reads from a request head; `None` when it finds nothing (and always for
    /// [`ActorSource::Anonymous`]).
    pub fn resolve(&self, head: &dyn RequestHead) -> Option<String> {
        match self {
            ActorSource::Anonymous => None,
            ActorSource::Header(name) => head.header(name).and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned),
            ActorSource::BearerToken => head
                .header("authorization")
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()),
            ActorSource::Custom(f) => f(head),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Head(Vec<(&'static str, &'static str)>);
    impl RequestHead for Head {
        fn header_values(&self, name: &str) -> Vec<&[u8]> {
            self.0.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_bytes()).collect()
        }
    }

    #[test]
    fn resolves_from_each_source() {
        let head = Head(vec![("Authorization", "Bearer acct_1"), ("X-Account", "acct_2")]);
        assert_eq!(ActorSource::BearerToken.resolve(&head).as_deref(), Some("acct_1"));
        assert_eq!(ActorSource::Header("x-account".into()).resolve(&head).as_deref(), Some("acct_2"));
        assert_eq!(ActorSource::Anonymous.resolve(&head), None);
        let custom =
            ActorSource::custom(|h| h.header("x-account").map(|v| format!("c:{}", String::from_utf8_lossy(v))));
        assert_eq!(custom.resolve(&head).as_deref(), Some("c:acct_2"));
        assert_eq!(ActorSource::BearerToken.resolve(&Head(vec![("authorization", "Basic x")])), None);
    }

    #[test]
    fn an_extension_wins_and_a_configured_source_that_finds_nobody_is_missing() {
        let none = Head(vec![]);
        let ext = Actor("user_1".into());
        assert_eq!(ActorSource::BearerToken.actor_of(Some(&ext), &none), Ok(Some("user_1".into())));
        assert_eq!(ActorSource::BearerToken.actor_of(None, &none), Err(ActorMissing::NotFound));
        assert_eq!(ActorSource::Header("x-account".into()).actor_of(None, &none), Err(ActorMissing::NotFound));
        assert_eq!(ActorSource::Anonymous.actor_of(None, &none), Ok(None));
        // An empty extension (say, a JWT with an empty `sub`) is no identity.
        assert_eq!(ActorSource::BearerToken.actor_of(Some(&Actor(String::new())), &none), Err(ActorMissing::NotFound));
    }

    /// A gateway that appends an identity header instead of replacing it must not let the
    /// request pick the namespace: a repeated identity header is no identity.
    #[test]
    fn a_repeated_identity_header_is_refused_not_picked() {
        let twice = Head(vec![("Authorization", "Bearer acct_1"), ("authorization", "Bearer acct_2")]);
        assert_eq!(ActorSource::BearerToken.actor_of(None, &twice), Err(ActorMissing::Repeated));
        let twice = Head(vec![("X-Account", "a"), ("x-account", "b")]);
        assert_eq!(ActorSource::Header("x-account".into()).actor_of(None, &twice), Err(ActorMissing::Repeated));
        // The application's own authentication decided: its answer stands.
        let verified = Actor("verified".into());
        assert_eq!(ActorSource::BearerToken.actor_of(Some(&verified), &twice), Ok(Some("verified".into())));
        assert_eq!(ActorSource::Anonymous.actor_of(None, &twice), Ok(None));
    }

    #[test]
    fn stores_see_a_fixed_size_digest_never_the_credential() {
        let jwt = "eyJ".repeat(1000);
        let d = digest(&jwt);
        assert_eq!(d.len(), 64);
        assert!(!d.contains("eyJ"));
        assert_ne!(digest("a"), digest("b"));
        assert_eq!(digest(""), "");
    }
}
