//! Fault paths of the axum adapter over real HTTP on a loopback port. The fixture app below
//! serves the routes of the shared fault suite ([`idempotent_tests::fault_tests!`]: panics,
//! retryable statuses, disconnects, oversized and failing bodies, wait mode, optional keys,
//! cookies); the tests after it are this adapter's own (an unreachable store, a missing runtime,
//! the key header's name).

use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::core::store::MemoryStore;
use idempotent_axum::{idempotent, Idempotency};
use idempotent_tests::faults::Unreachable;
use idempotent_tests::http::{new_key, send, Captured};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize, Serialize)]
struct Item {
    name: String,
}

static PANICS: AtomicUsize = AtomicUsize::new(0);
static FLAKY: AtomicUsize = AtomicUsize::new(0);
static SLOW: AtomicUsize = AtomicUsize::new(0);
static BIG: AtomicUsize = AtomicUsize::new(0);
static STREAM: AtomicUsize = AtomicUsize::new(0);
static WAITED: AtomicUsize = AtomicUsize::new(0);
static OPTIONAL: AtomicUsize = AtomicUsize::new(0);
static DOWN: AtomicUsize = AtomicUsize::new(0);
static BROKEN: AtomicUsize = AtomicUsize::new(0);
static LIMITED: AtomicUsize = AtomicUsize::new(0);
static CANCELLED: AtomicUsize = AtomicUsize::new(0);

#[idempotent(scope = "faults.cancel")]
async fn cancel(axum::extract::Path(id): axum::extract::Path<String>) -> String {
    CANCELLED.fetch_add(1, Ordering::SeqCst);
    id
}

#[idempotent(scope = "faults.panic", fields = [name])]
async fn panics_once(Json(item): Json<Item>) -> (StatusCode, String) {
    if PANICS.fetch_add(1, Ordering::SeqCst) == 0 {
        panic!("first call fails");
    }
    (StatusCode::CREATED, item.name)
}

#[idempotent(scope = "faults.flaky", fields = [name])]
async fn unavailable_once(Json(item): Json<Item>) -> (StatusCode, String) {
    if FLAKY.fetch_add(1, Ordering::SeqCst) == 0 {
        return (StatusCode::SERVICE_UNAVAILABLE, "downstream busy".into());
    }
    (StatusCode::CREATED, item.name)
}

#[idempotent(scope = "faults.slow", fields = [name])]
async fn slow(Json(item): Json<Item>) -> (StatusCode, String) {
    tokio::time::sleep(Duration::from_millis(600)).await;
    SLOW.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, format!("slow {}", item.name))
}

#[idempotent(scope = "faults.big")]
async fn big() -> impl IntoResponse {
    BIG.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, "x".repeat(10_000))
}

#[idempotent(scope = "faults.stream")]
async fn stream() -> impl IntoResponse {
    STREAM.fetch_add(1, Ordering::SeqCst);
    let chunks = (0..20).map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(format!("{i:04}").repeat(100))));
    (StatusCode::OK, Body::from_stream(futures_util::stream::iter(chunks)))
}

#[idempotent(scope = "faults.wait", fields = [name], on_conflict = "wait")]
async fn waits(Json(item): Json<Item>) -> (StatusCode, String) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    WAITED.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, item.name)
}

#[idempotent(scope = "faults.optional", key = "optional")]
async fn optional() -> StatusCode {
    OPTIONAL.fetch_add(1, Ordering::SeqCst);
    StatusCode::CREATED
}

#[idempotent(scope = "faults.down")]
async fn down() -> StatusCode {
    DOWN.fetch_add(1, Ordering::SeqCst);
    StatusCode::CREATED
}

#[idempotent(scope = "faults.cookie")]
async fn cookie() -> impl IntoResponse {
    (
        StatusCode::CREATED,
        [
            (header::SET_COOKIE, "session=secret"),
            (header::HeaderName::from_static("x-order"), "o-1"),
            (header::DATE, "Thu, 01 Jan 1970 00:00:00 GMT"),
        ],
        "ok",
    )
}

