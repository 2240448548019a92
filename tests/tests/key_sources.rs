//! Key sources on both frameworks, over a real server on a loopback port: a key from a sender's
//! header (missing or malformed: 400 naming the header, nothing run), a composite key of body
//! fields (another value of either part is another operation), and a key derived from the request
//! (identical requests within the ttl are one; another body or caller, or the same request after
//! the ttl, runs again).

use actix_web::{web, App, HttpMessage, HttpResponse, HttpServer};
use axum::http::StatusCode;
use axum::routing;
use axum::{Extension, Json, Router};
use idempotent_axum::core::store::MemoryStore;
use idempotent_tests::http::{new_key, send, Captured};
use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Executions per route and framework.
#[derive(Default)]
struct Runs {
    header: AtomicUsize,
    composite: AtomicUsize,
    derived: AtomicUsize,
}

impl Runs {
    fn hit(&self, counter: &AtomicUsize, what: &str) -> String {
        format!("{what} run {}", counter.fetch_add(1, Ordering::SeqCst) + 1)
    }
}

#[derive(Debug, Deserialize)]
#[allow(non_snake_case)]
struct Notification {
    eventCode: String,
    /// Optional in the type, so that its absence reaches the key (the framework's own
    /// deserialization would refuse a missing required field first).
    pspReference: Option<String>,
    #[allow(dead_code)]
    amount: i64,
}

mod on_axum {
    use super::*;

    #[idempotent_axum::idempotent(scope = "keys.axum.webhook", key = header("webhook-id"), ttl = "1h")]
    pub async fn webhook(Extension(runs): Extension<Arc<Runs>>, Json(_event): Json<Value>) -> (StatusCode, String) {
        (StatusCode::OK, runs.hit(&runs.header, "webhook"))
    }

    #[idempotent_axum::idempotent(scope = "keys.axum.adyen", key = [field(eventCode), field(pspReference)], ttl = "1h")]
    pub async fn adyen(Extension(runs): Extension<Arc<Runs>>, Json(n): Json<Notification>) -> (StatusCode, String) {
        let _ = (&n.eventCode, &n.pspReference);
        (StatusCode::OK, runs.hit(&runs.composite, "adyen"))
    }

    #[idempotent_axum::idempotent(scope = "keys.axum.notify", key = derived, ttl = "2s", lease = "2s")]
    pub async fn notify(Extension(runs): Extension<Arc<Runs>>, Json(_body): Json<Value>) -> (StatusCode, String) {
        (StatusCode::CREATED, runs.hit(&runs.derived, "notify"))
    }
}

mod on_actix {
    use super::*;

    #[idempotent_actix::idempotent(scope = "keys.actix.webhook", key = header("webhook-id"), ttl = "1h")]
    pub async fn webhook(runs: web::Data<Runs>, _event: web::Json<Value>) -> HttpResponse {
        HttpResponse::Ok().body(runs.hit(&runs.header, "webhook"))
    }

    #[idempotent_actix::idempotent(scope = "keys.actix.adyen", key = [field(eventCode), field(pspReference)], ttl = "1h")]
    pub async fn adyen(runs: web::Data<Runs>, n: web::Json<Notification>) -> HttpResponse {
        let _ = (&n.eventCode, &n.pspReference);
        HttpResponse::Ok().body(runs.hit(&runs.composite, "adyen"))
    }

    #[idempotent_actix::idempotent(scope = "keys.actix.notify", key = derived, ttl = "2s", lease = "2s")]
    pub async fn notify(runs: web::Data<Runs>, _body: web::Json<Value>) -> HttpResponse {
        HttpResponse::Created().body(runs.hit(&runs.derived, "notify"))
    }
}

/// The caller: `X-User` stands in for a verified token's subject.
fn user_of(header: Option<&[u8]>) -> Option<String> {
    header.and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned)
}

