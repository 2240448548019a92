//! Who is calling: the actor that namespaces idempotency keys.
//!
//! Keys are stored under scope + actor + key, so a caller can never replay another caller's
//! response by guessing or reusing its key. The actor is resolved once per request: an [`Actor`]
//! placed in the request's extensions by the application's authentication wins; otherwise the
//! [`ActorSource`] configured at start-up reads it from the request head.

use std::fmt;
use std::sync::Arc;

/// The caller's identity, as a request extension set by authentication middleware or extractors.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Actor(pub String);

/// Read access to a request's headers, implemented by each framework adapter.
pub trait RequestHead {
    /// The first value of header `name` (case-insensitive), if any.
    fn header(&self, name: &str) -> Option<&[u8]>;
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

    /// Resolves the actor of a request; `None` means anonymous.
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
        fn header(&self, name: &str) -> Option<&[u8]> {
            self.0.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_bytes())
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
}