/// Its effects happen, then its response body fails half-way (an upstream stream that breaks).
#[idempotent(scope = "faults.broken")]
async fn broken_body() -> impl IntoResponse {
    BROKEN.fetch_add(1, Ordering::SeqCst);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
        vec![Ok(bytes::Bytes::from_static(b"partial")), Err(std::io::Error::other("upstream closed"))];
    (StatusCode::OK, Body::from_stream(futures_util::stream::iter(chunks)))
}

#[idempotent(scope = "faults.limited")]
async fn limited(Json(item): Json<Item>) -> String {
    LIMITED.fetch_add(1, Ordering::SeqCst);
    item.name
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

async fn app() -> String {
    let idem = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .max_stored_body(1024)
        .build()
        .unwrap();
    serve(
        Router::new()
            .route("/panic", post(panics_once))
            .route("/flaky", post(unavailable_once))
            .route("/slow", post(slow))
            .route("/big", post(big))
            .route("/stream", post(stream))
            .route("/wait", post(waits))
            .route("/optional", post(optional))
            .route("/cookie", post(cookie))
            .route("/broken", post(broken_body))
            .route("/orders/{id}/cancel", post(cancel))
            .route("/limited", post(limited).layer(axum::extract::DefaultBodyLimit::max(64)))
            .layer(idem.layer()),
    )
    .await
}

fn post_to(base: &str, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
    let r = reqwest::Client::new().post(format!("{base}{path}")).json(&json!({"name": "n"}));
    match key {
        Some(k) => r.header("Idempotency-Key", k),
        None => r,
    }
}

idempotent_tests::fault_tests!();

#[tokio::test]
async fn a_path_parameter_that_is_not_utf8_is_a_400_never_left_out_of_the_identity() {
    let base = app().await;
    let response = send(post_to(&base, "/orders/%FF/cancel", Some(&new_key()))).await;
    assert_eq!(response.status, 400, "{}", String::from_utf8_lossy(&response.body));
    assert_eq!(CANCELLED.load(Ordering::SeqCst), 0);
    let ok = send(post_to(&base, "/orders/7/cancel", Some(&new_key()))).await;
    assert_eq!((ok.status, ok.body.as_slice()), (200, b"7".as_slice()));
}

#[tokio::test]
async fn an_unreachable_store_fails_closed_with_503() {
    let idem = Idempotency::builder(Arc::new(Unreachable))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .store_retry_after(Duration::from_secs(5))
        .build()
        .unwrap();
    let base = serve(Router::new().route("/down", post(down)).layer(idem.layer())).await;
    let r = send(post_to(&base, "/down", Some(&new_key()))).await;
    r.assert_problem(503, "urn:idempotent:problem:store-unavailable");
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(DOWN.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_route_without_the_runtime_says_so() {
    let base = serve(Router::new().route("/down", post(down))).await;
    let r = send(post_to(&base, "/down", Some(&new_key()))).await;
    r.assert_problem(500, "urn:idempotent:problem:misconfigured");
}

#[tokio::test]
async fn the_key_header_name_is_configurable() {
    let idem = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .header_name("X-Request-Key")
        .build()
        .unwrap();
    let base = serve(Router::new().route("/cookie", post(cookie)).layer(idem.layer())).await;
    let client = reqwest::Client::new();
    let missing = send(client.post(format!("{base}/cookie")).header("Idempotency-Key", "k")).await;
    missing.assert_problem(400, "urn:idempotent:problem:key-missing");
    assert!(missing.json()["detail"].as_str().unwrap().contains("x-request-key"));
    let key = new_key();
    assert_eq!(send(client.post(format!("{base}/cookie")).header("X-Request-Key", &key)).await.status, 201);
    assert!(send(client.post(format!("{base}/cookie")).header("X-Request-Key", &key)).await.replayed());
    assert!(Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .header_name("bad header")
        .build()
        .is_err());
}
