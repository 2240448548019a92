//! The demo on axum: routes, authentication and error responses.

use crate::api::{done, ApiError, Caller, DemoProblem, PROBLEM_CONTENT_TYPE};
use crate::checkout::{self, CheckoutForm};
use crate::cli::SHUTDOWN_GRACE;
use crate::config::Config;
use crate::deposits::{CreateDeposit, Deposits};
use crate::domain::{Bank, CreatePayment, CreateRefund, CreateTransfer, ProviderEvent, SendNotification};
use crate::ledger::Ledger;
use crate::webhooks;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::extract::{FromRequest, Request};
use axum::http::{header, request::Parts, HeaderValue, StatusCode};
use axum::response::Html;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use idempotent_axum::enforce::Enforce;
use idempotent_axum::{
    health, idempotent, mint_token, policy_report, record_status, Actor, Fence, Idempotency, Mint, Tx,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use crate::api::MAX_BODY;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    bank: Arc<Bank>,
    deposits: Deposits,
    transfer_delay: Duration,
    openapi: axum::body::Bytes,
    webhook_secret: crate::webhooks::Secret,
    outage: Arc<checkout::Outage>,
    checkout_delay: Duration,
}

fn problem_response(p: DemoProblem) -> Response {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, p.body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE));
    if p.www_authenticate {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if let Some(allow) = p.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Caller::from_authorization(parts.headers.get_all(header::AUTHORIZATION).iter().map(|v| v.as_bytes()))
            .ok_or_else(|| problem_response(DemoProblem::unauthorized()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        problem_response(self.problem())
    }
}

/// `POST /payments`.
#[idempotent(scope = "payments.create", fields = [amount, currency, customer], ttl = "24h")]
pub async fn create_payment(
    Caller(account): Caller,
    State(app): State<AppState>,
    Json(req): Json<CreatePayment>,
) -> Result<impl IntoResponse, ApiError> {
    let payment = done(app.bank.create_payment(&account, req))?;
    let location = format!("/payments/{}", payment.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(payment)))
}

/// `POST /webhooks/provider`: a provider's event, once per `webhook-id` however often it is
/// delivered. Its caller is the provider ([`WebhookSender`]); [`Signed`] verifies the delivery's
/// signature before anything is claimed, so an unsigned request never runs nor stores anything.
#[idempotent(scope = "webhooks.provider", key = header("webhook-id"), ttl = "72h", route = "POST /webhooks/provider")]
pub async fn receive_webhook(
    _: WebhookSender,
    State(app): State<AppState>,
    #[body] Signed(delivery): Signed<ProviderEvent>,
) -> Result<impl IntoResponse, ApiError> {
    let received =
        app.bank.receive_webhook(webhooks::SENDER, &delivery.id, delivery.event).map_err(ApiError::Internal)?;
    Ok(Json(received))
}

/// The caller of a webhook route: the provider, one identity for all its deliveries. Set before
/// the body is read, as the idempotency layer reads the caller then; the body extractor
/// ([`Signed`]) refuses any delivery the provider did not sign, before anything is claimed.
#[derive(Debug, Clone, Copy)]
pub struct WebhookSender;

impl<S: Send + Sync> FromRequestParts<S> for WebhookSender {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.insert(Actor(webhooks::SENDER.to_owned()));
        Ok(WebhookSender)
    }
}

/// A webhook delivery whose signature verifies (Standard Webhooks), with its JSON body: 401
/// problem+json when it does not.
#[derive(Debug)]
pub struct Signed<T>(pub webhooks::Delivery<T>);

impl<T: serde::de::DeserializeOwned> FromRequest<AppState> for Signed<T> {
    type Rejection = Response;

    async fn from_request(request: Request, app: &AppState) -> Result<Self, Response> {
        let (parts, body) = request.into_parts();
        let header =
            |name: &'static str| crate::api::single_header(parts.headers.get_all(name).iter().map(|v| v.as_bytes()));
        let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
            return Err(problem_response(DemoProblem::bad_body(
                413,
                "The delivery is larger than this route accepts.",
            )));
        };
        let delivery = webhooks::Delivery::verify(&app.webhook_secret, header, &body, std::time::SystemTime::now())
            .map_err(|refused| problem_response(DemoProblem::webhook_refused(&refused)))?;
        let event = serde_json::from_slice(&body).map_err(|e| {
            problem_response(DemoProblem::bad_body(422, format!("The event is not one this route takes: {e}")))
        })?;
        Ok(Signed(delivery.with(event)))
    }
}

