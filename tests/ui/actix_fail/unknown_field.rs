use actix_web::{post, web, HttpResponse};
use idempotent_actix::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct CreatePayment {
    amount: u64,
}

#[idempotent(scope = "payments.create", fields = [amount, currency])]
#[post("/payments")]
async fn create_payment(req: web::Json<CreatePayment>) -> HttpResponse {
    HttpResponse::Created().body(req.amount.to_string())
}

fn main() {}
