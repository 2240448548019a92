//! The minimal example of each adapter, as a user copies it, served on a loopback port: the first
//! request creates, a retry with the same key replays.

#[path = "../../idempotent-axum/examples/axum_minimal.rs"]
mod axum_minimal;

#[path = "../../idempotent-actix/examples/actix_minimal.rs"]
mod actix_minimal;

use idempotent_tests::http::{new_key, send};
use serde_json::json;

async fn create_twice(base: &str) {
    let key = new_key();
    let order = json!({"item": "book", "quantity": 2});
    let post = || reqwest::Client::new().post(format!("{base}/orders")).header("Idempotency-Key", &key).json(&order);
    let first = send(post()).await;
    assert_eq!(first.status, 201, "{}", String::from_utf8_lossy(&first.body));
    assert!(String::from_utf8_lossy(&first.body).ends_with(": 2 x book"));
    let again = send(post()).await;
    assert!(again.replayed());
    assert_eq!(again.body, first.body);
    let missing = send(reqwest::Client::new().post(format!("{base}/orders")).json(&order)).await;
    missing.assert_problem(400, "urn:idempotent:problem:key-missing");
}

#[tokio::test]
async fn the_axum_example_protects_its_route() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, axum_minimal::app()).await });
    create_twice(&format!("http://{addr}")).await;
}

#[tokio::test]
async fn the_actix_example_protects_its_route() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let idempotency = actix_minimal::idempotency();
            let server = actix_web::HttpServer::new(move || {
                let idempotency = idempotency.clone();
                actix_web::App::new()
                    .wrap(idempotent_actix::enforce::Enforce::refuse())
                    .configure(move |c| actix_minimal::configure(c, &idempotency))
            })
            .workers(1)
            .bind("127.0.0.1:0")
            .unwrap();
            let _ = tx.send(server.addrs()[0]);
            let _ = server.run().await;
        })
    });
    create_twice(&format!("http://{}", rx.await.unwrap())).await;
}
