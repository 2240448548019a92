//! What a transport implements, and the sequence written once over it.
//!
//! A transport is a web framework's adapter (or any other way requests arrive). Per protected
//! request it implements [`Transport`] on a view of its request (method, route, query, path
//! parameters, headers, and what its middleware left: the runtime, an [`Actor`], an enforcement
//! [`Gate`]), reads the body when the whole body is part of the identity, and calls:
//!
//! 1. [`open`], first: the enforcement gate lets the body through;
//! 2. [`Context::read`], with the body read under the transport's limit when the whole body is
//!    part of the identity ([`unreadable_body`] when it cannot be): the request's identity
//!    parts, runtime and caller are gathered (the caller is read here, before the body extractor
//!    runs, on every transport);
//! 3. the handler's own body extractor, with [`Context::rejected`] answering its rejection;
//! 4. [`Context::task`], with the handler's response converted to an `http::Response`, run by
//!    [`finish`](super::finish) with the transport's spawn: the protocol's answer, to convert
//!    back.
//!
//! A minimal transport, a request type of its own with the protocol run over it:
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use idempotent_core::protocol::{finish, Actor, Context, Framework, Policy, RequestHead, Runtime, Site, Transport};
//! use idempotent_core::{engine::Config, store::MemoryStore};
//! use std::sync::Arc;
//!
//! /// One request as this transport receives it.
//! struct Message { headers: Vec<(&'static str, &'static str)>, body: &'static str, runtime: Runtime }
//!
//! impl RequestHead for Message {
//!     fn header_values(&self, name: &str) -> Vec<&[u8]> {
//!         self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_bytes()).collect()
//!     }
//! }
//!
//! impl Transport for Message {
//!     type Head = Vec<(&'static str, &'static str)>;
//!     fn head(&self) -> Self::Head { self.headers.clone() }
//!     fn method(&self) -> &str { "POST" }
//!     fn route(&self) -> Option<std::borrow::Cow<'_, str>> { Some("/orders".into()) }
//!     fn query(&self) -> Option<&str> { None }
//!     fn runtime(&self) -> Option<Runtime> { Some(self.runtime.clone()) }
//!     fn actor(&self) -> Option<Actor> { Some(Actor("acct_1".into())) }
//! }
//! # impl RequestHead for Vec<(&'static str, &'static str)> {
//! #     fn header_values(&self, name: &str) -> Vec<&[u8]> {
//! #         self.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_bytes()).collect()
//! #     }
//! # }
//!
//! static POLICY: Policy = Policy::new("orders.create");
//! static SITE: Site = Site { function: "create_order", module: "orders", file: file!(), line: line!() };
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let runtime = Runtime::new(Arc::new(MemoryStore::new()), Config::default());
//! let mut answers = Vec::new();
//! for _ in 0..2 {
//!     let message = Message { headers: vec![("Idempotency-Key", "o-1")], body: "{}", runtime: runtime.clone() };
//!     let context = Context::read(&message, Bytes::from(message.body));
//!     let fingerprint = context.fingerprint(&POLICY, Ok);
//!     let handler = async { http::Response::new(Full::new(Bytes::from("created"))) };
//!     let task = context.task(Framework::Axum, &POLICY, &SITE, fingerprint, handler);
//!     let response = finish(&POLICY, task, tokio::spawn).await;
//!     answers.push(response.headers().contains_key("idempotent-replayed"));
//! }
//! assert_eq!(answers, [false, true]); // the second delivery is a replay
//! # });
//! ```

use super::{body_problem, maps_rejection, rejection, Context, Incoming};
use crate::actor::{Actor, RequestHead};
use crate::enforce::Gate;
use crate::engine::Runtime;
use bytes::Bytes;
use http::Response;
use std::borrow::Cow;
use std::sync::Arc;

/// A transport's view of one protected request: what the protocol reads of it before the
/// handler runs. Headers are read through [`RequestHead`].
pub trait Transport: RequestHead {
    /// The request's head as the protected handler keeps it (for the key and actor headers, read
    /// once the handler's identity is known).
    type Head: RequestHead;

    /// The head to keep.
    fn head(&self) -> Self::Head;

    /// The request's method.
    fn method(&self) -> &str;

    /// The route pattern the request matched (`/payments/{id}`), when the router says.
    fn route(&self) -> Option<Cow<'_, str>>;

