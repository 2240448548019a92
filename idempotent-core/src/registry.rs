//! The route registry: every `#[idempotent]` handler of the binary, collected at link time.
//!
//! The macro submits one const [`RouteRecord`] per annotated handler through `inventory`:
//! a *protected* route carries a [`Policy`]; an *exempt* route (`#[idempotent(exempt = "...")]`)
//! carries the reason it is deliberately left unprotected and no policy.
//!
//! - [`routes`] iterates every record in a stable order (see [`RouteRecord::sort_key`]);
//!   [`routes_of`] keeps one framework's.
//! - [`validate`] checks records before the application serves traffic: one
//!   [`RegistryError`] per problem.
//! - [`check_routes`] compares a list of routes with the routes the records declare and lists the
//!   mutating ones that are neither protected nor exempt (a test helper; enforcement at run time
//!   is [`crate::enforce`]).
//! - [`observe`] and [`served_at`]: the full paths each protected handler has served, for reports.
//!
//! # Validation rules
//! A registry is refused when:
//! - two protected routes of one framework share a scope (their keys would collide);
//! - two records claim the same method and path;
//! - `ttl`, `lease` are zero, or `lease` is longer than `ttl`;
//! - `on_conflict = "wait"` has a zero `wait_timeout` (a duplicate could never wait);
//! - `store = "all"` is combined with `fail_open = true`: `all` promises that the handler never
//!   runs twice for one key, `fail_open` runs it unprotected whenever the store is unreachable;
//! - an exemption has an empty reason, or also declares a policy;
//! - a record has neither a policy nor an exemption.
//!
//! `key = "optional"` together with `fail_open = true` is accepted: both say "best effort"
//! (requests without a key, and requests while the store is down, run unprotected), which is a
//! coherent choice during a gradual rollout.

use crate::policy::{ConflictMode, Policy, StoredOutcomes};
use std::collections::BTreeMap;
use std::fmt;

/// The adapter a protected handler was written for: a web framework's, or a message broker's
/// (a consumer handler, see [`crate::protocol::consume`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Framework {
    /// axum.
    Axum,
    /// actix-web.
    Actix,
    /// A NATS JetStream consumer (`idempotent-nats`).
    Nats,
    /// A RabbitMQ (AMQP 0-9-1) consumer.
    RabbitMq,
}

impl Framework {
    /// Lowercase name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Framework::Axum => "axum",
            Framework::Actix => "actix",
            Framework::Nats => "nats",
            Framework::RabbitMq => "rabbitmq",
        }
    }

    /// Whether its handlers consume messages from a broker rather than serve HTTP routes.
    pub const fn is_consumer(self) -> bool {
        matches!(self, Framework::Nats | Framework::RabbitMq)
    }

    /// How its requests arrive: the `transport` label of the request metrics and field of the
    /// request span: `http`, `nats` or `amqp`.
    pub const fn transport(self) -> &'static str {
        match self {
            Framework::Axum | Framework::Actix => crate::telemetry::HTTP,
            Framework::Nats => "nats",
            Framework::RabbitMq => "amqp",
        }
    }
}

/// One annotated handler, as the macro registered it. Const-constructible.
///
/// A protected route has `policy: Some(..)` and `exempt: None`; an exempt route has
/// `policy: None` and `exempt: Some(reason)`. [`validate`] refuses any other combination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRecord {
    /// The route's policy; `None` for an exempt route.
    pub policy: Option<Policy>,
    /// Why the route is deliberately left without a policy; `None` for a protected route.
    pub exempt: Option<&'static str>,
    /// `module::path::handler_name`.
    pub handler: &'static str,
    /// Source file of the handler.
    pub file: &'static str,
    /// Line of the attribute.
    pub line: u32,
    /// Framework of the adapter the macro was used through.
    pub framework: Framework,
    /// HTTP method (uppercase), where known.
    pub method: Option<&'static str>,
    /// Route path as registered with the framework (`/payments/{id}`), where known.
    pub path: Option<&'static str>,
}