async fn start_axum() -> (SocketAddr, Arc<Runs>) {
    let runs = Arc::new(Runs::default());
    let idempotency = idempotent_axum::Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        // The derived route's two-second lease is six times this.
        .store_timeout(Duration::from_millis(300))
        .build()
        .expect("valid registry");
    let authenticate = |mut request: axum::extract::Request, next: axum::middleware::Next| async move {
        if let Some(user) = user_of(request.headers().get("x-user").map(|v| v.as_bytes())) {
            request.extensions_mut().insert(idempotent_axum::Actor(user));
        }
        next.run(request).await
    };
    let router = Router::new()
        .route("/webhook", routing::post(on_axum::webhook))
        .route("/adyen", routing::post(on_axum::adyen))
        .route("/notify", routing::post(on_axum::notify))
        .layer(axum::middleware::from_fn(authenticate))
        .layer(Extension(runs.clone()))
        .layer(idempotency.layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    (addr, runs)
}

async fn start_actix() -> (SocketAddr, Arc<Runs>) {
    let runs = Arc::new(Runs::default());
    let idempotency = idempotent_actix::Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_actix::ActorSource::Anonymous)
        .store_timeout(Duration::from_millis(300))
        .build()
        .expect("valid registry");
    let data = web::Data::from(runs.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                App::new()
                    .wrap_fn(|request, service| {
                        use actix_web::dev::Service;
                        if let Some(user) = user_of(request.headers().get("x-user").map(|v| v.as_bytes())) {
                            request.extensions_mut().insert(idempotent_actix::Actor(user));
                        }
                        service.call(request)
                    })
                    .app_data(idempotency.data())
                    .app_data(data.clone())
                    .route("/webhook", web::post().to(on_actix::webhook))
                    .route("/adyen", web::post().to(on_actix::adyen))
                    .route("/notify", web::post().to(on_actix::notify))
            })
            .workers(1)
            .bind("127.0.0.1:0")
            .expect("bind a loopback port");
            let _ = tx.send(server.addrs()[0]);
            let _ = server.run().await;
        })
    });
    (rx.await.expect("server thread"), runs)
}

fn post(addr: SocketAddr, path: &str, user: &str, body: &Value) -> reqwest::RequestBuilder {
    reqwest::Client::new().post(format!("http://{addr}{path}")).header("X-User", user).json(body)
}

fn text(response: &Captured) -> String {
    String::from_utf8_lossy(&response.body).into_owned()
}

