//! The record status endpoint knows the caller by the same rule as a protected route, on both
//! frameworks: an `Actor` set by the application's authentication extractor counts there as it
//! does on the route, and a caller of the anonymous namespace is shown nothing unless the
//! application opted in. Real servers on loopback ports.

use idempotent_core::digest::DigestKey;
use idempotent_core::store::{MemoryStore, RecordKey, Store};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Deserialize, Serialize)]
struct Order {
    amount: u64,
}

/// The caller named by `X-Test-User`, as an application's authentication extractor would set it.
fn user(header: Option<&[u8]>) -> Option<String> {
    header.and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned)
}

mod axum_app {
    use super::*;
    use axum::extract::{FromRequestParts, Request};
    use axum::http::request::Parts;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use idempotent_axum::{idempotent, record_status, Actor, Idempotency};

    pub struct Authenticated;

    impl<S: Send + Sync> FromRequestParts<S> for Authenticated {
        type Rejection = Response;
        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
            let user = user(parts.headers.get("x-test-user").map(|v| v.as_bytes()))
                .ok_or_else(|| StatusCode::UNAUTHORIZED.into_response())?;
            parts.extensions.insert(Actor(user));
            Ok(Authenticated)
        }
    }

    #[idempotent(scope = "fixture.status.axum.orders", fields = [amount])]
    async fn create(_: Authenticated, Json(order): Json<Order>) -> (StatusCode, String) {
        (StatusCode::CREATED, order.amount.to_string())
    }

    async fn mine(_: Authenticated, request: Request) -> Response {
        record_status(request).await
    }

    pub async fn start(store: Arc<dyn Store>, digests: Option<&str>) -> String {
        let mut builder = Idempotency::builder(store).actor(idempotent_axum::ActorSource::Anonymous);
        if let Some(secret) = digests {
            builder = builder.digest_secret(secret);
        }
        let idempotency = builder.build().unwrap();
        let app = Router::new()
            .route("/orders", post(create))
            .route("/mine/{scope}/{key}", get(mine))
            .route("/plain/{scope}/{key}", get(record_status))
            .layer(idempotency.layer());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }
}

mod actix_app {
    use super::*;
    use actix_web::dev::Payload;
    use actix_web::{web, App, FromRequest, HttpMessage, HttpRequest, HttpResponse, HttpServer};
    use idempotent_actix::{idempotent, record_status, Actor, Idempotency};
    use std::future::{ready, Ready};

    pub struct Authenticated;

    impl FromRequest for Authenticated {
        type Error = actix_web::Error;
        type Future = Ready<Result<Self, Self::Error>>;
        fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
            ready(match user(request.headers().get("x-test-user").map(|v| v.as_bytes())) {
                Some(user) => {
                    request.extensions_mut().insert(Actor(user));
                    Ok(Authenticated)
                }
                None => Err(actix_web::error::ErrorUnauthorized("who are you")),
            })
        }
    }

    #[idempotent(scope = "fixture.status.actix.orders", fields = [amount])]
    async fn create(_: Authenticated, order: web::Json<Order>) -> HttpResponse {
        HttpResponse::Created().body(order.amount.to_string())
    }

    async fn mine(_: Authenticated, request: HttpRequest) -> HttpResponse {
        record_status(request).await
    }

    pub async fn start(store: Arc<dyn Store>, digests: Option<&'static str>) -> String {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let mut builder = Idempotency::builder(store).actor(idempotent_axum::ActorSource::Anonymous);
                if let Some(secret) = digests {
                    builder = builder.digest_secret(secret);
                }
                let idempotency = builder.build().unwrap();
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(idempotency.data())
                        .route("/orders", web::post().to(create))
                        .route("/mine/{scope}/{key}", web::get().to(mine))
                        .route("/plain/{scope}/{key}", web::get().to(record_status))
                })
                .workers(1)
                .bind("127.0.0.1:0")
                .unwrap();
                let _ = tx.send(server.addrs()[0]);
                let _ = server.run().await;
            })
        });
        format!("http://{}", rx.await.unwrap())
    }
}

async fn the_status_endpoint_knows_the_caller_as_the_route_does(base: &str, scope: &str, store: &MemoryStore) {
    let client = reqwest::Client::new();
    let order = client
        .post(format!("{base}/orders"))
        .header("x-test-user", "alice")
        .header("idempotency-key", "order-1")
        .json(&serde_json::json!({"amount": 7}))
        .send()
        .await
        .unwrap();
    assert_eq!(order.status(), 201);
    // Filed under alice, the actor the extractor set (the runtime's source is `Anonymous`).
    assert!(store.inspect(&RecordKey::of(scope, Some("alice"), "order-1")).await.unwrap().is_some());

    let status = |path: &str, user: &str| {
        client.get(format!("{base}/{path}/{scope}/order-1")).header("x-test-user", user).send()
    };
    let mine = status("mine", "alice").await.unwrap();
    assert_eq!(mine.status(), 200, "the extractor's actor counts here too");
    let body: serde_json::Value = mine.json().await.unwrap();
    assert_eq!(body["state"], "completed");
    assert_eq!(status("mine", "mallory").await.unwrap().status(), 404, "another caller's record");
    // Without the application's extractor nobody is known: the anonymous namespace, shown nothing.
    let plain = status("plain", "alice").await.unwrap();
    assert_eq!(plain.status(), 403);
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body["type"], "urn:idempotent:problem:status-disabled");
}

#[tokio::test]
async fn axum_status_and_routes_agree_on_the_caller() {
    let store = Arc::new(MemoryStore::new());
    let base = axum_app::start(store.clone(), None).await;
    the_status_endpoint_knows_the_caller_as_the_route_does(&base, "fixture.status.axum.orders", &store).await;
}

#[tokio::test]
async fn actix_status_and_routes_agree_on_the_caller() {
    let store = Arc::new(MemoryStore::new());
    let base = actix_app::start(store.clone(), None).await;
    the_status_endpoint_knows_the_caller_as_the_route_does(&base, "fixture.status.actix.orders", &store).await;
}

/// With a digest secret the store files callers under their HMAC, which a guess of the bearer
/// token cannot confirm; the status endpoint still finds the caller's own record.
async fn keyed_digests_file_callers_under_the_secret(base: &str, scope: &str, store: &MemoryStore) {
    let client = reqwest::Client::new();
    let order = client
        .post(format!("{base}/orders"))
        .header("x-test-user", "alice")
        .header("idempotency-key", "order-2")
        .json(&serde_json::json!({"amount": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(order.status(), 201);
    assert!(store.inspect(&RecordKey::of(scope, Some("alice"), "order-2")).await.unwrap().is_none(), "not plain");
    let keyed = RecordKey::keyed(&DigestKey::new("the-secret"), scope, Some("alice"), "order-2");
    assert!(store.inspect(&keyed).await.unwrap().is_some(), "under the HMAC");
    let mine = client.get(format!("{base}/mine/{scope}/order-2")).header("x-test-user", "alice").send().await.unwrap();
    assert_eq!(mine.status(), 200);
}

#[tokio::test]
async fn axum_keyed_digests() {
    let store = Arc::new(MemoryStore::new());
    let base = axum_app::start(store.clone(), Some("the-secret")).await;
    keyed_digests_file_callers_under_the_secret(&base, "fixture.status.axum.orders", &store).await;
}

#[tokio::test]
async fn actix_keyed_digests() {
    let store = Arc::new(MemoryStore::new());
    let base = actix_app::start(store.clone(), Some("the-secret")).await;
    keyed_digests_file_callers_under_the_secret(&base, "fixture.status.actix.orders", &store).await;
}
