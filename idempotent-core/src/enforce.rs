//! Enforcement decisions, framework-free: is a request's route a mutating one that no
//! `#[idempotent]` handler protects or exempts, and what to do about it.
//!
//! # How a protected route is recognised
//! Not by comparing strings: the path a handler serves is the router's business (nested routers,
//! scopes, prefixes), and a path written twice goes stale. Instead, the code `#[idempotent]`
//! generates *says* it is there: an adapter's `Enforce` middleware puts a [`Gate`] on each
//! request to a mutating route it has not seen yet, and the generated extractor of a protected
//! (or exempt) handler opens it before anything reads the body. After the response the
//! [`Enforcer`] learns the route (method and matched pattern, e.g. `POST /v1/payments/{id}`):
//! protected, exempt, or unprotected. Learned routes are decided without a gate from then on.
//!
//! Under [`Mode::Refuse`] the gate also holds the request body shut until a protected handler
//! opens it, so an unprotected handler that reads a body (every `Json`, `Form`, `Bytes` or
//! `String` extractor) fails before its code runs, and the client gets the 500 problem instead.
//! A mutating handler that reads no body has nothing to hold back: it runs until its first
//! success (requests racing that first one run too; each is logged as an error), and every later
//! request is refused.
//!
//! Install `Enforce` innermost, next to the handlers (the first `.layer(..)` of an axum router):
//! a middleware inside it that reads the body would find it held back. [`Mode::Warn`] never holds a body; it logs
//! each unprotected route once.
//!
//! Each adapter's middleware adds only its framework's glue: reading the method and matched
//! route, wrapping its body type in [`GatedBody`], and sending the problem.

use crate::problem::{Problem, ProblemKind};
use crate::registry::{self, Framework};
pub use crate::registry::{MutatingMethods, Unprotected};
use bytes::Bytes;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

/// What to do with a request to an unprotected, non-exempt mutating route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serve it and log one warning per route.
    Warn,
    /// Answer 500 problem+json without running the handler.
    Refuse,
}

/// What a route turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// An `#[idempotent(scope = ..)]` handler serves it.
    Protected,
    /// An `#[idempotent(exempt = ..)]` handler serves it.
    Exempt,
    /// A mutating route no `#[idempotent]` handler serves.
    Unprotected,
}

const CLOSED: u8 = 0;
const PROTECTED: u8 = 1;
const EXEMPT: u8 = 2;

/// Put on a request by `Enforce`; opened by the generated code of protected and exempt handlers.
#[derive(Debug)]
pub struct Gate {
    state: AtomicU8,
    holds_body: bool,
    tripped: AtomicBool,
}

impl Gate {
    /// A closed gate; `holds_body` keeps the request body shut until it is opened.
    pub fn new(holds_body: bool) -> Self {
        Self { state: AtomicU8::new(CLOSED), holds_body, tripped: AtomicBool::new(false) }
    }

    /// Called by a protected handler's generated extractor, before it reads the body.
    pub fn open_protected(&self) {
        self.state.store(PROTECTED, Ordering::Release);
    }

    /// Called by an exempt handler's generated extractor, before any other extractor.
    pub fn open_exempt(&self) {
        self.state.store(EXEMPT, Ordering::Release);
    }

    /// What opened the gate, if anything did.
    pub fn opened_by(&self) -> Option<Learned> {
        match self.state.load(Ordering::Acquire) {
            PROTECTED => Some(Learned::Protected),
            EXEMPT => Some(Learned::Exempt),
            _ => None,
        }
    }

    /// Whether body data may flow: always when the gate does not hold the body or is open;
    /// otherwise `false`, and the attempt is remembered.
    pub fn admits_body(&self) -> bool {
        if !self.holds_body || self.opened_by().is_some() {
            return true;
        }
        self.tripped.store(true, Ordering::Release);
        false
    }

    /// Whether something tried to read the body while the gate held it.
    pub fn tripped(&self) -> bool {
        self.tripped.load(Ordering::Acquire)
    }
}

/// The error a [`GatedBody`] yields when its gate holds the body.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("request body held back: this mutating route has no idempotency policy")]
pub struct BodyHeld;

/// A request body behind a [`Gate`]: data flows once the gate is open, and an attempt to read
/// it before is an error. Implements `http_body::Body` (axum) and `Stream` (actix-web payloads).
#[derive(Debug)]
pub struct GatedBody<B> {
    gate: Arc<Gate>,
    inner: B,
}

impl<B> GatedBody<B> {
    /// `inner` behind `gate`.
    pub fn new(gate: Arc<Gate>, inner: B) -> Self {
        Self { gate, inner }
    }
}

