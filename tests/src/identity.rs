//! The request-identity conformance suite, written once and run against every adapter.
//!
//! [`identity_conformance_tests!`](crate::identity_conformance_tests) expands to one
//! `#[tokio::test]` per behaviour: which parts of a request make it "the same request" under one
//! `Idempotency-Key` (path parameters, the query in any order, form pairs in any order, raw bytes,
//! JSON numbers by value, a set field in any order), whose namespace a key lives in (the actor set
//! by the application's authentication), and how enforcement treats nested mounts and stale
//! routes. Its argument starts a fixture app on a loopback port and returns a [`Fixture`].
//!
//! # The fixture app
//! Each adapter's test binary serves the same routes, with a `MemoryStore` runtime configured with
//! `ActorSource::BearerToken`, `Enforce::refuse()` on the whole app, and an authentication step
//! that turns an `X-User` header (standing in for a verified token's subject) into an `Actor`
//! request extension:
//!
//! | route | handler | scope | identity |
//! |---|---|---|---|
//! | `POST /orders/{id}/cancel`, also under `/v1` | [`Counter::Cancel`] | `identity.cancel` | no body argument |
//! | `POST /search` | [`Counter::Search`] | `identity.search` | whole query |
//! | `POST /paged` | [`Counter::Paged`] | `identity.paged` | `fields = [query(page)]` |
//! | `POST /forms` | [`Counter::Forms`] | `identity.forms` | whole `Form<Pair>` body |
//! | `POST /bytes` | [`Counter::Bytes`] | `identity.bytes` | whole `Bytes` body |
//! | `POST /json` | [`Counter::Json`] | `identity.json` | whole `Json<Value>` body |
//! | `POST /tags` | [`Counter::Tags`] | `identity.tags` | `Json<Tags>`, `fields = [tags]` (a `HashSet`) |
//! | `POST /whoami` | [`Counter::Actor`] | `identity.actor` | whole `Json<Value>` body |
//! | `POST /elsewhere` | [`Counter::Elsewhere`] | `identity.stale` | declares `route = "POST /stale"` |
//! | `POST /stale` | [`Counter::Stale`] | none: unprotected, reads a `Json` body | |
//!
//! Every handler answers `201` with [`Counters::hit`]'s text (`"cancel run 1"`), so a replay is
//! recognisable by its body as well as by its `Idempotent-Replayed` header.

use crate::http::Captured;
use reqwest::{Client, RequestBuilder};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The `X-User` the suite authenticates as unless a test says otherwise.
pub const USER: &str = "tester";

/// The problem type of a key reused for a different request.
pub const KEY_REUSED: &str = "urn:idempotent:problem:key-reused";

/// The problem type of a request whose caller could not be identified.
pub const ACTOR_MISSING: &str = "urn:idempotent:problem:actor-missing";

/// The problem type of a server configuration bug (here: an unprotected mutating route).
pub const MISCONFIGURED: &str = "urn:idempotent:problem:misconfigured";

/// One handler of the fixture app, each with its own execution counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// `POST /orders/{id}/cancel` and `POST /v1/orders/{id}/cancel`.
    Cancel,
    /// `POST /search`.
    Search,
    /// `POST /paged`.
    Paged,
    /// `POST /forms`.
    Forms,
    /// `POST /bytes`.
    Bytes,
    /// `POST /json`.
    Json,
    /// `POST /tags`.
    Tags,
    /// `POST /whoami`.
    Actor,
    /// The protected handler mounted at `POST /elsewhere` that declares `POST /stale`.
    Elsewhere,
    /// The unprotected handler at `POST /stale`.
    Stale,
}

impl Counter {
    /// Every counter.
    pub const ALL: [Counter; 10] = [
        Counter::Cancel,
        Counter::Search,
        Counter::Paged,
        Counter::Forms,
        Counter::Bytes,
        Counter::Json,
        Counter::Tags,
        Counter::Actor,
        Counter::Elsewhere,
        Counter::Stale,
    ];

    /// The handler's name, as it appears in its answers.
    pub fn name(self) -> &'static str {
        match self {
            Counter::Cancel => "cancel",
            Counter::Search => "search",
            Counter::Paged => "paged",
            Counter::Forms => "forms",
            Counter::Bytes => "bytes",
            Counter::Json => "json",
            Counter::Tags => "tags",
            Counter::Actor => "actor",
            Counter::Elsewhere => "elsewhere",
            Counter::Stale => "stale",
        }
    }
}

