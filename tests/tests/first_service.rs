//! The README's "Your first service", as a user copies it, served on a loopback port (a test
//! binary of its own: its scopes are the ones a first service would pick, which the minimal
//! examples use too).

#[path = "../../idempotent-axum/examples/first_service.rs"]
mod first_service;

use idempotent_tests::http::{new_key, send};
use serde_json::json;

/// The README's first service, on a SQLite file: create and cancel once per key, per caller,
/// replayed across a restart; a key reused on another order is refused; and its policy report
/// names both routes before they served a request.
#[tokio::test]
async fn the_first_service_walk_through() {
    use idempotent_axum::core::registry::Framework;
    let report = idempotent_axum::core::report::command(Framework::Axum, &["policies".to_owned()]).unwrap().unwrap();
    assert!(
        report.contains("POST /orders/{id}/cancel") && report.contains("`orders.create` | POST /orders |"),
        "{report}"
    );

    let path = std::env::temp_dir().join(format!("first-service-{}.sqlite", new_key()));
    let serve = || async {
        let store = idempotent_axum::core::store::connect(&format!("sqlite:{}", path.display())).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, first_service::app(store)).await });
        format!("http://{addr}")
    };
    let base = serve().await;
    let client = reqwest::Client::new();
    let post = |base: &str, path: &str, caller: &str, key: &str| {
        client.post(format!("{base}{path}")).bearer_auth(caller).header("Idempotency-Key", key)
    };
    let order = json!({"item": "book", "quantity": 1});
    let created = send(post(&base, "/orders", "acct_1", "k-create").json(&order)).await;
    assert_eq!((created.status, created.body.as_slice()), (201, &b"order 1"[..]));
    let again = send(post(&base, "/orders", "acct_1", "k-create").json(&order)).await;
    assert!(again.replayed() && again.body == created.body);
    // Another caller with the same key is another request: it runs.
    let theirs = send(post(&base, "/orders", "acct_2", "k-create").json(&order)).await;
    assert_eq!((theirs.status, theirs.replayed()), (201, false));

    let cancelled = send(post(&base, "/orders/1/cancel", "acct_1", "k-cancel")).await;
    assert_eq!(cancelled.status, 200, "{}", String::from_utf8_lossy(&cancelled.body));
    send(post(&base, "/orders/1/cancel", "acct_1", "k-cancel")).await.replayed().then_some(()).expect("replayed");
    let reused = send(post(&base, "/orders/2/cancel", "acct_1", "k-cancel")).await;
    reused.assert_problem(422, "urn:idempotent:problem:key-reused");
    let anonymous = send(client.post(format!("{base}/orders")).header("Idempotency-Key", "k-x").json(&order)).await;
    anonymous.assert_problem(401, "urn:idempotent:problem:actor-missing");

    // A restarted service on the same file replays what it answered before.
    let restarted = serve().await;
    let replay = send(post(&restarted, "/orders", "acct_1", "k-create").json(&order)).await;
    assert!(replay.replayed() && replay.body == created.body, "{}", String::from_utf8_lossy(&replay.body));
}

/// The same service on a SQLite file with a per-caller bound in its store specification: a
/// caller whose stored answers fill its share is refused a new key with 429 and `Retry-After`
/// (its record lives for the route's ttl), while its replays still come and another caller still
/// gets in.
#[tokio::test]
async fn a_caller_over_its_bound_gets_429_with_retry_after() {
    let path = std::env::temp_dir().join(format!("first-service-{}.sqlite", new_key()));
    // One claim (a fixed 256 bytes, the key's characters) fits, not a stored order and a claim.
    let spec = format!("sqlite:{}?actor_max_bytes=600", path.display());
    let store = idempotent_axum::core::store::connect(&spec).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, first_service::app(store)).await });
    let client = reqwest::Client::new();
    let post = |caller: &str, key: &str| {
        client
            .post(format!("{base}/orders"))
            .bearer_auth(caller)
            .header("Idempotency-Key", key)
            .json(&json!({"item": "book", "quantity": 1}))
    };
    let first = send(post("acct_1", "k-1")).await;
    assert_eq!(first.status, 201, "{}", String::from_utf8_lossy(&first.body));
    let over = send(post("acct_1", "k-2")).await;
    over.assert_problem(429, "urn:idempotent:problem:quota-exceeded");
    let retry_after: u64 = over.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(retry_after > 60, "until its stored order is forgotten: {retry_after} s");
    assert!(send(post("acct_1", "k-1")).await.replayed(), "a replay is never refused");
    assert_eq!(send(post("acct_2", "k-2")).await.status, 201, "another caller still gets in");
    let _ = std::fs::remove_file(&path);
}