impl<B> http_body::Body for GatedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if !this.gate.admits_body() {
            return Poll::Ready(Some(Err(Box::new(BodyHeld))));
        }
        Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, E> futures_util::Stream for GatedBody<S>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, Result<E, BodyHeld>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if !this.gate.admits_body() {
            return Poll::Ready(Some(Err(Err(BodyHeld))));
        }
        Pin::new(&mut this.inner).poll_next(cx).map(|item| item.map(|r| r.map_err(Ok)))
    }
}

/// What the middleware does with a request, before calling the application.
#[derive(Debug)]
pub enum Decision {
    /// Serve it as it is.
    Serve,
    /// Serve it with this gate on it (and its body behind it); report back with
    /// [`Enforcer::after`].
    Gate(Arc<Gate>),
    /// Answer this problem instead.
    Refuse(Problem),
}

/// Decides, per request, whether a route is unprotected, learns each route from the first
/// request that takes it, and logs. Cheap to clone; clones share what they learned.
#[derive(Debug, Clone)]
pub struct Enforcer {
    mode: Mode,
    methods: MutatingMethods,
    learned: Arc<RwLock<HashMap<(String, String), Learned>>>,
}

impl Enforcer {
    /// Enforcement in `mode`, `POST` and `PATCH` counted as mutating.
    pub fn new(mode: Mode) -> Self {
        Self { mode, methods: MutatingMethods::default(), learned: Arc::default() }
    }

