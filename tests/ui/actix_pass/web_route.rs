//! A handler registered with `web::post().to(..)`: state, a custom extractor and a JSON body.
#![deny(warnings)]

use actix_web::dev::Payload;
use actix_web::{web, App, FromRequest, HttpRequest, HttpResponse, Responder};
use idempotent_actix::idempotent;
use serde::{Deserialize, Serialize};
use std::future::{ready, Ready};

struct AppState {
    currency: &'static str,
}

/// The authenticated caller, from the `Authorization` header.
struct Caller(String);

impl FromRequest for Caller {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let value = req.headers().get("authorization").and_then(|v| v.to_str().ok());
        ready(value.map(|v| Caller(v.to_owned())).ok_or_else(|| actix_web::error::ErrorUnauthorized("who?")))
    }
}

#[derive(Deserialize, Serialize)]
struct CreatePayment {
    amount: u64,
    currency: String,
    note: Option<String>,
}

/// Creates a payment; any `Responder` may be returned.
#[idempotent(scope = "payments.create", fields = [amount, currency], route = "POST /p")]
pub async fn create_payment(
    caller: Caller,
    app: web::Data<AppState>,
    web::Json(req): web::Json<CreatePayment>,
) -> impl Responder {
    if req.currency != app.currency {
        return HttpResponse::UnprocessableEntity().body("wrong currency");
    }
    let _ = req.note;
    HttpResponse::Created().body(format!("{} {}", caller.0, req.amount))
}

/// No body: the fingerprint is the scope alone.
#[idempotent(scope = "jobs.start", key = "optional")]
async fn start_job() -> &'static str {
    "started"
}

fn main() {
    let _app = App::new()
        .app_data(web::Data::new(AppState { currency: "EUR" }))
        .route("/p", web::post().to(create_payment))
        .route("/jobs", web::post().to(start_job));
    let routes = idempotent_actix::core::registry::routes();
    let record = routes.iter().find(|r| r.scope() == Some("payments.create")).expect("registered");
    assert_eq!((record.method, record.path), (Some("POST"), Some("/p")));
    let job = routes.iter().find(|r| r.scope() == Some("jobs.start")).expect("registered");
    assert_eq!((job.method, job.path), (None, None));
}
