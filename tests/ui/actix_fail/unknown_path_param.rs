use actix_web::{post, web, HttpResponse};
use idempotent_actix::idempotent;

#[idempotent(scope = "orders.cancel", fields = [path(order_id)])]
#[post("/orders/{id}/cancel")]
async fn cancel(id: web::Path<u64>) -> HttpResponse {
    HttpResponse::Ok().body(id.to_string())
}

fn main() {}
