//! Enforcement on actix-web: the `Enforce` middleware and `assert_protected`.

use actix_web::http::StatusCode;
use actix_web::test as actix_test;
use actix_web::{post, put, web, App, HttpResponse};
use idempotent_actix::enforce::{self, Enforce, MutatingMethods};
use idempotent_actix::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Order {
    amount: u64,
}

#[idempotent(scope = "fixture.actix.orders.create", fields = [amount])]
#[post("/orders")]
async fn create_order(order: web::Json<Order>) -> HttpResponse {
    HttpResponse::Created().body(order.amount.to_string())
}

#[idempotent(exempt = "natural key: PUT replaces the resource")]
#[put("/profile")]
async fn put_profile() -> HttpResponse {
    HttpResponse::Ok().body("saved")
}

async fn unprotected() -> HttpResponse {
    HttpResponse::Ok().body("changed")
}

async fn call(enforce: Enforce, method: &str, uri: &str) -> (StatusCode, String) {
    let app = actix_test::init_service(
        App::new()
            .wrap(enforce)
            .service(create_order)
            .service(put_profile)
            .route("/unprotected", web::post().to(unprotected))
            .route("/unprotected", web::put().to(unprotected))
            .route("/list", web::get().to(unprotected)),
    )
    .await;
    let request = actix_test::TestRequest::default().method(method.parse().unwrap()).uri(uri).to_request();
    let response = actix_test::call_service(&app, request).await;
    let status = response.status();
    (status, String::from_utf8_lossy(&actix_test::read_body(response).await).into_owned())
}

#[actix_web::test]
async fn refuse_mode_answers_500_for_an_unprotected_mutating_route() {
    let (status, body) = call(Enforce::refuse(), "POST", "/unprotected").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body.contains("urn:idempotent:problem:misconfigured"), "{body}");
    assert!(body.contains("POST /unprotected changes state"), "{body}");
    assert_eq!(call(Enforce::refuse(), "PUT", "/unprotected").await, (StatusCode::OK, "changed".into()));
    assert_eq!(call(Enforce::refuse(), "GET", "/list").await.0, StatusCode::OK);
    assert_eq!(call(Enforce::refuse(), "POST", "/nowhere").await.0, StatusCode::NOT_FOUND);
    let all = || Enforce::refuse().methods(MutatingMethods::ALL);
    assert_eq!(call(all(), "PUT", "/unprotected").await.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(call(all(), "PUT", "/profile").await, (StatusCode::OK, "saved".into()), "exempt");
}

#[actix_web::test]
async fn warn_mode_serves_the_request() {
    assert_eq!(call(Enforce::warn(), "POST", "/unprotected").await, (StatusCode::OK, "changed".into()));
}

#[test]
fn assert_protected_lists_unprotected_routes() {
    enforce::assert_protected(&[("POST", "/orders"), ("PUT", "/profile"), ("GET", "/list")]);
    let failure =
        std::panic::catch_unwind(|| enforce::assert_protected(&[("POST", "/orders"), ("POST", "/unprotected")]))
            .unwrap_err();
    let message = failure.downcast_ref::<String>().unwrap();
    assert!(
        message.starts_with("1 mutating route(s) without an idempotency policy:\n  - POST /unprotected"),
        "{message}"
    );
}
