//! The payments demo's handler: state, a custom authentication extractor and a JSON body.
#![deny(warnings)]

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_axum::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Clone)]
struct App {
    currency: &'static str,
}

/// The authenticated caller, from the `Authorization` header.
struct Caller(String);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let value = parts.headers.get("authorization").and_then(|v| v.to_str().ok());
        value.map(|v| Caller(v.to_owned())).ok_or(StatusCode::UNAUTHORIZED)
    }
}

#[derive(Deserialize, Serialize)]
struct CreatePayment {
    amount: u64,
    currency: String,
    customer: String,
    note: Option<String>,
}

#[derive(Serialize)]
struct Payment {
    id: String,
    amount: u64,
    customer: String,
}

enum ApiError {
    WrongCurrency,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::WrongCurrency => (StatusCode::UNPROCESSABLE_ENTITY, "wrong currency").into_response(),
        }
    }
}

/// Creates a payment.
#[idempotent(scope = "payments.create", fields = [amount, currency, customer], ttl = "24h")]
pub async fn create_payment(
    caller: Caller,
    State(app): State<App>,
    Json(req): Json<CreatePayment>,
) -> Result<(StatusCode, Json<Payment>), ApiError> {
    if req.currency != app.currency {
        return Err(ApiError::WrongCurrency);
    }
    let _ = req.note;
    Ok((
        StatusCode::CREATED,
        Json(Payment { id: format!("pay_{}", caller.0), amount: req.amount, customer: req.customer }),
    ))
}

fn main() {
    let _app: Router = Router::new().route("/p", post(create_payment)).with_state(App { currency: "EUR" });

    let routes = idempotent_axum::core::registry::routes();
    let record = routes.iter().find(|r| r.scope() == Some("payments.create")).expect("registered");
    let policy = record.policy.expect("protected");
    assert!(record.handler.ends_with("::create_payment"), "{}", record.handler);
    assert_eq!(policy.fields(), ["amount", "currency", "customer"]);
    assert_eq!(policy.ttl, std::time::Duration::from_secs(24 * 60 * 60));
    assert_eq!(
        policy,
        idempotent_axum::core::policy::Policy {
            identity: policy.identity,
            ..idempotent_axum::core::policy::Policy::new("payments.create")
        }
    );
    assert_eq!(record.line, 58);
    assert!(record.file.ends_with("demo_handler.rs"), "{}", record.file);
    assert_eq!((record.method, record.path, record.exempt), (None, None, None));
}
