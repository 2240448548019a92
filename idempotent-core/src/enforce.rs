//! Enforcement decisions, framework-free: is a request's route a mutating one that no
//! `#[idempotent]` handler protects or exempts, and what to do about it.
//!
//! Each adapter's `Enforce` middleware reads the request's method and matched route and asks an
//! [`Enforcer`]; the adapters add only their framework's glue.

use crate::problem::{Problem, ProblemKind};
use crate::registry::{self, Framework, RouteRecord};
pub use crate::registry::{MutatingMethods, Unprotected};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// What to do with a request to an unprotected, non-exempt mutating route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serve it and log one warning per route.
    Warn,
    /// Answer 500 problem+json without running the handler.
    Refuse,
}

/// Decides, per request, whether a route is unprotected, and logs it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Enforcer {
    mode: Mode,
    methods: MutatingMethods,
    records: Arc<[&'static RouteRecord]>,
    warned: Arc<Mutex<HashSet<(String, String)>>>,
}

impl Enforcer {
    /// Enforcement in `mode` against the registered routes of `framework`, `POST` and `PATCH`
    /// counted as mutating.
    pub fn new(mode: Mode, framework: Framework) -> Self {
        Self::with_records(mode, registry::routes_of(framework))
    }

    /// Enforcement against `records` instead of the registry. Logs every record without a method
    /// and path: enforcement cannot match it and treats its route as unprotected (an error under
    /// [`Mode::Refuse`], whose requests would be refused).
    pub fn with_records(mode: Mode, records: Vec<&'static RouteRecord>) -> Self {
        for r in records.iter().filter(|r| r.route().is_none()) {
            let message = "#[idempotent] handler has no method and path (add `route = \"METHOD /path\"`): \
                           enforcement cannot match it and treats its route as unprotected";
            match mode {
                Mode::Refuse => tracing::error!(handler = r.handler, file = r.file, line = r.line, "{message}"),
                Mode::Warn => tracing::warn!(handler = r.handler, file = r.file, line = r.line, "{message}"),
            }
        }
        Self { mode, methods: MutatingMethods::default(), records: records.into(), warned: Arc::default() }
    }

    /// Which methods count as mutating (default [`MutatingMethods::POST_PATCH`]).
    pub fn methods(self, methods: MutatingMethods) -> Self {
        Self { methods, ..self }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether a request to `method` + `path` (the matched route pattern) is unprotected and not
    /// exempt.
    pub fn is_unprotected(&self, method: &str, path: &str) -> bool {
        self.methods.contains(method) && !registry::covers(&self.records, method, path)
    }

    /// `None` to serve the request, `Some(problem)` to refuse it with that problem. Under
    /// [`Mode::Warn`] the first request to each unprotected route is logged as a warning.
    pub fn check(&self, method: &str, path: &str) -> Option<Problem> {
        if !self.is_unprotected(method, path) {
            return None;
        }
        let unprotected = Unprotected { method: method.to_owned(), path: path.to_owned() };
        match self.mode {
            Mode::Warn => {
                let first = self
                    .warned
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert((unprotected.method.clone(), unprotected.path.clone()));
                if first {
                    tracing::warn!(method, path, "{unprotected}");
                }
                None
            }
            Mode::Refuse => {
                tracing::error!(method, path, "refused: {unprotected}");
                Some(Problem::new(
                    ProblemKind::Misconfigured,
                    format!(
                        "{method} {path} changes state but has no idempotency policy, and this server refuses such \
                         routes; this is a server configuration bug."
                    ),
                ))
            }
        }
    }
}

/// The mutating routes among `routes` (`(method, route pattern)`) that no `#[idempotent]` handler
/// of `framework` protects or exempts.
pub fn unprotected(framework: Framework, routes: &[(&str, &str)], methods: MutatingMethods) -> Vec<Unprotected> {
    registry::check_routes(&registry::routes_of(framework), routes, methods)
}

/// Test helper behind the adapters' `assert_protected`: panics, listing each one, when a
/// mutating route among `routes` is neither protected nor exempt.
#[track_caller]
pub fn assert_protected(framework: Framework, routes: &[(&str, &str)], methods: MutatingMethods) {
    let missing = unprotected(framework, routes, methods);
    if !missing.is_empty() {
        let lines: Vec<String> = missing.iter().map(|u| format!("  - {u}")).collect();
        panic!("{} mutating route(s) without an idempotency policy:\n{}", missing.len(), lines.join("\n"));
    }
}