impl RouteRecord {
    /// A protected route with no known method and path.
    pub const fn protected(
        policy: Policy,
        handler: &'static str,
        file: &'static str,
        line: u32,
        framework: Framework,
    ) -> Self {
        Self { policy: Some(policy), exempt: None, handler, file, line, framework, method: None, path: None }
    }

    /// A route deliberately left unprotected, for `reason`.
    pub const fn exempted(
        reason: &'static str,
        handler: &'static str,
        file: &'static str,
        line: u32,
        framework: Framework,
    ) -> Self {
        Self { policy: None, exempt: Some(reason), handler, file, line, framework, method: None, path: None }
    }

    /// The same record with `method` and `path`.
    pub const fn at(self, method: &'static str, path: &'static str) -> Self {
        Self { method: Some(method), path: Some(path), ..self }
    }

    /// The scope of a protected route.
    pub fn scope(&self) -> Option<&'static str> {
        self.policy.map(|p| p.scope)
    }

    /// Whether the route is deliberately exempt.
    pub fn is_exempt(&self) -> bool {
        self.exempt.is_some()
    }

    /// `handler at file:line`, for messages.
    pub fn location(&self) -> String {
        format!("{} at {}:{}", self.handler, self.file, self.line)
    }

    /// `METHOD /path` when both are known.
    pub fn route(&self) -> Option<String> {
        Some(format!("{} {}", self.method?, self.path?))
    }

    /// The order of [`routes`]: protected routes first, by scope; then exempt routes; ties
    /// broken by path, method, handler, file and line, so the order never depends on link order.
    pub fn sort_key(&self) -> impl Ord + '_ {
        (
            self.is_exempt(),
            self.scope().unwrap_or(""),
            self.path.unwrap_or(""),
            self.method.unwrap_or(""),
            self.handler,
            self.file,
            self.line,
        )
    }
}

inventory::collect!(RouteRecord);

/// Every registered route of every framework, sorted by [`RouteRecord::sort_key`].
pub fn routes() -> Vec<&'static RouteRecord> {
    sorted(inventory::iter::<RouteRecord>.into_iter().collect())
}

/// The registered routes of one framework, sorted by [`RouteRecord::sort_key`].
///
/// A binary may link handlers of both adapters (a library offering both apps); each runtime
/// validates and reports its own.
pub fn routes_of(framework: Framework) -> Vec<&'static RouteRecord> {
    sorted(inventory::iter::<RouteRecord>.into_iter().filter(|r| r.framework == framework).collect())
}

/// Sorts `records` by [`RouteRecord::sort_key`].
pub fn sorted(mut records: Vec<&RouteRecord>) -> Vec<&RouteRecord> {
    records.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    records
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
    /// Two records claim the same method and path.
    DuplicateRoute {
        /// `METHOD /path`.
        route: String,
        /// The handlers (with file:line) that claim it.
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
    /// An exemption that cannot be honoured, or a record with neither policy nor exemption.
    Exemption {
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
            RegistryError::DuplicateRoute { route, handlers } => {
                write!(f, "route `{route}` is registered by more than one handler: {}", handlers.join(", "))
            }
            RegistryError::Impossible { scope, handler, reason } => write!(f, "scope `{scope}` ({handler}): {reason}"),
            RegistryError::Exemption { handler, reason } => write!(f, "exempt route ({handler}): {reason}"),
        }
    }
}

impl std::error::Error for RegistryError {}

