//! The span of a protected request, on both frameworks over real HTTP: the handler's own event is
//! inside the protected request's span, which is inside the request's span of the framework's
//! usual tracing middleware (tower-http's `TraceLayer`, tracing-actix-web's `TracingLogger`); the
//! span records the outcome, and the raw key reaches no recorded field.

use actix_web::{post, web, App, HttpResponse, HttpServer};
use axum::http::StatusCode;
use axum::{routing, Json, Router};
use idempotent_axum::core::store::MemoryStore;
use idempotent_axum::core::telemetry::{key_digest, SPAN_NAME};
use idempotent_tests::trace_capture::{self, Captured};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[idempotent_axum::idempotent(scope = "trace.axum.charge")]
async fn charge_axum(Json(body): Json<serde_json::Value>) -> (StatusCode, String) {
    tracing::info!(marker = "handler.axum", "charging");
    (StatusCode::CREATED, format!("charged {}", body["amount"]))
}

#[idempotent_actix::idempotent(scope = "trace.actix.charge")]
#[post("/charges")]
async fn charge_actix(body: web::Json<serde_json::Value>) -> HttpResponse {
    tracing::info!(marker = "handler.actix", "charging");
    HttpResponse::Created().body(format!("charged {}", body["amount"]))
}

async fn start_axum() -> SocketAddr {
    let idempotency = idempotent_axum::Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .build()
        .unwrap();
    let router = Router::new()
        .route("/charges", routing::post(charge_axum))
        .layer(idempotency.layer())
        .layer(tower_http::trace::TraceLayer::new_for_http());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// actix-web runs its own system, on a thread of its own.
async fn start_actix() -> SocketAddr {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let idempotency = idempotent_actix::Idempotency::builder(Arc::new(MemoryStore::new()))
                .actor(idempotent_actix::ActorSource::Anonymous)
                .build()
                .unwrap();
            let server = HttpServer::new(move || {
                App::new()
                    .wrap(tracing_actix_web::TracingLogger::default())
                    .app_data(idempotency.data())
                    .service(charge_actix)
            })
            .workers(1)
            .bind("127.0.0.1:0")
            .unwrap();
            let _ = tx.send(server.addrs()[0]);
            let _ = server.run().await;
        })
    });
    rx.await.unwrap()
}

/// Sends the same charge twice with `key`: executed, then replayed.
async fn charge_twice(addr: SocketAddr, key: &str) {
    let client = reqwest::Client::new();
    for replayed in [false, true] {
        let response = client
            .post(format!("http://{addr}/charges"))
            .header("Idempotency-Key", key)
            .json(&serde_json::json!({"amount": 100}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(response.headers().contains_key("idempotent-replayed"), replayed);
    }
}

/// The closed spans of `scope`, once there are `n` (the protected request's span closes when its
/// task and its lease renewals have ended, just after the response).
async fn closed_spans(captured: &Mutex<Captured>, scope: &str, n: usize) -> Vec<trace_capture::SpanRecord> {
    for _ in 0..200 {
        let closed: Vec<_> = captured
            .lock()
            .unwrap()
            .closed
            .iter()
            .filter(|s| s.name == SPAN_NAME && s.fields.get("scope").map(String::as_str) == Some(scope))
            .cloned()
            .collect();
        if closed.len() >= n {
            return closed;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} closed spans of scope {scope} expected");
}

async fn check(captured: &Mutex<Captured>, scope: &str, marker: &str, request_span: &str, key: &str) {
    let spans = closed_spans(captured, scope, 2).await;
    let outcomes: Vec<(&str, &str)> =
        spans.iter().map(|s| (s.fields["outcome"].as_str(), s.fields["replayed"].as_str())).collect();
    assert_eq!(outcomes, [("executed", "false"), ("replayed", "true")], "{scope}");
    for span in &spans {
        assert_eq!(span.fields["key_digest"], key_digest(key), "{scope}: the key as a digest");
        assert_eq!(span.parent.as_deref(), Some(request_span), "{scope}: a child of the request's span");
    }

    let captured = captured.lock().unwrap();
    let handler: Vec<_> =
        captured.events.iter().filter(|e| e.fields.get("marker").map(String::as_str) == Some(marker)).collect();
    assert_eq!(handler.len(), 1, "{scope}: the handler ran once");
    let chain: Vec<&str> = handler[0].scope.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        chain.first().copied(),
        Some(SPAN_NAME),
        "{scope}: the handler's event is in the request's idempotent span"
    );
    assert_eq!(chain.get(1).copied(), Some(request_span), "{scope}: which is inside the request's span: {chain:?}");
    assert_eq!(handler[0].scope[0].fields["scope"], scope);

    let leaks: Vec<&String> = captured.values.iter().filter(|v| v.contains(key)).collect();
    assert!(leaks.is_empty(), "{scope}: the raw key reached recorded fields: {leaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_handler_events_are_inside_the_protected_span_inside_trace_layers_span() {
    let captured = trace_capture::install();
    let key = "raw-key-axum-7c1e9d";
    charge_twice(start_axum().await, key).await;
    check(&captured, "trace.axum.charge", "handler.axum", "request", key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actix_handler_events_are_inside_the_protected_span_inside_tracing_loggers_span() {
    let captured = trace_capture::install();
    let key = "raw-key-actix-4b8f02";
    charge_twice(start_actix().await, key).await;
    check(&captured, "trace.actix.charge", "handler.actix", "HTTP request", key).await;
}
