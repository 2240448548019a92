//! Enforcement on actix-web: the `Enforce` middleware and `assert_protected`.

use actix_web::http::StatusCode;
use actix_web::test as actix_test;
use actix_web::{post, put, web, App, HttpResponse};
use idempotent_actix::core::store::MemoryStore;
use idempotent_actix::enforce::{self, Enforce, MutatingMethods};
use idempotent_actix::{idempotent, Idempotency};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

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

async fn unprotected_with_body(_: web::Json<Order>) -> HttpResponse {
    HttpResponse::Ok().body("changed")
}

/// Says `POST /stale` but is mounted at `/elsewhere`: a stale route must not make `/stale` look
/// protected.
#[idempotent(scope = "fixture.actix.stale.create", route = "POST /stale")]
async fn stale_route(order: web::Json<Order>) -> HttpResponse {
    HttpResponse::Created().body(order.amount.to_string())
}

type Body = actix_web::body::EitherBody<actix_web::body::BoxBody>;

async fn app(
    enforce: Enforce,
) -> impl actix_web::dev::Service<
    actix_http::Request,
    Response = actix_web::dev::ServiceResponse<Body>,
    Error = actix_web::Error,
> {
    let idempotency = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_actix::ActorSource::Anonymous)
        .build()
        .expect("valid registry");
    actix_test::init_service(
        App::new()
            .wrap(enforce)
            .app_data(idempotency.data())
            .service(create_order)
            .service(put_profile)
            .service(web::scope("/v1").service(create_order))
            .route("/elsewhere", web::post().to(stale_route))
            .route("/stale", web::post().to(unprotected_with_body))
            .route("/unprotected", web::post().to(unprotected))
            .route("/unprotected", web::put().to(unprotected))
            .route("/unprotected-body", web::post().to(unprotected_with_body))
            .route("/unprotected-body", web::put().to(unprotected_with_body))
            .route("/list", web::get().to(unprotected)),
    )
    .await
}

async fn call<S>(app: &S, method: &str, uri: &str) -> (StatusCode, String)
where
    S: actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse<Body>,
        Error = actix_web::Error,
    >,
{
    let request = actix_test::TestRequest::default()
        .method(method.parse().unwrap())
        .uri(uri)
        .insert_header(("Idempotency-Key", format!("k-{uri}")))
        .set_json(serde_json::json!({"amount": 7}))
        .to_request();
    let response = actix_test::call_service(app, request).await;
    let status = response.status();
    (status, String::from_utf8_lossy(&actix_test::read_body(response).await).into_owned())
}

fn refused(response: &(StatusCode, String), route: &str) -> bool {
    response.0 == StatusCode::INTERNAL_SERVER_ERROR
        && response.1.contains("urn:idempotent:problem:misconfigured")
        && response.1.contains(&format!("{route} changes state"))
}

#[actix_web::test]
async fn refuse_mode_refuses_an_unprotected_route_that_reads_a_payload_before_it_runs() {
    let app = app(Enforce::refuse()).await;
    for _ in 0..2 {
        let response = call(&app, "POST", "/unprotected-body").await;
        assert!(refused(&response, "POST /unprotected-body"), "{response:?}");
    }
    assert_eq!(call(&app, "PUT", "/unprotected-body").await, (StatusCode::OK, "changed".into()));
    assert_eq!(call(&app, "GET", "/list").await.0, StatusCode::OK);
    assert_eq!(call(&app, "POST", "/orders").await, (StatusCode::CREATED, "7".into()));
    assert_eq!(call(&app, "POST", "/nowhere").await.0, StatusCode::NOT_FOUND);
    let all = self::app(Enforce::refuse().methods(MutatingMethods::ALL)).await;
    assert!(refused(&call(&all, "PUT", "/unprotected-body").await, "PUT /unprotected-body"));
    assert_eq!(call(&all, "PUT", "/profile").await, (StatusCode::OK, "saved".into()), "exempt");
}

#[actix_web::test]
async fn refuse_mode_refuses_a_bodiless_unprotected_route_from_its_second_request() {
    let app = app(Enforce::refuse()).await;
    assert_eq!(call(&app, "POST", "/unprotected").await, (StatusCode::OK, "changed".into()));
    assert!(refused(&call(&app, "POST", "/unprotected").await, "POST /unprotected"));
}

#[actix_web::test]
async fn refuse_mode_recognises_protected_routes_under_a_scope() {
    let app = app(Enforce::refuse()).await;
    assert_eq!(call(&app, "POST", "/v1/orders").await, (StatusCode::CREATED, "7".into()));
    assert_eq!(call(&app, "POST", "/v1/orders").await, (StatusCode::CREATED, "7".into()));
    assert_eq!(call(&app, "POST", "/elsewhere").await, (StatusCode::CREATED, "7".into()));
}

#[actix_web::test]
async fn a_stale_route_cannot_hide_an_unprotected_handler() {
    let app = app(Enforce::refuse()).await;
    assert!(refused(&call(&app, "POST", "/stale").await, "POST /stale"));
}

#[actix_web::test]
async fn warn_mode_serves_the_request() {
    let app = app(Enforce::warn()).await;
    assert_eq!(call(&app, "POST", "/unprotected-body").await, (StatusCode::OK, "changed".into()));
    assert_eq!(call(&app, "POST", "/unprotected-body").await, (StatusCode::OK, "changed".into()));
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
