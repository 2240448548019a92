//! The route registry as the macro fills it, the reports rendered from it, and enforcement on axum.
//!
//! The fixture below annotates several axum handlers (one without `route`, two exempt); the
//! registry's records for them are compared with `tests/snapshots/registry.json`. Run with
//! `UPDATE_SNAPSHOTS=1` to rewrite the snapshot after an intended change, and review the diff.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use idempotent_axum::core::registry::{self, Framework, RouteRecord};
use idempotent_axum::core::report::{self, Format};
use idempotent_axum::core::store::MemoryStore;
use idempotent_axum::enforce::{self, Enforce, MutatingMethods};
use idempotent_axum::{idempotent, Idempotency};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

#[derive(Deserialize, Serialize)]
struct Customer {
    id: String,
}

#[derive(Deserialize, Serialize)]
struct CreateOrder {
    amount: u64,
    currency: String,
    customer: Customer,
}

#[idempotent(scope = "fixture.orders.create", fields = [amount, currency, customer.id], route = "POST /orders")]
async fn create_order(Json(order): Json<CreateOrder>) -> (StatusCode, String) {
    (StatusCode::CREATED, format!("{} {}", order.amount, order.currency))
}

#[idempotent(
    scope = "fixture.refunds.create",
    ttl = "1h",
    lease = "5s",
    key = "optional",
    on_conflict = "wait",
    wait_timeout = "5s",
    store = "success",
    route = "POST /orders/{id}/refunds"
)]
async fn refund_order(Json(body): Json<Value>) -> Json<Value> {
    Json(body)
}

#[idempotent(scope = "fixture.notes.update", ttl = "7d", fail_open = true)]
async fn update_note(Json(body): Json<Value>) -> Json<Value> {
    Json(body)
}

#[idempotent(exempt = "natural key: PUT replaces the resource", route = "PUT /profile")]
async fn put_profile(Json(body): Json<Value>) -> Json<Value> {
    Json(body)
}

#[idempotent(exempt = "read-only: POST only carries the query", route = "POST /search")]
async fn search() -> &'static str {
    "[]"
}

async fn unprotected() -> &'static str {
    "changed"
}

/// Rejects requests carrying `x-deny`, as an authentication extractor would.
struct Allowed;

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Allowed {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, StatusCode> {
        if parts.headers.contains_key("x-deny") {
            Err(StatusCode::UNAUTHORIZED)
        } else {
            Ok(Allowed)
        }
    }
}

#[idempotent(scope = "fixture.guarded.create")]
async fn guarded(_: Allowed, Json(body): Json<Value>) -> Json<Value> {
    Json(body)
}

async fn unprotected_with_body(Json(_): Json<Value>) -> &'static str {
    "changed"
}

/// Declares a route it is not mounted at: a stale `route` must not make that route look protected.
#[idempotent(scope = "fixture.stale.create", route = "POST /stale")]
async fn stale_route(Json(body): Json<Value>) -> Json<Value> {
    Json(body)
}

async fn list() -> &'static str {
    "[]"
}

/// The fixture's records: the test binary also links the demo's handlers.
fn fixture() -> Vec<&'static RouteRecord> {
    registry::routes().into_iter().filter(|r| r.handler.starts_with("registry::")).collect()
}

fn record_json(r: &RouteRecord) -> Value {
    json!({
        "handler": r.handler,
        "file": r.file,
        "line": r.line,
        "framework": r.framework.as_str(),
        "method": r.method,
        "path": r.path,
        "exempt": r.exempt,
        "policy": r.policy.map(|p| json!({
            "scope": p.scope,
            "fields": p.fields(),
            "identity": [p.identity.path.describe(), p.identity.query.describe(), p.identity.body.describe()],
            "ttl_ms": p.ttl.as_millis() as u64,
            "lease_ms": p.lease.as_millis() as u64,
            "key": p.key.as_str(),
            "on_conflict": p.on_conflict.as_str(),
            "wait_timeout_ms": p.wait_timeout.as_millis() as u64,
            "stored_outcomes": p.outcomes.as_str(),
            "fail_open": p.fail_open,
        })),
    })
}

#[test]
fn registry_matches_the_snapshot() {
    let actual =
        serde_json::to_string_pretty(&fixture().iter().map(|r| record_json(r)).collect::<Vec<_>>()).unwrap() + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots/registry.json");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).expect("snapshot exists; run with UPDATE_SNAPSHOTS=1");
    assert_eq!(actual, expected, "registry differs from {}", path.display());
}