/// How many times each handler of one fixture app ran; shared between the app and its test.
#[derive(Debug, Default)]
pub struct Counters([AtomicUsize; Counter::ALL.len()]);

impl Counters {
    /// Counts one execution of `counter`'s handler and returns the handler's answer, e.g.
    /// `"cancel run 1"` for its first execution.
    pub fn hit(&self, counter: Counter) -> String {
        let n = self.0[counter as usize].fetch_add(1, Ordering::SeqCst) + 1;
        format!("{} run {n}", counter.name())
    }

    /// How many times `counter`'s handler ran.
    pub fn get(&self, counter: Counter) -> usize {
        self.0[counter as usize].load(Ordering::SeqCst)
    }
}

/// A running fixture app.
#[derive(Debug)]
pub struct Fixture {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its handlers' execution counters.
    pub counters: Arc<Counters>,
    /// HTTP client.
    pub client: Client,
}

impl Fixture {
    /// A handle on an app listening at `addr` whose handlers count into `counters`.
    pub fn new(addr: SocketAddr, counters: Arc<Counters>) -> Self {
        Self { base: format!("http://{addr}"), counters, client: Client::new() }
    }

    /// The URL of `path_and_query`.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base)
    }

    /// `POST path_and_query` under `key`, authenticated as [`USER`].
    pub fn post(&self, path_and_query: &str, key: &str) -> RequestBuilder {
        self.client.post(self.url(path_and_query)).header("Idempotency-Key", key).header("X-User", USER)
    }

    /// [`Fixture::post`] with `body` as given, sent as `content_type`.
    pub fn post_raw(
        &self,
        path: &str,
        key: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> RequestBuilder {
        self.post(path, key).header(reqwest::header::CONTENT_TYPE, content_type).body(body)
    }

    /// How many times `counter`'s handler ran.
    pub fn count(&self, counter: Counter) -> usize {
        self.counters.get(counter)
    }

    /// Asserts the execution count of every handler: those in `expected` ran that many times,
    /// every other one never ran.
    #[track_caller]
    pub fn assert_counts(&self, expected: &[(Counter, usize)]) {
        let want: Vec<(&str, usize)> = Counter::ALL
            .iter()
            .map(|&c| (c.name(), expected.iter().find(|(e, _)| *e == c).map_or(0, |(_, n)| *n)))
            .collect();
        let got: Vec<(&str, usize)> = Counter::ALL.iter().map(|&c| (c.name(), self.count(c))).collect();
        assert_eq!(got, want, "handler executions");
    }
}

/// Asserts that `response` is the handler's own `201` answer `body` (it ran: not a replay).
#[track_caller]
pub fn assert_executed(response: &Captured, body: &str) {
    assert_eq!(response.status, 201, "body: {}", String::from_utf8_lossy(&response.body));
    assert!(!response.replayed(), "expected an execution, got a replay: {}", String::from_utf8_lossy(&response.body));
    assert_eq!(String::from_utf8_lossy(&response.body), body);
}

/// Asserts that `response` replays `first`: same status and body, `Idempotent-Replayed: true`.
#[track_caller]
pub fn assert_replay(response: &Captured, first: &Captured) {
    assert_eq!(response.status, first.status, "body: {}", String::from_utf8_lossy(&response.body));
    assert!(response.replayed(), "expected a replay: {:?}", response.headers);
    assert_eq!(String::from_utf8_lossy(&response.body), String::from_utf8_lossy(&first.body));
}

/// Asserts that `response` is a problem of `status` and `type_uri`, not a replay.
#[track_caller]
pub fn assert_problem(response: &Captured, status: u16, type_uri: &str) {
    response.assert_problem(status, type_uri);
    assert!(!response.replayed(), "a problem is never a replay");
}

/// `n` distinct tags, `t00`, `t01`, ...
pub fn tags(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t{i:02}")).collect()
}

