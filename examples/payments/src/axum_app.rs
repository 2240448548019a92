//! The demo on axum: routes, authentication and error responses.

use crate::config::Config;
use crate::domain::{Bank, CreatePayment, CreateTransfer, Invalid};
use crate::ledger::Ledger;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idempotent_axum::{idempotent, policy_report, ActorSource, Idempotency};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Largest request body accepted; larger bodies are 413 before any handler runs.
pub const MAX_BODY: usize = 64 * 1024;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    bank: Arc<Bank>,
    transfer_delay: Duration,
}

/// The authenticated caller: `Authorization: Bearer <account>`.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

fn demo_problem(status: StatusCode, type_slug: &str, title: &str, detail: String) -> Response {
    let body = json!({ "type": format!("urn:payments-demo:problem:{type_slug}"), "title": title, "status": status.as_u16(), "detail": detail });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    response
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let account = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|a| {
                !a.is_empty() && a.len() <= 64 && a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        match account {
            Some(a) => Ok(Caller(a.to_owned())),
            None => {
                let mut r = demo_problem(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "Authentication required",
                    "Send `Authorization: Bearer <account>` where account is 1 to 64 letters, digits, `_` or `-`."
                        .into(),
                );
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Err(r)
            }
        }
    }
}

/// Errors a handler answers with.
#[derive(Debug)]
pub enum ApiError {
    /// Domain validation: 422, a final outcome (stored and replayed).
    Invalid(Invalid),
    /// The operation could not be recorded: 500, released so a retry runs again.
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Invalid(e) => {
                demo_problem(StatusCode::UNPROCESSABLE_ENTITY, "validation", "Invalid request", e.0)
            }
            ApiError::Internal(e) => {
                tracing::error!(error = %e, "operation failed");
                demo_problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    "The operation was not executed; retry with the same key.".into(),
                )
            }
        }
    }
}

fn done<T>(r: Result<Result<T, Invalid>, String>) -> Result<T, ApiError> {
    r.map_err(ApiError::Internal)?.map_err(ApiError::Invalid)
}

/// `POST /payments`.
#[idempotent(scope = "payments.create", fields = [amount, currency, customer], ttl = "24h", route = "POST /payments")]
pub async fn create_payment(
    Caller(account): Caller,
    State(app): State<AppState>,
    Json(req): Json<CreatePayment>,
) -> Result<impl IntoResponse, ApiError> {
    let payment = done(app.bank.create_payment(&account, req))?;
    let location = format!("/payments/{}", payment.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(payment)))
}

/// `POST /transfers`: takes the configured processing time.
#[idempotent(scope = "transfers.create", fields = [amount, from, to], ttl = "24h", lease = "3s", route = "POST /transfers")]
pub async fn create_transfer(
    Caller(account): Caller,
    State(app): State<AppState>,
    Json(req): Json<CreateTransfer>,
) -> Result<impl IntoResponse, ApiError> {
    tokio::time::sleep(app.transfer_delay).await;
    let transfer = done(app.bank.create_transfer(&account, req))?;
    Ok((StatusCode::CREATED, Json(transfer)))
}

/// `POST /quotes`: any JSON object, fingerprinted whole, kept 3 seconds.
#[idempotent(scope = "quotes.create", ttl = "3s", lease = "2s", route = "POST /quotes")]
pub async fn create_quote(
    Caller(account): Caller,
    State(app): State<AppState>,
    Json(req): Json<serde_json::Value>,
) -> Result<impl IntoResponse, ApiError> {
    let quote = done(app.bank.create_quote(&account, req))?;
    Ok((StatusCode::CREATED, Json(quote)))
}

async fn list_payments(Caller(account): Caller, State(app): State<AppState>) -> Json<Vec<serde_json::Value>> {
    Json(app.bank.list(&account, "payment"))
}

async fn list_transfers(Caller(account): Caller, State(app): State<AppState>) -> Json<Vec<serde_json::Value>> {
    Json(app.bank.list(&account, "transfer"))
}

async fn get_payment(Caller(account): Caller, State(app): State<AppState>, Path(id): Path<String>) -> Response {
    match app.bank.payment(&account, &id) {
        Some(p) => Json(p).into_response(),
        None => demo_problem(
            StatusCode::NOT_FOUND,
            "not-found",
            "Payment not found",
            format!("No payment `{id}` for this account."),
        ),
    }
}

/// Builds the application: opens the store and the ledger, validates the policies.
pub async fn app(config: &Config) -> Result<Router, String> {
    let (ledger, entries) = Ledger::open(&config.ledger)?;
    let store = idempotent_axum::core::store::connect(&config.store)
        .await
        .map_err(|e| format!("idempotency store `{}`: {e}", config.store))?;
    let idempotency = Idempotency::builder(store).actor(ActorSource::BearerToken).build().map_err(|e| e.to_string())?;
    let state = AppState { bank: Arc::new(Bank::new(ledger, entries)), transfer_delay: config.transfer_delay };
    Ok(Router::new()
        .route("/payments", post(create_payment).get(list_payments))
        .route("/payments/{id}", get(get_payment))
        .route("/transfers", post(create_transfer).get(list_transfers))
        .route("/quotes", post(create_quote))
        .route("/_idempotency/policies", get(policy_report))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(idempotency.layer())
        .with_state(state))
}

/// Binds `config.addr` and returns the bound address and the server's task.
pub async fn start(config: &Config) -> Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>), String> {
    let router = app(config).await?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    });
    Ok((addr, task))
}