    /// Which methods count as mutating (default [`MutatingMethods::POST_PATCH`]).
    pub fn methods(self, methods: MutatingMethods) -> Self {
        Self { methods, ..self }
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether requests with `method` are judged at all (the mutating methods); the others are
    /// always served, so a middleware need not even look up their route.
    pub fn judges(&self, method: &str) -> bool {
        self.methods.contains(method)
    }

    /// What is known of `method` + `route` (the matched route pattern) so far.
    pub fn learned(&self, method: &str, route: &str) -> Option<Learned> {
        let learned = self.learned.read().unwrap_or_else(|p| p.into_inner());
        learned.get(&(method.to_ascii_uppercase(), route.to_owned())).copied()
    }

    /// The decision for a request to `method` + `route`, before the application sees it.
    pub fn before(&self, method: &str, route: &str) -> Decision {
        if !self.methods.contains(method) {
            return Decision::Serve;
        }
        match self.learned(method, route) {
            Some(Learned::Protected | Learned::Exempt) => Decision::Serve,
            Some(Learned::Unprotected) => match self.mode {
                Mode::Warn => Decision::Serve,
                Mode::Refuse => {
                    tracing::error!(method, route, "refused: {}", unprotected(method, route));
                    Decision::Refuse(refusal(method, route))
                }
            },
            None => Decision::Gate(Arc::new(Gate::new(self.mode == Mode::Refuse))),
        }
    }

    /// After the application answered a gated request with `status`: learns what the route is,
    /// and returns the problem to send instead of the application's response when the gate held
    /// back the body of an unprotected route (its handler failed before running; nothing
    /// happened).
    ///
    /// Only evidence is learned: a handler that opened the gate is protected (or exempt); a
    /// success (`2xx`) that nothing opened the gate for came from an unprotected handler. Any other
    /// answer that nothing opened the gate for proves nothing (an authentication middleware or an
    /// earlier extractor may have answered, or redirected, before the handler was reached), so it
    /// is served and nothing is learned. A request whose held body was read is refused, but not learned
    /// either: whatever read it was refused, and the next request is judged afresh.
    pub fn after(&self, method: &str, route: &str, gate: &Gate, status: u16) -> Option<Problem> {
        let learn = |what: Learned| {
            let mut learned = self.learned.write().unwrap_or_else(|p| p.into_inner());
            learned.insert((method.to_ascii_uppercase(), route.to_owned()), what).is_none()
        };
        if let Some(opened) = gate.opened_by() {
            learn(opened);
            return None;
        }
        let unprotected = unprotected(method, route);
        if gate.tripped() {
            tracing::error!(method, route, "refused: {unprotected}");
            return Some(refusal(method, route));
        }
        // Only a success proves a handler ran: an error or a redirect (say, to a login page) may
        // come from an extractor or middleware that answered before the handler was reached.
        if !(200..300).contains(&status) {
            return None;
        }
        let first = learn(Learned::Unprotected);
        match self.mode {
            Mode::Warn if first => tracing::warn!(method, route, "{unprotected}"),
            Mode::Warn => {}
            Mode::Refuse => tracing::error!(
                method,
                route,
                "{unprotected}; its handler reads no body, so this request ran unprotected; later ones are refused"
            ),
        }
        None
    }

    /// One request through enforcement, the decision followed through for every adapter:
    /// `serve` runs the application on `request` (with the gate to put on it and its body, when
    /// there is one), `status` reads its answer's status, `refuse` answers a problem instead:
    /// before the application runs (given the request back) or in place of its answer.
    /// `route` is the matched route pattern, `None` when the router matched none.
    pub async fn serve<Q, R, F>(
        self,
        (method, route): (String, Option<String>),
        request: Q,
        serve: impl FnOnce(Q, Option<Arc<Gate>>) -> F,
        status: impl FnOnce(&R) -> u16,
        refuse: impl FnOnce(&Problem, Result<R, Q>) -> R,
    ) -> R
    where
        F: std::future::Future<Output = R>,
    {
        let route = route.filter(|_| self.judges(&method));
        match route.as_deref().map(|route| (route, self.before(&method, route))) {
            Some((_, Decision::Refuse(problem))) => refuse(&problem, Err(request)),
            Some((route, Decision::Gate(gate))) => {
                let response = serve(request, Some(gate.clone())).await;
                match self.after(&method, route, &gate, status(&response)) {
                    Some(problem) => refuse(&problem, Ok(response)),
                    None => response,
                }
            }
            _ => serve(request, None).await,
        }
    }
}

fn unprotected(method: &str, route: &str) -> Unprotected {
    Unprotected { method: method.to_ascii_uppercase(), path: route.to_owned() }
}

fn refusal(method: &str, route: &str) -> Problem {
    Problem::new(
        ProblemKind::Misconfigured,
        format!(
            "{} {route} changes state but has no idempotency policy, and this server refuses such routes; nothing \
             was executed. This is a server configuration bug.",
            method.to_ascii_uppercase()
        ),
    )
}

/// Declares an adapter's enforcement middleware type `Enforce`, a newtype of [`Enforcer`] with
/// the same constructors in every adapter, and the adapter's `unprotected` and
/// `assert_protected` test helpers. The adapter adds its framework's middleware impl.
#[doc(hidden)]
#[macro_export]
macro_rules! __adapter_enforce {
    ($framework:ident, $install:literal) => {
        pub use $crate::enforce::{Enforcer, Learned, Mode, MutatingMethods, Unprotected};

        #[doc = concat!("The enforcement middleware: `", $install, "`. Cheap to clone; clones share what they")]
        /// learned. Its decisions are those of the framework-free [`Enforcer`] it derefs to.
        #[derive(Debug, Clone)]
        pub struct Enforce(Enforcer);

        impl Enforce {
            /// Enforcement in `mode`, `POST` and `PATCH` counted as mutating.
            pub fn new(mode: Mode) -> Self {
                Self(Enforcer::new(mode))
            }

            /// Serve unprotected mutating routes, warning once per route.
            pub fn warn() -> Self {
                Self::new(Mode::Warn)
            }

            /// Refuse unprotected mutating routes with 500 problem+json.
            pub fn refuse() -> Self {
                Self::new(Mode::Refuse)
            }

            /// Which methods count as mutating (default [`MutatingMethods::POST_PATCH`]).
            pub fn methods(self, methods: MutatingMethods) -> Self {
                Self(self.0.methods(methods))
            }
        }

        impl ::std::ops::Deref for Enforce {
            type Target = Enforcer;

            fn deref(&self) -> &Enforcer {
                &self.0
            }
        }

        /// The mutating routes among `routes` (`(method, full route pattern)`) that no
        /// `#[idempotent]` handler of this framework declaring that route (in a routing attribute
        /// or `route = ".."`) protects or exempts, `POST` and `PATCH` counted as mutating. A test
        /// helper for declared routes: [`Enforce`] itself needs no declaration.
        pub fn unprotected(routes: &[(&str, &str)]) -> Vec<Unprotected> {
            unprotected_with(routes, MutatingMethods::default())
        }

        /// [`unprotected`] with a choice of mutating methods.
        pub fn unprotected_with(routes: &[(&str, &str)], methods: MutatingMethods) -> Vec<Unprotected> {
            $crate::enforce::unprotected_routes($crate::registry::Framework::$framework, routes, methods)
        }

        /// Test helper: panics, listing each one, when a mutating route among `routes` is neither
        /// protected nor exempt by a handler that declares it.
        #[track_caller]
        pub fn assert_protected(routes: &[(&str, &str)]) {
            $crate::enforce::assert_protected(
                $crate::registry::Framework::$framework,
                routes,
                MutatingMethods::default(),
            );
        }
    };
}

/// The mutating routes among `routes` (`(method, route pattern)`) that no `#[idempotent]` handler
/// of `framework` protects or exempts, judged by the method and path the records declare (an
/// actix-web routing attribute, or `route = ".."`). A test helper: at run time the `Enforce`
/// middleware recognises handlers by their generated code instead.
pub fn unprotected_routes(framework: Framework, routes: &[(&str, &str)], methods: MutatingMethods) -> Vec<Unprotected> {
    registry::check_routes(&registry::routes_of(framework), routes, methods)
}

/// Test helper behind the adapters' `assert_protected`: panics, listing each one, when a
/// mutating route among `routes` is neither protected nor exempt by a record that declares it.
#[track_caller]
pub fn assert_protected(framework: Framework, routes: &[(&str, &str)], methods: MutatingMethods) {
    let missing = unprotected_routes(framework, routes, methods);
    if !missing.is_empty() {
        let lines: Vec<String> = missing.iter().map(|u| format!("  - {u}")).collect();
        panic!("{} mutating route(s) without an idempotency policy:\n{}", missing.len(), lines.join("\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_is_learned_from_what_its_handler_does() {
        let e = Enforcer::new(Mode::Refuse);
        let Decision::Gate(gate) = e.before("POST", "/v1/payments") else { panic!("first request is gated") };
        gate.open_protected();
        assert!(gate.admits_body());
        assert!(e.after("POST", "/v1/payments", &gate, 201).is_none());
        assert!(matches!(e.before("POST", "/v1/payments"), Decision::Serve));
        assert!(matches!(e.before("GET", "/anything"), Decision::Serve));
    }

    #[test]
    fn refuse_holds_the_body_of_an_unprotected_route_and_refuses_from_then_on() {
        let e = Enforcer::new(Mode::Refuse);
        let Decision::Gate(gate) = e.before("POST", "/unprotected") else { panic!() };
        assert!(!gate.admits_body());
        let problem = e.after("POST", "/unprotected", &gate, 400).expect("refused");
        assert_eq!(problem.status, 500);
        assert!(problem.detail.contains("POST /unprotected changes state"));
        // Each request is judged afresh: whatever read the held body was refused.
        assert!(matches!(e.before("POST", "/unprotected"), Decision::Gate(_)));
    }

    #[test]
    fn a_success_nothing_opened_the_gate_for_is_learned_as_unprotected() {
        let e = Enforcer::new(Mode::Refuse);
        let Decision::Gate(gate) = e.before("POST", "/bodiless") else { panic!() };
        assert!(e.after("POST", "/bodiless", &gate, 200).is_none(), "it ran; its answer is sent");
        assert!(matches!(e.before("POST", "/bodiless"), Decision::Refuse(_)));
        assert!(matches!(e.clone().before("post", "/bodiless"), Decision::Refuse(_)), "clones share");
    }

    #[test]
    fn an_error_nothing_opened_the_gate_for_proves_nothing() {
        // An authentication middleware answered 401 before the (protected) handler was reached.
        let e = Enforcer::new(Mode::Refuse);
        let Decision::Gate(gate) = e.before("POST", "/payments") else { panic!() };
        assert!(e.after("POST", "/payments", &gate, 401).is_none());
        assert_eq!(e.learned("POST", "/payments"), None);
        // Nor does a redirect to a login page from an extractor that ran first.
        let Decision::Gate(gate) = e.before("POST", "/payments") else { panic!("still unknown") };
        assert!(e.after("POST", "/payments", &gate, 303).is_none());
        assert_eq!(e.learned("POST", "/payments"), None);
        let Decision::Gate(gate) = e.before("POST", "/payments") else { panic!("still unknown") };
        gate.open_protected();
        assert!(e.after("POST", "/payments", &gate, 201).is_none());
        assert_eq!(e.learned("POST", "/payments"), Some(Learned::Protected));
    }

    #[test]
    fn warn_never_holds_a_body() {
        let e = Enforcer::new(Mode::Warn);
        let Decision::Gate(gate) = e.before("PATCH", "/notes/{id}") else { panic!() };
        assert!(gate.admits_body());
        assert!(e.after("PATCH", "/notes/{id}", &gate, 200).is_none());
        assert!(matches!(e.before("PATCH", "/notes/{id}"), Decision::Serve));
        assert_eq!(e.learned("PATCH", "/notes/{id}"), Some(Learned::Unprotected));
    }

    #[test]
    fn an_exempt_handler_opens_the_gate_too() {
        let e = Enforcer::new(Mode::Refuse).methods(MutatingMethods::ALL);
        let Decision::Gate(gate) = e.before("PUT", "/profile") else { panic!() };
        gate.open_exempt();
        assert!(e.after("PUT", "/profile", &gate, 200).is_none());
        assert_eq!(e.learned("PUT", "/profile"), Some(Learned::Exempt));
    }
}