#[test]
fn iteration_is_sorted_and_filterable() {
    let order: Vec<&str> = fixture().iter().map(|r| r.handler).collect();
    assert_eq!(
        order,
        [
            "registry::guarded",
            "registry::update_note",
            "registry::create_order",
            "registry::refund_order",
            "registry::stale_route",
            "registry::put_profile",
            "registry::search"
        ]
    );
    assert!(registry::routes_of(Framework::Actix).iter().all(|r| r.framework == Framework::Actix));
    assert!(registry::routes_of(Framework::Axum).len() >= fixture().len());
    assert_eq!(registry::validate(&fixture()), Ok(()));
}

#[test]
fn reports_list_protected_and_exempt_routes_apart() {
    let json: Value = serde_json::from_str(&report::render(&fixture(), Format::Json)).unwrap();
    assert_eq!(json["version"], 1);
    assert_eq!(json["summary"], json!({"protected": 5, "exempt": 2}));
    let scopes: Vec<&str> = json["routes"].as_array().unwrap().iter().map(|r| r["scope"].as_str().unwrap()).collect();
    assert_eq!(
        scopes,
        [
            "fixture.guarded.create",
            "fixture.notes.update",
            "fixture.orders.create",
            "fixture.refunds.create",
            "fixture.stale.create"
        ]
    );
    assert_eq!(json["routes"][0]["method"], Value::Null);
    assert_eq!(json["exempt"][0]["path"], "/profile");
    assert_eq!(json["exempt"][0]["reason"], "natural key: PUT replaces the resource");
    assert_eq!(json["exempt"][1]["path"], "/search");
    let md = report::render(&fixture(), Format::Markdown);
    assert!(md.contains("| PUT /profile | natural key: PUT replaces the resource | `registry::put_profile` |"), "{md}");
    let html = report::render(&fixture(), Format::Html);
    assert!(html.contains("<td>read-only: POST only carries the query</td>"), "{html}");
    if let Ok(out) = std::env::var("POLICIES_HTML") {
        std::fs::write(out, html).unwrap();
    }
}

fn app(enforce: Enforce) -> Router {
    // The fixtures' shortest lease is 5s: six store timeouts of at most 833ms.
    let idempotency = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .store_timeout(std::time::Duration::from_millis(500))
        .build()
        .expect("valid registry");
    let orders = Router::new()
        .route("/orders", post(create_order).get(list))
        .route("/orders/{id}/refunds", post(refund_order))
        .route("/elsewhere", post(stale_route));
    Router::new()
        .merge(orders.clone())
        .nest("/v1", orders)
        .route("/notes/{id}", patch(update_note))
        .route("/profile", put(put_profile))
        .route("/search", post(search))
        .route("/stale", post(unprotected_with_body))
        .route("/guarded", post(guarded))
        .route("/unprotected", post(unprotected).put(unprotected))
        .route("/unprotected-body", post(unprotected_with_body).put(unprotected_with_body))
        .route("/list", get(list))
        .layer(enforce)
        .layer(idempotency.layer())
}