fn detail(response: &Captured) -> String {
    serde_json::from_slice::<Value>(&response.body)
        .ok()
        .and_then(|p| p["detail"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

async fn a_sender_header_is_the_key((addr, runs): (SocketAddr, Arc<Runs>)) {
    let id = new_key();
    let event = json!({"type": "charge.succeeded"});
    // Missing, malformed or repeated: 400 naming the header; nothing runs.
    let missing = send(post(addr, "/webhook", "provider", &event).header("Idempotency-Key", &id)).await;
    assert_eq!(missing.status, 400, "{}", text(&missing));
    assert!(detail(&missing).contains("webhook-id"), "the problem names its source: {}", detail(&missing));
    let malformed = send(post(addr, "/webhook", "provider", &event).header("webhook-id", "x".repeat(300))).await;
    assert_eq!(malformed.status, 400, "{}", text(&malformed));
    assert!(detail(&malformed).contains("webhook-id"), "{}", detail(&malformed));
    let twice =
        send(post(addr, "/webhook", "provider", &event).header("webhook-id", &id).header("webhook-id", "other")).await;
    assert_eq!(twice.status, 400, "{}", text(&twice));
    assert_eq!(runs.header.load(Ordering::SeqCst), 0);
    // Present: the first delivery runs, a redelivery replays, another body under it is 422.
    let first = send(post(addr, "/webhook", "provider", &event).header("webhook-id", &id)).await;
    assert_eq!((first.status, first.replayed()), (200, false), "{}", text(&first));
    let again = send(post(addr, "/webhook", "provider", &event).header("webhook-id", &id)).await;
    assert!(again.replayed());
    assert_eq!(text(&again), text(&first));
    let other =
        send(post(addr, "/webhook", "provider", &json!({"type": "charge.refunded"})).header("webhook-id", &id)).await;
    assert_eq!(other.status, 422, "{}", text(&other));
    assert_eq!(runs.header.load(Ordering::SeqCst), 1);
}

async fn a_composite_key_differs_when_either_part_does((addr, runs): (SocketAddr, Arc<Runs>)) {
    let reference = new_key();
    let body = |code: &str, psp: &str, amount: i64| json!({"eventCode": code, "pspReference": psp, "amount": amount});
    let first = send(post(addr, "/adyen", "adyen", &body("AUTHORISATION", &reference, 100))).await;
    assert_eq!((first.status, first.replayed()), (200, false), "{}", text(&first));
    let again = send(post(addr, "/adyen", "adyen", &body("AUTHORISATION", &reference, 100))).await;
    assert!(again.replayed(), "the same parts are the same key");
    assert_eq!(text(&again), text(&first));
    let code = send(post(addr, "/adyen", "adyen", &body("CAPTURE", &reference, 100))).await;
    assert!(!code.replayed(), "another eventCode is another key: {}", text(&code));
    let psp = send(post(addr, "/adyen", "adyen", &body("AUTHORISATION", &format!("{reference}-2"), 100))).await;
    assert!(!psp.replayed(), "another pspReference is another key: {}", text(&psp));
    // Parts are encoded unambiguously: moving characters from one part to the other is another key.
    let shifted = send(post(addr, "/adyen", "adyen", &body("AUTHORISATIO", &format!("N{reference}"), 100))).await;
    assert!(!shifted.replayed(), "{}", text(&shifted));
    assert_eq!(runs.composite.load(Ordering::SeqCst), 4);
    // A body without one of the key's fields: 400 naming the fields, nothing run.
    let missing = send(post(addr, "/adyen", "adyen", &json!({"eventCode": "CAPTURE", "amount": 1}))).await;
    assert_eq!(missing.status, 400, "{}", text(&missing));
    assert!(detail(&missing).contains("pspReference"), "{}", detail(&missing));
    assert_eq!(runs.composite.load(Ordering::SeqCst), 4);
}

async fn a_derived_key_is_the_request_within_its_ttl((addr, runs): (SocketAddr, Arc<Runs>)) {
    let body = json!({"to": new_key(), "text": "paid"});
    let first = send(post(addr, "/notify", "ana", &body)).await;
    assert_eq!((first.status, first.replayed()), (201, false), "{}", text(&first));
    let again = send(post(addr, "/notify", "ana", &body)).await;
    assert!(again.replayed(), "an identical request within the ttl: {}", text(&again));
    assert_eq!(text(&again), text(&first));
    let other_body = send(post(addr, "/notify", "ana", &json!({"to": body["to"], "text": "refunded"}))).await;
    assert!(!other_body.replayed(), "{}", text(&other_body));
    let other_caller = send(post(addr, "/notify", "bob", &body)).await;
    assert!(!other_caller.replayed(), "{}", text(&other_caller));
    assert_eq!(runs.derived.load(Ordering::SeqCst), 3);
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let later = send(post(addr, "/notify", "ana", &body)).await;
    assert_eq!((later.status, later.replayed()), (201, false), "after the ttl it runs again: {}", text(&later));
    assert_eq!(runs.derived.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn axum_sender_header() {
    a_sender_header_is_the_key(start_axum().await).await;
}

#[tokio::test]
async fn actix_sender_header() {
    a_sender_header_is_the_key(start_actix().await).await;
}

#[tokio::test]
async fn axum_composite() {
    a_composite_key_differs_when_either_part_does(start_axum().await).await;
}

#[tokio::test]
async fn actix_composite() {
    a_composite_key_differs_when_either_part_does(start_actix().await).await;
}

#[tokio::test]
async fn axum_derived() {
    a_derived_key_is_the_request_within_its_ttl(start_axum().await).await;
}

#[tokio::test]
async fn actix_derived() {
    a_derived_key_is_the_request_within_its_ttl(start_actix().await).await;
}