/// The caller of a checkout route: `Authorization: Bearer <account>`, else the `session` cookie
/// `/login` sets (401 problem+json without either). Set as the request's [`Actor`], so that the
/// idempotency layer and the token minter know the caller however it authenticated.
#[derive(Debug, Clone)]
pub struct CheckoutCaller(pub String);

impl<S: Send + Sync> FromRequestParts<S> for CheckoutCaller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let values = |name| parts.headers.get_all(name).iter().map(|v| v.as_bytes());
        let account = checkout::caller(values(header::AUTHORIZATION), values(header::COOKIE))
            .ok_or_else(|| problem_response(DemoProblem::unauthorized()))?;
        parts.extensions.insert(Actor(account.clone()));
        Ok(CheckoutCaller(account))
    }
}

fn html(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Html(body)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /login?account=ACCT`: the `session` cookie, and 303 to the checkout form.
async fn login(uri: axum::http::Uri) -> Response {
    match checkout::login_account(uri.query().unwrap_or_default()) {
        Some(account) => (
            StatusCode::SEE_OTHER,
            [(header::SET_COOKIE, checkout::session_cookie(&account)), (header::LOCATION, "/checkout".to_owned())],
        )
            .into_response(),
        None => html(
            400,
            checkout::error_page(400, "Login", "Log in with ?account=ACCT: 1 to 64 letters, digits, `_` or `-`."),
        ),
    }
}

/// `GET /checkout`: the form, with a fresh token bound to the caller.
async fn checkout_form(CheckoutCaller(account): CheckoutCaller, mint: Mint) -> Response {
    match mint.token(checkout::SCOPE).await {
        Ok(token) => {
            // Kept in the browser's history (not `no-store`): Back shows this form again, with
            // its token, as users expect of a form they filled in.
            let mut page = html(200, checkout::form_page(&account, &token));
            page.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
            page
        }
        Err(problem) => html(problem.status, checkout::problem_page(&problem)),
    }
}

/// `POST /checkout`: one payment per rendered form, whatever the browser does with it.
#[idempotent(scope = "checkout.create", key = issued(ttl = "15m", from = form("_idem")),
             fields = [amount, currency, customer], on_conflict = "wait", ttl = "24h")]
pub async fn submit_checkout(
    CheckoutCaller(account): CheckoutCaller,
    State(app): State<AppState>,
    Form(form): Form<CheckoutForm>,
) -> Response {
    tokio::time::sleep(app.checkout_delay).await;
    let answer = checkout::submit(&app.bank, &app.outage, &account, form);
    match answer.location {
        Some(location) => (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response(),
        None => html(answer.status, answer.body),
    }
}

/// `GET /checkout/receipt/{id}`: the caller's payment.
async fn receipt(
    CheckoutCaller(account): CheckoutCaller,
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    match app.bank.payment(&account, &id) {
        Some(payment) => html(200, checkout::receipt_page(&payment)),
        None => html(404, checkout::error_page(404, "No such payment", &format!("You have no payment `{id}`."))),
    }
}

/// `POST /_idempotency/tokens`, for the checkout's caller (bearer or cookie).
async fn tokens(_: CheckoutCaller, request: Request) -> Response {
    mint_token(request).await
}

/// `POST /notifications`: no key needed; the request itself is its key for ten minutes, so the
/// same body from the same account within that window is one notification.
#[idempotent(scope = "notifications.send", key = derived, ttl = "10m", route = "POST /notifications")]
pub async fn send_notification(
    Caller(account): Caller,
    State(app): State<AppState>,
    Json(req): Json<SendNotification>,
) -> Result<impl IntoResponse, ApiError> {
    let notification = done(app.bank.send_notification(&account, req))?;
    Ok((StatusCode::CREATED, Json(notification)))
}

/// `POST /payments/{id}/refunds`: the payment must be the caller's and not already refunded in
/// full. An unknown payment (404) and an excessive amount (422) are final outcomes, stored and
/// replayed like a refund.
#[idempotent(scope = "refunds.create", fields = [amount])]
pub async fn create_refund(
    Caller(account): Caller,
    State(app): State<AppState>,
    Path(payment): Path<String>,
    Json(req): Json<CreateRefund>,
) -> Result<impl IntoResponse, ApiError> {
    let refund = done(app.bank.create_refund(&account, &payment, req))?;
    Ok((StatusCode::CREATED, Json(refund)))
}

/// `POST /transfers`: takes the configured processing time.
#[idempotent(scope = "transfers.create", fields = [amount, from, to], ttl = "24h", lease = "3s")]
pub async fn create_transfer(
    Caller(account): Caller,
    State(app): State<AppState>,
    fence: Fence,
    Json(req): Json<CreateTransfer>,
) -> Result<impl IntoResponse, ApiError> {
    tokio::time::sleep(app.transfer_delay).await;
    // Recorded only while no other request can be holding this key (see `Fence`).
    fence.check()?;
    let transfer = done(app.bank.create_transfer(&account, req))?;
    Ok((StatusCode::CREATED, Json(transfer)))
}

/// `POST /quotes`: any JSON object, fingerprinted whole, kept 3 seconds.
#[idempotent(scope = "quotes.create", ttl = "3s", lease = "3s")]
pub async fn create_quote(
    Caller(account): Caller,
    State(app): State<AppState>,
    Json(req): Json<serde_json::Value>,
) -> Result<impl IntoResponse, ApiError> {
    let quote = done(app.bank.create_quote(&account, req))?;
    Ok((StatusCode::CREATED, Json(quote)))
}

/// `POST /deposits`: the deposit, the balance and the idempotency record commit in one
/// transaction of the store's database (501 on a store without SQL).
#[idempotent(scope = "deposits.create", fields = [amount], transactional = true)]
pub async fn create_deposit(
    Caller(account): Caller,
    State(app): State<AppState>,
    tx: Tx,
    Json(req): Json<CreateDeposit>,
) -> Result<impl IntoResponse, ApiError> {
    let deposit = app.deposits.create(&tx, &account, &req).await?;
    Ok((StatusCode::CREATED, Json(deposit)))
}

async fn list_deposits(Caller(account): Caller, State(app): State<AppState>) -> Response {
    match app.deposits.summary(&account).await {
        Ok(Some(summary)) => Json(summary).into_response(),
        Ok(None) => problem_response(DemoProblem::deposits_unsupported()),
        Err(e) => e.into_response(),
    }
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
        None => problem_response(DemoProblem::payment_not_found(&id)),
    }
}

async fn list_refunds(Caller(account): Caller, State(app): State<AppState>, Path(id): Path<String>) -> Response {
    match app.bank.refunds(&account, &id) {
        Some(refunds) => Json(refunds).into_response(),
        None => problem_response(DemoProblem::payment_not_found(&id)),
    }
}

/// `GET /metrics`, without authentication: the Prometheus exposition (see [`crate::metrics`]).
async fn metrics() -> Response {
    let (status, content_type, body) = crate::metrics::exposition();
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// `GET /openapi.json`, without authentication (see [`crate::openapi`]).
async fn openapi(State(app): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, crate::openapi::CONTENT_TYPE)], app.openapi).into_response()
}

/// The payment routes, served both at the root and under `/v1`.
fn payment_routes() -> Router<AppState> {
    Router::new()
        .route("/payments", post(create_payment).get(list_payments))
        .route("/payments/{id}", get(get_payment))
        .route("/payments/{id}/refunds", post(create_refund).get(list_refunds))
}

/// Builds the application: opens the store and the ledger, validates the policies.
pub async fn app(config: &Config) -> Result<Router, String> {
    open(config).await.map(|(router, _)| router)
}

async fn open(config: &Config) -> Result<(Router, Idempotency), String> {
    let (ledger, entries) = Ledger::open(&config.ledger)?;
    let store = config.open_store().await?;
    let deposits = Deposits::open(&config.store).await?;
    build(config, store, deposits, ledger, entries)
}

/// Builds the application on an already opened store and ledger (the deposits' tables go in the
/// database `config.store` names).
pub async fn app_with_store(
    config: &Config,
    store: Arc<dyn idempotent_axum::core::store::Store>,
    ledger: Ledger,
    entries: Vec<crate::ledger::Entry>,
) -> Result<Router, String> {
    let deposits = Deposits::open(&config.store).await?;
    build(config, store, deposits, ledger, entries).map(|(router, _)| router)
}

/// The application and its idempotency runtime (which a graceful shutdown drains).
fn build(
    config: &Config,
    store: Arc<dyn idempotent_axum::core::store::Store>,
    deposits: Deposits,
    ledger: Ledger,
    entries: Vec<crate::ledger::Entry>,
) -> Result<(Router, Idempotency), String> {
    let idempotency =
        crate::api::idempotency_settings(Idempotency::builder(store), config).build().map_err(|e| e.to_string())?;
    let document = crate::openapi::render(|document| idempotency.document_openapi(document))?;
    let state = AppState {
        bank: Arc::new(Bank::new(ledger, entries)),
        deposits,
        transfer_delay: config.transfer_delay,
        openapi: document.into(),
        webhook_secret: config.webhook_secret.clone(),
        outage: Arc::new(checkout::Outage::new(config.checkout_failures)),
        checkout_delay: config.checkout_delay,
    };
    let payments = payment_routes();
    let router = Router::new()
        .merge(payments.clone())
        .nest("/v1", payments)
        .route("/transfers", post(create_transfer).get(list_transfers))
        .route("/quotes", post(create_quote))
        .route("/deposits", post(create_deposit).get(list_deposits))
        .route("/_idempotency/policies", get(|_: Caller, uri: axum::http::Uri| policy_report(uri)))
        .route("/_idempotency/records/{scope}/{key}", get(record_status))
        .route("/healthz", get(health))
        .route("/webhooks/provider", post(receive_webhook))
        .route("/notifications", post(send_notification))
        .route("/login", get(login))
        .route("/checkout", get(checkout_form).post(submit_checkout))
        .route("/checkout/receipt/{id}", get(receipt))
        .route("/_idempotency/tokens", post(tokens))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        // Errors of the router itself are problems too; axum adds `Allow` to the 405.
        .fallback(|uri: axum::http::Uri| async move { problem_response(DemoProblem::no_route(uri.path())) })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            problem_response(DemoProblem::method_not_allowed(method.as_str(), uri.path(), None))
        })
        // A payments API would rather fail a request than run a mutating route that can charge
        // twice: a POST or PATCH route added without #[idempotent] answers 500 until it has one.
        .layer(Enforce::refuse())
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(idempotency.layer())
        .with_state(state);
    Ok((router, idempotency))
}

/// Binds `config.addr` and returns the bound address and the server's task, which runs until the
/// task is dropped.
pub async fn start(config: &Config) -> Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>), String> {
    start_until(config, std::future::pending()).await
}

/// Like [`start`], until `shutdown` resolves: the server then stops accepting connections, lets
/// the requests in flight finish (those whose client went away included) and store their
/// outcomes, for at most [`SHUTDOWN_GRACE`], and the task ends.
pub async fn start_until(
    config: &Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>), String> {
    let (router, idempotency) = open(config).await?;
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let task = tokio::spawn(async move {
        let stopping = Arc::new(tokio::sync::Notify::new());
        let signalled = stopping.clone();
        let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
            shutdown.await;
            signalled.notify_one();
        });
        let finished = async {
            serve.await?;
            // Requests whose client went away are held by no connection: wait for them too.
            idempotency.drain(SHUTDOWN_GRACE).await;
            Ok(())
        };
        let grace = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            finished = finished => finished,
            () = grace => {
                eprintln!("shutdown: requests still running after {SHUTDOWN_GRACE:?}; exiting");
                Ok(())
            }
        }
    });
    Ok((addr, task))
}