/// Expands to the identity conformance tests, in a module `identity_conformance`; `$start` is an
/// async expression (evaluated in that module, which sees every item of the caller's module)
/// returning a fresh [`Fixture`] on every call.
#[macro_export]
macro_rules! identity_conformance_tests {
    ($start:expr) => {
        mod identity_conformance {
            #[allow(unused_imports)]
            use super::*;
            use $crate::http::{new_key, send};
            use $crate::identity::{
                assert_executed, assert_problem, assert_replay, tags, Counter, Fixture, ACTOR_MISSING, KEY_REUSED,
                MISCONFIGURED,
            };

            async fn fixture() -> Fixture {
                $start.await
            }

            const JSON: &str = "application/json";
            const FORM: &str = "application/x-www-form-urlencoded";
            const OCTETS: &str = "application/octet-stream";

            #[tokio::test]
            async fn path_parameters_are_part_of_the_identity() {
                let f = fixture().await;
                let key = new_key();
                let first = send(f.post("/orders/1/cancel", &key)).await;
                assert_executed(&first, "cancel run 1");
                let other_order = send(f.post("/orders/2/cancel", &key)).await;
                assert_problem(&other_order, 422, KEY_REUSED);
                f.assert_counts(&[(Counter::Cancel, 1)]);
                let retry = send(f.post("/orders/1/cancel", &key)).await;
                assert_replay(&retry, &first);
                f.assert_counts(&[(Counter::Cancel, 1)]);
            }

            #[tokio::test]
            async fn the_query_is_compared_in_any_order_but_by_every_value() {
                let f = fixture().await;
                let key = new_key();
                let first = send(f.post("/search?b=2&a=1", &key)).await;
                assert_executed(&first, "search run 1");
                let reordered = send(f.post("/search?a=1&b=2", &key)).await;
                assert_replay(&reordered, &first);
                let changed = send(f.post("/search?a=1&b=3", &key)).await;
                assert_problem(&changed, 422, KEY_REUSED);
                f.assert_counts(&[(Counter::Search, 1)]);
            }

            #[tokio::test]
            async fn only_declared_query_parameters_count() {
                let f = fixture().await;
                let key = new_key();
                let first = send(f.post("/paged?page=1&sort=asc", &key)).await;
                assert_executed(&first, "paged run 1");
                let other_sort = send(f.post("/paged?sort=desc&page=1", &key)).await;
                assert_replay(&other_sort, &first);
                let without_sort = send(f.post("/paged?page=1", &key)).await;
                assert_replay(&without_sort, &first);
                let other_page = send(f.post("/paged?page=2&sort=asc", &key)).await;
                assert_problem(&other_page, 422, KEY_REUSED);
                f.assert_counts(&[(Counter::Paged, 1)]);
            }

            #[tokio::test]
            async fn form_pairs_are_compared_in_any_order_but_by_every_value() {
                let f = fixture().await;
                let key = new_key();
                let first = send(f.post_raw("/forms", &key, FORM, "a=1&b=2")).await;
                assert_executed(&first, "forms run 1");
                let reordered = send(f.post_raw("/forms", &key, FORM, "b=2&a=1")).await;
                assert_replay(&reordered, &first);
                let changed = send(f.post_raw("/forms", &key, FORM, "a=1&b=3")).await;
                assert_problem(&changed, 422, KEY_REUSED);
                f.assert_counts(&[(Counter::Forms, 1)]);
            }

            #[tokio::test]
            async fn other_bodies_are_compared_byte_for_byte() {
                let f = fixture().await;
                let key = new_key();
                let bytes: Vec<u8> = (0..=255u8).chain(*b"payload").collect();
                let first = send(f.post_raw("/bytes", &key, OCTETS, bytes.clone())).await;
                assert_executed(&first, "bytes run 1");
                let same = send(f.post_raw("/bytes", &key, OCTETS, bytes.clone())).await;
                assert_replay(&same, &first);
                let mut one_changed = bytes.clone();
                one_changed[100] ^= 1;
                let changed = send(f.post_raw("/bytes", &key, OCTETS, one_changed)).await;
                assert_problem(&changed, 422, KEY_REUSED);
                f.assert_counts(&[(Counter::Bytes, 1)]);
            }

            #[tokio::test]
            async fn json_numbers_are_compared_by_value() {
                let f = fixture().await;
                let key = new_key();
                let first = send(f.post_raw("/json", &key, JSON, r#"{"amount":1000}"#)).await;
                assert_executed(&first, "json run 1");
                for same in [r#"{"amount":1e3}"#, r#"{"amount":1000.0}"#, r#"{ "amount" : 1000 }"#] {
                    let retry = send(f.post_raw("/json", &key, JSON, same)).await;
                    assert_replay(&retry, &first);
                }
                let changed = send(f.post_raw("/json", &key, JSON, r#"{"amount":1001}"#)).await;
                assert_problem(&changed, 422, KEY_REUSED);
                f.assert_counts(&[(Counter::Json, 1)]);
            }

            #[tokio::test]
            async fn a_set_field_is_compared_in_any_order_and_undeclared_fields_are_ignored() {
                let f = fixture().await;
                let key = new_key();
                let ascending = tags(20);
                let body = |tags: &[String], note: &str| serde_json::json!({"tags": tags, "note": note});
                let first = send(f.post("/tags", &key).json(&body(&ascending, "first"))).await;
                assert_executed(&first, "tags run 1");
                let mut descending = ascending.clone();
                descending.reverse();
                assert_replay(&send(f.post("/tags", &key).json(&body(&descending, "first"))).await, &first);
                let mut interleaved: Vec<String> = ascending.iter().step_by(2).cloned().collect();
                interleaved.extend(ascending.iter().skip(1).step_by(2).cloned());
                assert_replay(&send(f.post("/tags", &key).json(&body(&interleaved, "first"))).await, &first);
                let other_note = send(f.post("/tags", &key).json(&body(&descending, "another note"))).await;
                assert_replay(&other_note, &first);
                let mut other_set = tags(21);
                other_set.remove(7);
                let changed = send(f.post("/tags", &key).json(&body(&other_set, "first"))).await;
                assert_problem(&changed, 422, KEY_REUSED);
                let fewer = send(f.post("/tags", &key).json(&body(&ascending[1..], "first"))).await;
                assert_problem(&fewer, 422, KEY_REUSED);
                f.assert_counts(&[(Counter::Tags, 1)]);
            }

            #[tokio::test]
            async fn the_authenticated_actor_namespaces_keys_whatever_the_token() {
                let f = fixture().await;
                let key = new_key();
                let body = serde_json::json!({"op": "rename"});
                let as_user = |user: &str, token: &str| {
                    f.client
                        .post(f.url("/whoami"))
                        .header("Idempotency-Key", &key)
                        .header("X-User", user)
                        .bearer_auth(token)
                        .json(&body)
                };
                let first = send(as_user("u1", "token-A")).await;
                assert_executed(&first, "actor run 1");
                let refreshed = send(as_user("u1", "token-B")).await;
                assert_replay(&refreshed, &first);
                f.assert_counts(&[(Counter::Actor, 1)]);
                let other_user = send(as_user("u2", "token-A")).await;
                assert_executed(&other_user, "actor run 2");
                f.assert_counts(&[(Counter::Actor, 2)]);
                assert_replay(&send(as_user("u2", "token-B")).await, &other_user);
                assert_replay(&send(as_user("u1", "token-A")).await, &first);
                let nobody =
                    send(f.client.post(f.url("/whoami")).header("Idempotency-Key", &key).json(&body)).await;
                assert_problem(&nobody, 401, ACTOR_MISSING);
                f.assert_counts(&[(Counter::Actor, 2)]);
            }

            #[tokio::test]
            async fn a_nested_mount_is_served_and_is_not_part_of_the_identity() {
                let f = fixture().await;
                let first_key = new_key();
                let nested_first = send(f.post("/v1/orders/7/cancel", &first_key)).await;
                assert_executed(&nested_first, "cancel run 1");
                let key = new_key();
                let first = send(f.post("/orders/1/cancel", &key)).await;
                assert_executed(&first, "cancel run 2");
                let nested = send(f.post("/v1/orders/1/cancel", &key)).await;
                assert_replay(&nested, &first);
                let nested_other_order = send(f.post("/v1/orders/2/cancel", &key)).await;
                assert_problem(&nested_other_order, 422, KEY_REUSED);
                assert_replay(&send(f.post("/orders/7/cancel", &first_key)).await, &nested_first);
                let later = send(f.post("/v1/orders/8/cancel", &new_key())).await;
                assert_executed(&later, "cancel run 3");
                f.assert_counts(&[(Counter::Cancel, 3)]);
            }

            #[tokio::test]
            async fn a_stale_route_cannot_hide_an_unprotected_handler() {
                let f = fixture().await;
                let key = new_key();
                let body = serde_json::json!({"amount": 7});
                for _ in 0..2 {
                    let refused = send(f.post("/stale", &key).json(&body)).await;
                    assert_problem(&refused, 500, MISCONFIGURED);
                    let detail = refused.json()["detail"].as_str().unwrap_or_default().to_owned();
                    assert!(detail.contains("POST /stale changes state"), "{detail}");
                    f.assert_counts(&[]);
                }
                let protected = send(f.post("/elsewhere", &key).json(&body)).await;
                assert_executed(&protected, "elsewhere run 1");
                f.assert_counts(&[(Counter::Elsewhere, 1)]);
            }
        }
    };
}
