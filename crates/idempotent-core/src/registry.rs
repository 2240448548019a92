//! The route registry: every `#[idempotent]` handler of the binary, collected at link time.
//!
//! The macro submits one const [`RouteRecord`] per handler through `inventory`; [`routes`]
//! iterates them and [`validate`] checks them before the application serves traffic.

use crate::policy::Policy;
use std::collections::BTreeMap;
use std::fmt;

/// The web framework a route belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Framework {
    /// axum.
    Axum,
    /// actix-web.
    Actix,
}

impl Framework {
    /// Lowercase name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Framework::Axum => "axum",
            Framework::Actix => "actix",
        }
    }
}

/// One annotated handler, as the macro registered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRecord {
    /// The route's policy.
    pub policy: Policy,
    /// `module::path::handler_name`.
    pub handler: &'static str,
    /// Source file of the handler.
    pub file: &'static str,
    /// Line of the attribute.
    pub line: u32,
    /// Framework of the adapter the macro was used through.
    pub framework: Framework,
    /// HTTP method, where known.
    pub method: Option<&'static str>,
    /// Route path, where known.
    pub path: Option<&'static str>,
}

inventory::collect!(RouteRecord);

/// Every registered route, sorted by scope, then handler.
pub fn routes() -> Vec<&'static RouteRecord> {
    let mut all: Vec<&'static RouteRecord> = inventory::iter::<RouteRecord>.into_iter().collect();
    all.sort_by(|a, b| (a.policy.scope, a.handler).cmp(&(b.policy.scope, b.handler)));
    all
}

/// A problem found in the registry at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// Two handlers share a scope, so their keys would collide.
    DuplicateScope {
        /// The scope.
        scope: &'static str,
        /// The handlers (with file:line) that declare it.
        handlers: Vec<String>,
    },
    /// A policy whose settings contradict each other.
    Impossible {
        /// The scope.
        scope: &'static str,
        /// Handler with file:line.
        handler: String,
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::DuplicateScope { scope, handlers } => {
                write!(f, "scope `{scope}` is declared by more than one handler: {}", handlers.join(", "))
            }
            RegistryError::Impossible { scope, handler, reason } => write!(f, "scope `{scope}` ({handler}): {reason}"),
        }
    }
}

impl std::error::Error for RegistryError {}

fn location(r: &RouteRecord) -> String {
    format!("{} at {}:{}", r.handler, r.file, r.line)
}

/// Checks `records`: duplicate scopes and impossible settings. One error per problem.
pub fn validate(records: &[&RouteRecord]) -> Result<(), Vec<RegistryError>> {
    let mut errors = Vec::new();
    let mut by_scope: BTreeMap<&str, Vec<&RouteRecord>> = BTreeMap::new();
    for r in records {
        by_scope.entry(r.policy.scope).or_default().push(r);
    }
    for (scope, rs) in &by_scope {
        if rs.len() > 1 {
            errors.push(RegistryError::DuplicateScope { scope, handlers: rs.iter().map(|r| location(r)).collect() });
        }
    }
    for r in records {
        let p = &r.policy;
        let mut bad = |reason: String| {
            errors.push(RegistryError::Impossible { scope: p.scope, handler: location(r), reason });
        };
        if p.ttl.is_zero() {
            bad("ttl is zero: nothing would ever be replayed".into());
        }
        if p.lease.is_zero() {
            bad("lease is zero: every claim would expire at once".into());
        }
        if p.lease > p.ttl {
            bad(format!("lease ({:?}) is longer than ttl ({:?})", p.lease, p.ttl));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Validates every registered route; see [`validate`].
pub fn validate_registry() -> Result<(), Vec<RegistryError>> {
    validate(&routes())
}
