//! `#[idempotent]` above actix-web's routing attribute records its method and path.
#![deny(warnings)]

use actix_web::{post, put, web, App, HttpResponse};
use idempotent_actix::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct CreatePayment {
    amount: u64,
    currency: String,
}

/// Creates a payment.
#[idempotent(scope = "payments.create", fields = [amount, currency], ttl = "24h")]
#[post("/payments")]
async fn create_payment(req: web::Json<CreatePayment>) -> HttpResponse {
    HttpResponse::Created().body(format!("{} {}", req.amount, req.currency))
}

#[idempotent(scope = "payments.update")]
#[put("/payments/{id}")]
async fn update_payment(id: web::Path<String>, web::Json(req): web::Json<CreatePayment>) -> HttpResponse {
    HttpResponse::Ok().body(format!("{id} {}", req.amount))
}

fn main() {
    let _app = App::new().service(create_payment).service(update_payment);
    let routes = idempotent_actix::core::registry::routes();
    let find = |scope: &str| *routes.iter().find(|r| r.scope() == Some(scope)).expect("registered");
    let create = find("payments.create");
    assert_eq!((create.method, create.path), (Some("POST"), Some("/payments")));
    assert_eq!(create.framework, idempotent_actix::core::registry::Framework::Actix);
    assert!(create.handler.ends_with("::create_payment"), "{}", create.handler);
    let update = find("payments.update");
    assert_eq!((update.method, update.path), (Some("PUT"), Some("/payments/{id}")));
}