    /// The raw query string, without `?`.
    fn query(&self) -> Option<&str>;

    /// Adds the request's path parameters to `incoming`, in route order ([`Incoming::param`],
    /// or [`Incoming::param_partly_encoded`] for a router that leaves some encoded). None by
    /// default.
    fn params(&self, incoming: Incoming) -> Incoming {
        incoming
    }

    /// The runtime installed where the request was routed.
    fn runtime(&self) -> Option<Runtime>;

    /// The [`Actor`] the application's authentication set on the request, if any.
    fn actor(&self) -> Option<Actor>;

    /// The enforcement gate the `Enforce` middleware put on the request, if any.
    fn gate(&self) -> Option<Arc<Gate>> {
        None
    }
}

impl<H: RequestHead> Context<H> {
    /// The first step of a protected request, before its body extractor runs, once the gate is
    /// [`open`]: gathers the request's identity parts (`body` is the body when the whole body is
    /// part of the identity, else empty), the runtime and the caller's [`Actor`].
    pub fn read<T: Transport<Head = H>>(request: &T, body: Bytes) -> Self {
        let content_type = request.header("content-type");
        let incoming =
            Incoming::new(request.method(), request.route().as_deref()).query(request.query()).body(content_type, body);
        Self::new(request.params(incoming), request.runtime(), request.head(), request.actor())
    }

    /// Whether a rejection of the handler's body extractor with `status` is answered with a
    /// problem ([`rejected`](Self::rejected)) rather than as the framework wrote it.
    pub fn maps_rejection(&self, status: u16) -> bool {
        self.runtime().is_some_and(|r| maps_rejection(r.config(), status))
    }

    /// The problem that answers the body extractor's rejection with `status` and `message`, when
    /// [`maps_rejection`](Self::maps_rejection) (see [`rejection`]).
    pub fn rejected(&self, status: u16, message: &str) -> Option<Response<Bytes>> {
        rejection(self.runtime()?.config(), status, message)
    }
}

/// Opens the enforcement gate of a protected request, first of all (the `Enforce` middleware
/// holds the body until a protected or exempt handler claims the request).
pub fn open<T: Transport>(request: &T) {
    if let Some(gate) = request.gate() {
        gate.open_protected();
    }
}

/// The problem for a body that could not be read under the transport's limit: 413 when `error`
/// (or an error it wraps) is an `E`, the transport's limit error, else 400.
pub fn unreadable_body<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> Response<Bytes> {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<E>() {
            return body_problem(true, &error);
        }
        current = e.source();
    }
    body_problem(false, &error)
}

/// Opens the enforcement gate of an exempt handler's request.
pub fn exempt(gate: Option<&Arc<Gate>>) {
    if let Some(gate) = gate {
        gate.open_exempt();
    }
}

/// Whether a request's body is sent encoded (`Content-Encoding` other than `identity`): a
/// framework that decodes it while reading must hand the body extractor the bytes as they came.
pub fn encoded(head: &dyn RequestHead) -> bool {
    head.header("content-encoding").is_some_and(|e| !e.trim_ascii().eq_ignore_ascii_case(b"identity"))
}

/// A request body stream whose chunks are kept as they pass: the body read once for two readers,
/// the identity (which may read it decoded) and the body extractor (which gets [`TeeKept::raw`], the
/// bytes as they came, under the request's own headers).
#[derive(Debug)]
pub struct Tee<S> {
    inner: S,
    kept: Arc<std::sync::Mutex<bytes::BytesMut>>,
}

impl<S> Tee<S> {
    /// Keeps what `inner` yields.
    pub fn new(inner: S) -> Self {
        Self { inner, kept: Arc::default() }
    }

    /// A handle on the bytes kept so far, which outlives the stream.
    pub fn kept(&self) -> TeeKept {
        TeeKept(self.kept.clone())
    }
}

/// The bytes a [`Tee`] kept.
#[derive(Debug, Clone)]
pub struct TeeKept(Arc<std::sync::Mutex<bytes::BytesMut>>);

impl TeeKept {
    /// Every byte the stream yielded, as it came.
    pub fn raw(&self) -> Bytes {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).split().freeze()
    }
}

impl<S, E> futures_util::Stream for Tee<S>
where
    S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_next(cx);
        if let std::task::Poll::Ready(Some(Ok(chunk))) = &polled {
            self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(chunk);
        }
        polled
    }
}
