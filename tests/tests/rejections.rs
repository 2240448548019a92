//! A protected route's body extractor rejections (not JSON, JSON of another shape) as the
//! application's problem+json when the runtime is built with `rejections_as_problems`, and as the
//! framework's own answer otherwise; on both frameworks, real servers on loopback ports.

use serde::{Deserialize, Serialize};
use std::sync::Arc;

const TYPE: &str = "urn:test:problem:bad-request";

#[derive(Deserialize, Serialize)]
struct Order {
    amount: u64,
}

mod axum_app {
    use super::*;
    use axum::routing::post;
    use axum::{Json, Router};
    use idempotent_axum::core::store::MemoryStore;
    use idempotent_axum::{idempotent, ActorSource, Idempotency};

    #[idempotent(scope = "fixture.rejections.axum", fields = [amount])]
    async fn create(Json(order): Json<Order>) -> String {
        order.amount.to_string()
    }

    pub async fn start(problems: bool) -> String {
        let mut builder = Idempotency::builder(Arc::new(MemoryStore::new())).actor(ActorSource::Anonymous);
        if problems {
            builder = builder.rejections_as_problems(TYPE);
        }
        let idempotency = builder.build().unwrap();
        let app = Router::new().route("/orders", post(create)).layer(idempotency.layer());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }
}

mod actix_app {
    use super::*;
    use actix_web::{web, App, HttpResponse, HttpServer};
    use idempotent_actix::core::store::MemoryStore;
    use idempotent_actix::{idempotent, ActorSource, Idempotency};

    #[idempotent(scope = "fixture.rejections.actix", fields = [amount])]
    async fn create(order: web::Json<Order>) -> HttpResponse {
        HttpResponse::Ok().body(order.amount.to_string())
    }

    pub async fn start(problems: bool) -> String {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let mut builder = Idempotency::builder(Arc::new(MemoryStore::new())).actor(ActorSource::Anonymous);
                if problems {
                    builder = builder.rejections_as_problems(TYPE);
                }
                let idempotency = builder.build().unwrap();
                let server = HttpServer::new(move || {
                    App::new().app_data(idempotency.data()).route("/orders", web::post().to(create))
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

async fn send(base: &str, body: &str) -> (u16, String, String) {
    let response = reqwest::Client::new()
        .post(format!("{base}/orders"))
        .header("idempotency-key", "k-1")
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

/// Each framework's own status for a body that is not JSON, and for JSON of another shape (axum
/// 422, actix-web 400): the mapper keeps it.
async fn rejections_are_problems(base: &str, shape: u16) {
    for (body, status) in [("{not json", 400), (r#"{"amount": "many"}"#, shape), (r#"{"quantity": 1}"#, shape)] {
        let (got, content_type, text) = send(base, body).await;
        assert_eq!((got, content_type.as_str()), (status, "application/problem+json"), "{body}: {text}");
        let problem: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(problem["type"], TYPE, "{problem}");
        assert_eq!(problem["status"], status);
        assert!(problem["detail"].as_str().unwrap().contains("Nothing was executed"), "{problem}");
    }
    // Nothing was stored: the same key with a valid body runs.
    assert_eq!(send(base, r#"{"amount": 3}"#).await.0, 200);
}

async fn without_the_setting_the_framework_answers(base: &str) {
    let (status, content_type, _) = send(base, r#"{"quantity": 1}"#).await;
    assert!(status == 400 || status == 422, "{status}");
    assert!(!content_type.starts_with("application/problem+json"), "{content_type}");
}

#[tokio::test]
async fn axum_rejections() {
    rejections_are_problems(&axum_app::start(true).await, 422).await;
    without_the_setting_the_framework_answers(&axum_app::start(false).await).await;
}

#[tokio::test]
async fn actix_rejections() {
    rejections_are_problems(&actix_app::start(true).await, 400).await;
    without_the_setting_the_framework_answers(&actix_app::start(false).await).await;
}
