//! The reverse order, `#[post]` above `#[idempotent]`: actix-web's attribute expands first and
//! moves the function inside the service it generates, where `#[idempotent]` still protects it.
//! The routing attribute's arguments are gone by then, so the record has no method and path
//! unless `route` gives them.
#![deny(warnings)]

use actix_web::{post, web, App, HttpResponse};
use idempotent_actix::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct CreatePayment {
    amount: u64,
}

#[post("/payments")]
#[idempotent(scope = "payments.create", fields = [amount])]
async fn create_payment(req: web::Json<CreatePayment>) -> HttpResponse {
    HttpResponse::Created().body(req.amount.to_string())
}

#[post("/refunds")]
#[idempotent(scope = "refunds.create", route = "POST /refunds")]
async fn create_refund() -> HttpResponse {
    HttpResponse::Created().finish()
}

fn main() {
    let _app = App::new().service(create_payment).service(create_refund);
    let routes = idempotent_actix::core::registry::routes();
    let payment = routes.iter().find(|r| r.scope() == Some("payments.create")).expect("registered");
    assert_eq!((payment.method, payment.path), (None, None));
    let refund = routes.iter().find(|r| r.scope() == Some("refunds.create")).expect("registered");
    assert_eq!((refund.method, refund.path), (Some("POST"), Some("/refunds")));
}