/// Checks `records` (see the module documentation for the rules). One error per problem:
/// duplicates first (by scope, then by route), then each record's own problems in input order.
pub fn validate(records: &[&RouteRecord]) -> Result<(), Vec<RegistryError>> {
    let mut errors = Vec::new();
    let mut by_scope: BTreeMap<(Framework, &str), Vec<&RouteRecord>> = BTreeMap::new();
    let mut by_route: BTreeMap<(Framework, &str, &str), Vec<&RouteRecord>> = BTreeMap::new();
    for r in records {
        if let (Some(p), None) = (&r.policy, r.exempt) {
            by_scope.entry((r.framework, p.scope)).or_default().push(r);
        }
        if let (Some(m), Some(p)) = (r.method, r.path) {
            by_route.entry((r.framework, m, p)).or_default().push(r);
        }
    }
    for ((_, scope), rs) in &by_scope {
        if rs.len() > 1 {
            errors.push(RegistryError::DuplicateScope { scope, handlers: rs.iter().map(|r| r.location()).collect() });
        }
    }
    for ((_, method, path), rs) in &by_route {
        if rs.len() > 1 {
            errors.push(RegistryError::DuplicateRoute {
                route: format!("{method} {path}"),
                handlers: rs.iter().map(|r| r.location()).collect(),
            });
        }
    }
    for r in records {
        match (&r.policy, r.exempt) {
            (Some(p), None) => check_policy(r, p, &mut errors),
            (policy, Some(reason)) => {
                let mut bad = |reason: String| errors.push(RegistryError::Exemption { handler: r.location(), reason });
                if reason.trim().is_empty() {
                    bad("the exemption reason is empty; say why the route needs no idempotency key".into());
                }
                if let Some(p) = policy {
                    bad(format!("the route is exempt and also declares a policy (scope `{}`); keep one", p.scope));
                }
            }
            (None, None) => errors.push(RegistryError::Exemption {
                handler: r.location(),
                reason: "the record has neither a policy nor an exemption".into(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn check_policy(r: &RouteRecord, p: &Policy, errors: &mut Vec<RegistryError>) {
    let mut bad = |reason: String| {
        errors.push(RegistryError::Impossible { scope: p.scope, handler: r.location(), reason });
    };
    if p.scope.is_empty() {
        bad("the scope is empty".into());
    }
    if p.ttl.is_zero() {
        bad("ttl is zero: nothing would ever be replayed".into());
    }
    if p.lease.is_zero() {
        bad("lease is zero: every claim would expire at once".into());
    }
    if p.lease > p.ttl {
        bad(format!("lease ({:?}) is longer than ttl ({:?})", p.lease, p.ttl));
    }
    if p.on_conflict == ConflictMode::Wait && p.wait_timeout.is_zero() {
        bad("on_conflict is `wait` with a zero wait_timeout: a duplicate could never wait".into());
    }
    if p.transactional && (p.fail_open || p.key == crate::policy::KeyRequirement::Optional) {
        bad("transactional needs the store and a key: it cannot be combined with fail_open or an optional key".into());
    }
    if let Some(token_ttl) = p.key_source.token_ttl() {
        if token_ttl.is_zero() {
            bad("the issued token's ttl is zero: no token could ever be submitted".into());
        }
        if token_ttl > p.ttl {
            bad(format!(
                "the issued token lives {token_ttl:?} but the outcome is kept only {:?}: a form resubmitted after that \
                 would run again; make ttl at least the token's ttl",
                p.ttl
            ));
        }
        if p.key == crate::policy::KeyRequirement::Optional {
            bad("an issued token cannot be optional: a form without one would run unprotected".into());
        }
    }
    if p.outcomes == StoredOutcomes::All && p.fail_open {
        bad("store `all` promises the handler never runs twice for one key, but fail_open runs it unprotected \
             when the store is unreachable; drop one"
            .into());
    }
}

/// Validates every registered route; see [`validate`].
pub fn validate_registry() -> Result<(), Vec<RegistryError>> {
    validate(&routes())
}

/// Validates the registered routes of `framework`; see [`validate`].
pub fn validate_framework(framework: Framework) -> Result<(), Vec<RegistryError>> {
    validate(&routes_of(framework))
}

/// Where requests reached each handler: `METHOD /full/path`, as served.
///
/// The path a handler is mounted at is only known to the router, and on axum only once a request
/// takes it (`Router::nest` prefixes, actix-web scopes). Protected handlers report every route they
/// serve here, so reports show full paths without the application writing them twice.
static SERVED: std::sync::RwLock<BTreeMap<(Framework, &'static str), std::collections::BTreeSet<String>>> =
    std::sync::RwLock::new(BTreeMap::new());

/// One protected handler as generated code sees it: its name, and the last route it reported, so
/// that reporting the same route again costs one atomic load.
#[derive(Debug)]
pub struct Site {
    /// `module::path::handler_name`, as in its [`RouteRecord`].
    pub handler: &'static str,
    seen: std::sync::atomic::AtomicU64,
}

impl Site {
    /// The site of `handler`.
    pub const fn new(handler: &'static str) -> Self {
        Self { handler, seen: std::sync::atomic::AtomicU64::new(0) }
    }
}

/// Records that `site`'s handler of `framework` served `method` + `path` (the matched route
/// pattern). A route already reported last time is recognised without a lock (FNV-1a of method
/// and path against the site's last one), so this is cheap on every request.
pub fn observe(framework: Framework, site: &Site, method: &str, path: &str) {
    use std::sync::atomic::Ordering;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in method.bytes().chain([b' ']).chain(path.bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    if site.seen.load(Ordering::Relaxed) == hash {
        return;
    }
    let route = format!("{method} {path}");
    let mut served = SERVED.write().unwrap_or_else(|p| p.into_inner());
    served.entry((framework, site.handler)).or_default().insert(route);
    site.seen.store(hash, Ordering::Relaxed);
}

/// The routes `record`'s handler has served so far (`METHOD /full/path`), sorted.
pub fn served_at(record: &RouteRecord) -> Vec<String> {
    let served = SERVED.read().unwrap_or_else(|p| p.into_inner());
    served.get(&(record.framework, record.handler)).map(|r| r.iter().cloned().collect()).unwrap_or_default()
}

/// Where a consumer handler takes its messages from, as its runner bound it at start-up (the
/// attribute does not know it: the stream or queue, filter and consumer name are the
/// application's configuration).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConsumerBinding {
    /// The JetStream stream, or the RabbitMQ queue, the messages are read from.
    pub source: String,
    /// The subject filter (NATS) or routing key (RabbitMQ), empty when there is none.
    pub filter: String,
    /// The durable consumer's name (NATS) or the consumer tag (RabbitMQ): part of every record
    /// key of its deliveries, so two consumers of one stream (fan-out) each process a message
    /// once.
    pub consumer: String,
}

static BOUND: std::sync::RwLock<BTreeMap<(Framework, &'static str), std::collections::BTreeSet<ConsumerBinding>>> =
    std::sync::RwLock::new(BTreeMap::new());

/// Records that the consumer handler `handler` of `framework` (its record's `handler` path)
/// takes messages from `binding`, for reports. A runner calls it once it has checked the
/// consumer's configuration.
pub fn bind_consumer(framework: Framework, handler: &'static str, binding: ConsumerBinding) {
    let mut bound = BOUND.write().unwrap_or_else(|p| p.into_inner());
    bound.entry((framework, handler)).or_default().insert(binding);
}

/// What `record`'s consumer handler was bound to so far ([`bind_consumer`]), sorted.
pub fn bound_to(record: &RouteRecord) -> Vec<ConsumerBinding> {
    let bound = BOUND.read().unwrap_or_else(|p| p.into_inner());
    bound.get(&(record.framework, record.handler)).map(|b| b.iter().cloned().collect()).unwrap_or_default()
}

/// Which methods count as mutating for enforcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MutatingMethods {
    /// `PUT` counts (off by default: a PUT that replaces a resource is naturally idempotent).
    pub put: bool,
    /// `DELETE` counts (off by default, for the same reason).
    pub delete: bool,
}

impl Default for MutatingMethods {
    fn default() -> Self {
        Self::POST_PATCH
    }
}

impl MutatingMethods {
    /// `POST` and `PATCH` only (the default).
    pub const POST_PATCH: Self = Self { put: false, delete: false };
    /// `POST`, `PATCH`, `PUT` and `DELETE`.
    pub const ALL: Self = Self { put: true, delete: true };

    /// Whether `method` (any case) is mutating under this setting.
    pub fn contains(self, method: &str) -> bool {
        match method.to_ascii_uppercase().as_str() {
            "POST" | "PATCH" => true,
            "PUT" => self.put,
            "DELETE" => self.delete,
            _ => false,
        }
    }
}

/// A mutating route that is neither protected nor exempt.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Unprotected {
    /// Uppercase HTTP method.
    pub method: String,
    /// Route path as registered with the framework.
    pub path: String,
}

impl fmt::Display for Unprotected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} has no idempotency policy; add #[idempotent(scope = ...)] to its handler, \
             or #[idempotent(exempt = \"reason\")] if retries are safe without a key",
            self.method, self.path
        )
    }
}

/// Whether `records` protect or exempt `method` + `path` (method compared case-insensitively).
pub fn covers(records: &[&RouteRecord], method: &str, path: &str) -> bool {
    records.iter().any(|r| r.path == Some(path) && r.method.is_some_and(|m| m.eq_ignore_ascii_case(method)))
}

/// The mutating routes among `app_routes` (`(method, path)` pairs, paths as registered with the
/// framework) that `records` neither protect nor exempt; sorted, without duplicates.
///
/// A handler is only matched when its record declares its method and path (an actix-web routing
/// attribute, or `route = "METHOD /path"`): a test helper for declared routes. At run time the
/// adapters' `Enforce` recognises handlers by what their generated code does instead (see
/// [`crate::enforce`]).
pub fn check_routes(
    records: &[&RouteRecord],
    app_routes: &[(&str, &str)],
    methods: MutatingMethods,
) -> Vec<Unprotected> {
    let mut out: Vec<Unprotected> = app_routes
        .iter()
        .filter(|(m, p)| methods.contains(m) && !covers(records, m, p))
        .map(|(m, p)| Unprotected { method: m.to_ascii_uppercase(), path: (*p).to_owned() })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PAY: RouteRecord = RouteRecord::protected(
        Policy {
            identity: crate::policy::Identity {
                body: crate::policy::Part::Only(&["amount"]),
                ..crate::policy::Identity::WHOLE
            },
            ..Policy::new("payments.create")
        },
        "demo::create_payment",
        "src/main.rs",
        10,
        Framework::Axum,
    )
    .at("POST", "/payments");
    const PUT: RouteRecord =
        RouteRecord::exempted("natural key", "demo::put_profile", "src/main.rs", 30, Framework::Axum).at("PUT", "/me");

    fn errors(records: &[&RouteRecord]) -> Vec<String> {
        validate(records).unwrap_err().iter().map(ToString::to_string).collect()
    }

    fn with(policy: Policy) -> RouteRecord {
        RouteRecord { policy: Some(policy), ..PAY }
    }

    #[test]
    fn a_valid_registry_passes() {
        assert_eq!(validate(&[&PAY, &PUT]), Ok(()));
        assert_eq!(validate(&[]), Ok(()));
    }

    #[test]
    fn duplicate_scope() {
        let other = RouteRecord { handler: "demo::other", path: Some("/other"), ..PAY };
        let errs = validate(&[&PAY, &other]).unwrap_err();
        assert_eq!(
            errs,
            [RegistryError::DuplicateScope {
                scope: "payments.create",
                handlers: vec!["demo::create_payment at src/main.rs:10".into(), "demo::other at src/main.rs:10".into()],
            }]
        );
    }

    #[test]
    fn the_same_scope_on_two_frameworks_is_not_a_duplicate() {
        let actix = RouteRecord { framework: Framework::Actix, ..PAY };
        assert_eq!(validate(&[&PAY, &actix]), Ok(()));
    }

    #[test]
    fn duplicate_route() {
        let exempt = RouteRecord { method: Some("POST"), path: Some("/payments"), ..PUT };
        assert_eq!(
            errors(&[&PAY, &exempt]),
            ["route `POST /payments` is registered by more than one handler: demo::create_payment at \
              src/main.rs:10, demo::put_profile at src/main.rs:30"]
        );
    }

    #[test]
    fn zero_durations() {
        let e = errors(&[&with(Policy { ttl: Duration::ZERO, lease: Duration::ZERO, ..Policy::new("a") })]);
        assert_eq!(
            e,
            [
                "scope `a` (demo::create_payment at src/main.rs:10): ttl is zero: nothing would ever be replayed",
                "scope `a` (demo::create_payment at src/main.rs:10): lease is zero: every claim would expire at once",
            ]
        );
    }

    #[test]
    fn lease_longer_than_ttl() {
        let e = errors(&[&with(Policy {
            lease: Duration::from_secs(100),
            ttl: Duration::from_secs(10),
            ..Policy::new("a")
        })]);
        assert_eq!(e, ["scope `a` (demo::create_payment at src/main.rs:10): lease (100s) is longer than ttl (10s)"]);
    }

    #[test]
    fn wait_without_time_to_wait() {
        let e = errors(&[&with(Policy {
            on_conflict: ConflictMode::Wait,
            wait_timeout: Duration::ZERO,
            ..Policy::new("a")
        })]);
        assert_eq!(e.len(), 1);
        assert!(e[0].ends_with("on_conflict is `wait` with a zero wait_timeout: a duplicate could never wait"));
        // Reject ignores the wait timeout.
        assert!(validate(&[&with(Policy { wait_timeout: Duration::ZERO, ..Policy::new("a") })]).is_ok());
    }

    #[test]
    fn store_all_with_fail_open() {
        let e = errors(&[&with(Policy { outcomes: StoredOutcomes::All, fail_open: true, ..Policy::new("a") })]);
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("store `all` promises the handler never runs twice"), "{e:?}");
    }

    #[test]
    fn optional_key_with_fail_open_is_accepted() {
        let p = Policy { key: crate::policy::KeyRequirement::Optional, fail_open: true, ..Policy::new("a") };
        assert!(validate(&[&with(p)]).is_ok());
    }

    #[test]
    fn exemption_problems() {
        let both = RouteRecord { policy: Some(Policy::new("me.put")), ..PUT };
        let blank = RouteRecord { exempt: Some("  "), method: None, path: None, ..PUT };
        let neither = RouteRecord { policy: None, ..PAY };
        assert_eq!(
            errors(&[&both, &blank, &neither]),
            [
                "exempt route (demo::put_profile at src/main.rs:30): the route is exempt and also declares a \
                 policy (scope `me.put`); keep one",
                "exempt route (demo::put_profile at src/main.rs:30): the exemption reason is empty; say why the \
                 route needs no idempotency key",
                "exempt route (demo::create_payment at src/main.rs:10): the record has neither a policy nor an \
                 exemption",
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let dup = RouteRecord { handler: "demo::other", path: Some("/other"), ..PAY };
        let bad = RouteRecord {
            policy: Some(Policy { lease: Duration::from_secs(100), ttl: Duration::from_secs(10), ..Policy::new("q") }),
            path: Some("/q"),
            ..PAY
        };
        let errs = validate(&[&PAY, &dup, &bad]).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(matches!(&errs[0], RegistryError::DuplicateScope { scope: "payments.create", .. }));
        assert!(errs[1].to_string().contains("lease (100s) is longer than ttl (10s)"), "{}", errs[1]);
    }

    #[test]
    fn sorting_puts_protected_first_by_scope() {
        let b = RouteRecord { policy: Some(Policy::new("b")), ..PAY };
        let a = RouteRecord { policy: Some(Policy::new("a")), ..PAY };
        let order: Vec<_> = sorted(vec![&PUT, &b, &a]).iter().map(|r| r.scope()).collect();
        assert_eq!(order, [Some("a"), Some("b"), None]);
    }

    #[test]
    fn unprotected_routes() {
        let app = [
            ("POST", "/payments"),
            ("GET", "/payments"),
            ("PUT", "/me"),
            ("post", "/refunds"),
            ("PATCH", "/x"),
            ("DELETE", "/x"),
            ("POST", "/refunds"),
        ];
        let out = check_routes(&[&PAY, &PUT], &app, MutatingMethods::default());
        let text: Vec<String> = out.iter().map(|u| format!("{} {}", u.method, u.path)).collect();
        assert_eq!(text, ["PATCH /x", "POST /refunds"]);
        let out = check_routes(&[&PAY, &PUT], &app, MutatingMethods::ALL);
        assert_eq!(out.len(), 3);
        assert!(out[0].to_string().starts_with("DELETE /x has no idempotency policy"));
    }
}
