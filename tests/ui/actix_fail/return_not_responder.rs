use actix_web::{post, web};
use idempotent_actix::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct CreatePayment {
    amount: u64,
}

struct NotAResponse;

#[idempotent(scope = "payments.create", fields = [amount])]
#[post("/payments")]
async fn create_payment(req: web::Json<CreatePayment>) -> NotAResponse {
    let _ = req.amount;
    NotAResponse
}

fn main() {}
