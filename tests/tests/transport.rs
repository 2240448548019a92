//! What each framework's transport reads, over a real server on a loopback port: the caller set
//! by an extractor that runs before the body extractor counts on both frameworks (the caller is
//! read when the protected body extractor runs, not when the request arrives), and on actix-web a
//! compressed body is compared by its decoded content and still reaches the handler's extractor.

use actix_web::{web, App, FromRequest, HttpMessage, HttpRequest, HttpResponse, HttpServer};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing;
use axum::{Json, Router};
use flate2::write::GzEncoder;
use flate2::Compression;
use idempotent_actix::core::store::MemoryStore;
use idempotent_tests::http::{new_key, send, Captured};
use serde_json::{json, Value};
use std::future::{ready, Ready};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

static AXUM_RUNS: AtomicUsize = AtomicUsize::new(0);
static ACTIX_RUNS: AtomicUsize = AtomicUsize::new(0);
static GZIP_RUNS: AtomicUsize = AtomicUsize::new(0);

/// An authentication extractor: `X-User` stands in for a verified token's subject, and becomes
/// the request's [`Actor`](idempotent_axum::Actor) as the extractor runs.
struct Auth;

impl<S: Send + Sync> FromRequestParts<S> for Auth {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, StatusCode> {
        let user = parts.headers.get("x-user").and_then(|v| v.to_str().ok()).ok_or(StatusCode::UNAUTHORIZED)?;
        parts.extensions.insert(idempotent_axum::Actor(user.to_owned()));
        Ok(Auth)
    }
}

#[idempotent_axum::idempotent(scope = "transport.axum.orders")]
async fn axum_order(_auth: Auth, Json(body): Json<Value>) -> (StatusCode, String) {
    let n = AXUM_RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("order {} run {n}", body["item"]))
}

impl FromRequest for Auth {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, actix_web::Error>>;

    fn from_request(request: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let user = request.headers().get("x-user").and_then(|v| v.to_str().ok()).map(str::to_owned);
        ready(match user {
            Some(user) => {
                request.extensions_mut().insert(idempotent_actix::Actor(user));
                Ok(Auth)
            }
            None => Err(actix_web::error::ErrorUnauthorized("no user")),
        })
    }
}

#[idempotent_actix::idempotent(scope = "transport.actix.orders")]
async fn actix_order(_auth: Auth, body: web::Json<Value>) -> HttpResponse {
    let n = ACTIX_RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    HttpResponse::Created().body(format!("order {} run {n}", body["item"]))
}

#[idempotent_actix::idempotent(scope = "transport.actix.gzip")]
async fn actix_gzip(body: web::Json<Value>) -> HttpResponse {
    let n = GZIP_RUNS.fetch_add(1, Ordering::SeqCst) + 1;
    HttpResponse::Created().body(format!("order {} run {n}", body["item"]))
}

async fn start_axum() -> SocketAddr {
    let idempotency = idempotent_axum::Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .build()
        .expect("valid registry");
    let router = Router::new().route("/orders", routing::post(axum_order)).layer(idempotency.layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

async fn start_actix() -> SocketAddr {
    let idempotency = idempotent_actix::Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_actix::ActorSource::Anonymous)
        .build()
        .expect("valid registry");
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(idempotency.data())
                    .app_data(web::JsonConfig::default().limit(1024))
                    .route("/orders", web::post().to(actix_order))
                    .route("/gzip", web::post().to(actix_gzip))
            })
            .workers(1)
            .bind("127.0.0.1:0")
            .expect("bind a loopback port");
            let _ = tx.send(server.addrs()[0]);
            let _ = server.run().await;
        })
    });
    rx.await.expect("server thread")
}

fn order(addr: SocketAddr, key: &str, user: &str, body: &Value) -> reqwest::RequestBuilder {
    post(addr, "/orders", key, user).json(body)
}

fn post(addr: SocketAddr, path: &str, key: &str, user: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new().post(format!("http://{addr}{path}")).header("Idempotency-Key", key).header("X-User", user)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).expect("compress");
    encoder.finish().expect("compress")
}

fn text(response: &Captured) -> String {
    String::from_utf8_lossy(&response.body).into_owned()
}

/// Two callers under one key each run once; each one's retry replays its own answer. Were the
/// caller read before the authentication extractor ran, both would share the anonymous namespace
/// and the second caller would get the first one's answer.
async fn the_caller_set_by_an_extractor_counts(addr: SocketAddr, runs: &AtomicUsize) {
    let key = new_key();
    let body = json!({"item": "book"});
    let before = runs.load(Ordering::SeqCst);
    let first = send(order(addr, &key, "u1", &body)).await;
    assert_eq!(first.status, 201, "{}", text(&first));
    assert!(!first.replayed());
    let other = send(order(addr, &key, "u2", &body)).await;
    assert_eq!(other.status, 201, "{}", text(&other));
    assert!(!other.replayed(), "another caller's key must not replay: {}", text(&other));
    let retry = send(order(addr, &key, "u1", &body)).await;
    assert!(retry.replayed());
    assert_eq!(text(&retry), text(&first));
    assert_eq!(runs.load(Ordering::SeqCst) - before, 2);
}

#[tokio::test]
async fn axum_reads_the_caller_an_earlier_extractor_set() {
    the_caller_set_by_an_extractor_counts(start_axum().await, &AXUM_RUNS).await;
}

#[tokio::test]
async fn actix_reads_the_caller_an_earlier_extractor_set() {
    the_caller_set_by_an_extractor_counts(start_actix().await, &ACTIX_RUNS).await;
}

#[tokio::test]
async fn actix_compares_a_compressed_body_by_its_content() {
    let addr = start_actix().await;
    let key = new_key();
    let raw = serde_json::to_vec(&json!({"item": "lamp"})).unwrap();
    let compressed = |key: &str, bytes: Vec<u8>| {
        post(addr, "/gzip", key, "gz")
            .header("Content-Type", "application/json")
            .header("Content-Encoding", "gzip")
            .body(bytes)
    };
    let first = send(compressed(&key, gzip(&raw))).await;
    assert_eq!(first.status, 201, "the handler's extractor gets the decoded body: {}", text(&first));
    assert!(text(&first).starts_with("order \"lamp\""), "{}", text(&first));
    // The same content sent uncompressed is the same request: a replay.
    let plain = send(post(addr, "/gzip", &key, "gz").json(&json!({"item": "lamp"}))).await;
    assert!(plain.replayed(), "{} {}", plain.status, text(&plain));
    assert_eq!(text(&plain), text(&first));
    // Other content, compressed, under the same key: a mismatch, not a replay.
    let other = send(compressed(&key, gzip(&serde_json::to_vec(&json!({"item": "desk"})).unwrap()))).await;
    assert_eq!(other.status, 422, "{}", text(&other));
    // A compressed body that decodes past the payload limit is refused as too large, never run.
    let huge = serde_json::to_vec(&json!({"item": "x".repeat(512 * 1024)})).unwrap();
    let too_large = send(compressed(&new_key(), gzip(&huge))).await;
    assert_eq!(too_large.status, 413, "{}", text(&too_large));
    assert_eq!(GZIP_RUNS.load(Ordering::SeqCst), 1);
}