async fn call(app: &Router, method: &str, uri: &str) -> (StatusCode, String) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .header("idempotency-key", "\"k1\"")
        .body(Body::from(r#"{"amount": 1, "currency": "EUR", "customer": {"id": "c1"}}"#))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn refused(response: &(StatusCode, String), route: &str) -> bool {
    response.0 == StatusCode::INTERNAL_SERVER_ERROR
        && response.1.contains("urn:idempotent:problem:misconfigured")
        && response.1.contains(&format!("{route} changes state but has no idempotency policy"))
}

#[tokio::test]
async fn refuse_mode_refuses_an_unprotected_route_that_reads_a_body_before_it_runs() {
    let app = app(Enforce::refuse());
    for _ in 0..2 {
        let response = call(&app, "POST", "/unprotected-body").await;
        assert!(refused(&response, "POST /unprotected-body"), "{response:?}");
    }
    // PUT is not counted by default; GET never is; protected and exempt routes run.
    assert_eq!(call(&app, "PUT", "/unprotected-body").await, (StatusCode::OK, "changed".into()));
    assert_eq!(call(&app, "GET", "/list").await.0, StatusCode::OK);
    assert_eq!(call(&app, "POST", "/orders").await, (StatusCode::CREATED, "1 EUR".into()));
    assert_eq!(call(&app, "POST", "/search").await, (StatusCode::OK, "[]".into()));
    assert_eq!(call(&app, "PUT", "/profile").await.0, StatusCode::OK);
    assert_eq!(call(&app, "POST", "/orders/7/refunds").await.0, StatusCode::OK);
    // No route matched: left to the router.
    assert_eq!(call(&app, "POST", "/nowhere").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn refuse_mode_refuses_a_bodiless_unprotected_route_from_its_second_request() {
    let app = app(Enforce::refuse());
    // Nothing can be held back from a handler that reads no body: its first request runs (and is
    // logged as an error); every later one is refused.
    assert_eq!(call(&app, "POST", "/unprotected").await, (StatusCode::OK, "changed".into()));
    let second = call(&app, "POST", "/unprotected").await;
    assert!(refused(&second, "POST /unprotected"), "{second:?}");
}

#[tokio::test]
async fn refuse_mode_recognises_protected_routes_under_a_nested_router() {
    let app = app(Enforce::refuse());
    assert_eq!(call(&app, "POST", "/v1/orders").await, (StatusCode::CREATED, "1 EUR".into()));
    assert_eq!(call(&app, "POST", "/v1/orders/7/refunds").await.0, StatusCode::OK);
    assert_eq!(call(&app, "POST", "/v1/elsewhere").await.0, StatusCode::OK);
    // Learned: the second request is decided without a gate, and still served.
    assert_eq!(call(&app, "POST", "/v1/orders").await.0, StatusCode::CREATED);
    let order = registry::routes().into_iter().find(|r| r.handler == "registry::create_order").unwrap();
    let served = registry::served_at(order);
    assert!(served.contains(&"POST /v1/orders".to_owned()), "{served:?}");
}

#[tokio::test]
async fn a_stale_route_cannot_hide_an_unprotected_handler() {
    // `stale_route` says `route = "POST /stale"` but is mounted at `/elsewhere`; the handler at
    // `/stale` is unprotected, and is refused.
    let app = app(Enforce::refuse());
    let response = call(&app, "POST", "/stale").await;
    assert!(refused(&response, "POST /stale"), "{response:?}");
}

#[tokio::test]
async fn a_request_rejected_before_the_handler_does_not_make_a_protected_route_look_unprotected() {
    let app = app(Enforce::refuse());
    let denied = Request::builder()
        .method("POST")
        .uri("/guarded")
        .header("x-deny", "1")
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap();
    assert_eq!(app.clone().oneshot(denied).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, "POST", "/guarded").await.0, StatusCode::OK);
}

#[tokio::test]
async fn refuse_mode_can_count_put_and_delete() {
    let app = app(Enforce::refuse().methods(MutatingMethods::ALL));
    let response = call(&app, "PUT", "/unprotected-body").await;
    assert!(refused(&response, "PUT /unprotected-body"), "{response:?}");
    assert_eq!(call(&app, "PUT", "/profile").await.0, StatusCode::OK, "exempt");
}

#[tokio::test]
async fn warn_mode_serves_the_request() {
    let app = app(Enforce::warn());
    assert_eq!(call(&app, "POST", "/unprotected-body").await, (StatusCode::OK, "changed".into()));
    assert_eq!(call(&app, "POST", "/unprotected-body").await, (StatusCode::OK, "changed".into()));
    assert_eq!(call(&app, "POST", "/unprotected").await, (StatusCode::OK, "changed".into()));
}

#[test]
fn assert_protected_lists_every_unprotected_route() {
    enforce::assert_protected(&[("POST", "/orders"), ("GET", "/orders"), ("POST", "/search"), ("PUT", "/x")]);
    let failure = std::panic::catch_unwind(|| {
        enforce::assert_protected(&[("POST", "/orders"), ("POST", "/unprotected"), ("PATCH", "/notes/{id}")]);
    })
    .unwrap_err();
    let message = failure.downcast_ref::<String>().unwrap();
    assert!(message.starts_with("2 mutating route(s) without an idempotency policy:"), "{message}");
    assert!(message.contains("  - PATCH /notes/{id} has no idempotency policy"), "{message}");
    assert!(message.contains("  - POST /unprotected has no idempotency policy"), "{message}");
    let put = enforce::unprotected_with(&[("PUT", "/profile"), ("DELETE", "/orders")], MutatingMethods::ALL);
    assert_eq!(put.iter().map(ToString::to_string).filter(|s| s.starts_with("DELETE /orders")).count(), 1);
    assert_eq!(put.len(), 1);
}
