//! The demo on actix-web: routes, authentication and error responses.
//!
//! Only the framework glue lives here; the domain, the ledger, the caller's identity and the
//! error bodies are shared with the axum binary.

use crate::api::{done, ApiError, Caller, DemoProblem, MAX_BODY, PROBLEM_CONTENT_TYPE};
use crate::checkout::{self, CheckoutForm};
use crate::cli::SHUTDOWN_GRACE;
use crate::config::Config;
use crate::deposits::{CreateDeposit, Deposits};
use crate::domain::{Bank, CreatePayment, CreateRefund, CreateTransfer, ProviderEvent, SendNotification};
use crate::ledger::Ledger;
use crate::webhooks;
use actix_web::dev::{Payload, Server};
use actix_web::error::{InternalError, JsonPayloadError};
use actix_web::http::{header, StatusCode};
use actix_web::{get, post, web, App, FromRequest, HttpMessage, HttpRequest, HttpResponse, HttpServer, ResponseError};
use idempotent_actix::{
    health, idempotent, mint_token, policy_report, record_status, Actor, Fence, Idempotency, Mint, Tx,
};
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    bank: Arc<Bank>,
    deposits: Deposits,
    transfer_delay: Duration,
    openapi: web::Bytes,
    webhook_secret: crate::webhooks::Secret,
    outage: Arc<checkout::Outage>,
    checkout_delay: Duration,
}

fn problem_response(p: DemoProblem) -> HttpResponse {
    let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status);
    response.insert_header((header::CONTENT_TYPE, PROBLEM_CONTENT_TYPE));
    if p.www_authenticate {
        response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
    }
    if let Some(allow) = p.allow {
        response.insert_header((header::ALLOW, allow));
    }
    response.body(p.body)
}

impl FromRequest for Caller {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let caller = Caller::from_authorization(req.headers().get_all(header::AUTHORIZATION).map(|v| v.as_bytes()));
        ready(caller.ok_or_else(|| {
            InternalError::from_response("authentication required", problem_response(DemoProblem::unauthorized()))
                .into()
        }))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        problem_response(self.problem())
    }
}

/// `POST /payments`.
#[idempotent(scope = "payments.create", fields = [amount, currency, customer], ttl = "24h")]
#[post("/payments")]
pub async fn create_payment(
    Caller(account): Caller,
    app: web::Data<AppState>,
    web::Json(req): web::Json<CreatePayment>,
) -> Result<HttpResponse, ApiError> {
    let payment = done(app.bank.create_payment(&account, req))?;
    let location = format!("/payments/{}", payment.id);
    Ok(HttpResponse::Created().insert_header((header::LOCATION, location)).json(payment))
}

/// The caller of a checkout route: `Authorization: Bearer <account>`, else the `session` cookie
/// `/login` sets (401 problem+json without either). Set as the request's [`Actor`], so that the
/// idempotency layer and the token minter know the caller however it authenticated.
#[derive(Debug, Clone)]
pub struct CheckoutCaller(pub String);

impl FromRequest for CheckoutCaller {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let values = |name| req.headers().get_all(name).map(|v| v.as_bytes());
        let Some(account) = checkout::caller(values(header::AUTHORIZATION), values(header::COOKIE)) else {
            let response = problem_response(DemoProblem::unauthorized());
            return ready(Err(InternalError::from_response("authentication required", response).into()));
        };
        req.extensions_mut().insert(Actor(account.clone()));
        ready(Ok(CheckoutCaller(account)))
    }
}

fn html(status: u16, body: String) -> HttpResponse {
    HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body)
}

/// `GET /login?account=ACCT`: the `session` cookie, and 303 to the checkout form.
#[get("/login")]
async fn login(request: HttpRequest) -> HttpResponse {
    match checkout::login_account(request.query_string()) {
        Some(account) => HttpResponse::SeeOther()
            .insert_header((header::SET_COOKIE, checkout::session_cookie(&account)))
            .insert_header((header::LOCATION, "/checkout"))
            .finish(),
        None => html(
            400,
            checkout::error_page(400, "Login", "Log in with ?account=ACCT: 1 to 64 letters, digits, `_` or `-`."),
        ),
    }
}

/// `GET /checkout`: the form, with a fresh token bound to the caller.
#[get("/checkout")]
async fn checkout_form(CheckoutCaller(account): CheckoutCaller, mint: Mint) -> HttpResponse {
    match mint.token(checkout::SCOPE).await {
        // Kept in the browser's history (not `no-store`): Back shows this form again, with its
        // token, as users expect of a form they filled in.
        Ok(token) => HttpResponse::Ok()
            .insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
            .insert_header((header::CACHE_CONTROL, "private"))
            .body(checkout::form_page(&account, &token)),
        Err(problem) => html(problem.status, checkout::problem_page(&problem)),
    }
}

/// `POST /checkout`: one payment per rendered form, whatever the browser does with it.
#[idempotent(scope = "checkout.create", key = issued(ttl = "15m", from = form("_idem")),
             fields = [amount, currency, customer], on_conflict = "wait", ttl = "24h")]
#[post("/checkout")]
pub async fn submit_checkout(
    CheckoutCaller(account): CheckoutCaller,
    app: web::Data<AppState>,
    web::Form(form): web::Form<CheckoutForm>,
) -> HttpResponse {
    actix_web::rt::time::sleep(app.checkout_delay).await;
    let answer = checkout::submit(&app.bank, &app.outage, &account, form);
    match answer.location {
        Some(location) => HttpResponse::SeeOther().insert_header((header::LOCATION, location)).finish(),
        None => html(answer.status, answer.body),
    }
}

/// `GET /checkout/receipt/{id}`: the caller's payment.
#[get("/checkout/receipt/{id}")]
async fn receipt(
    CheckoutCaller(account): CheckoutCaller,
    app: web::Data<AppState>,
    id: web::Path<String>,
) -> HttpResponse {
    match app.bank.payment(&account, &id) {
        Some(payment) => html(200, checkout::receipt_page(&payment)),
        None => html(404, checkout::error_page(404, "No such payment", &format!("You have no payment `{id}`."))),
    }
}

/// `POST /_idempotency/tokens`, for the checkout's caller (bearer or cookie).
async fn tokens(_: CheckoutCaller, request: HttpRequest, body: web::Payload) -> HttpResponse {
    mint_token(request, body).await
}

/// `POST /payments/{id}/refunds`: the payment must be the caller's and not already refunded in
/// full. An unknown payment (404) and an excessive amount (422) are final outcomes, stored and
/// replayed like a refund.
#[idempotent(scope = "refunds.create", fields = [amount])]
#[post("/payments/{id}/refunds")]
pub async fn create_refund(
    Caller(account): Caller,
    app: web::Data<AppState>,
    payment: web::Path<String>,
    web::Json(req): web::Json<CreateRefund>,
) -> Result<HttpResponse, ApiError> {
    let refund = done(app.bank.create_refund(&account, &payment, req))?;
    Ok(HttpResponse::Created().json(refund))
}

/// `POST /transfers`: takes the configured processing time.
#[idempotent(scope = "transfers.create", fields = [amount, from, to], ttl = "24h", lease = "3s")]
#[post("/transfers")]
pub async fn create_transfer(
    Caller(account): Caller,
    app: web::Data<AppState>,
    fence: Fence,
    web::Json(req): web::Json<CreateTransfer>,
) -> Result<HttpResponse, ApiError> {
    actix_web::rt::time::sleep(app.transfer_delay).await;
    // Recorded only while no other request can be holding this key (see `Fence`).
    fence.check()?;
    let transfer = done(app.bank.create_transfer(&account, req))?;
    Ok(HttpResponse::Created().json(transfer))
}

/// `POST /webhooks/provider`: a provider's event, once per `webhook-id` however often it is
/// delivered. Its caller is the provider ([`WebhookSender`]); [`Signed`] verifies the delivery's
/// signature before anything is claimed, so an unsigned request never runs nor stores anything.
#[idempotent(scope = "webhooks.provider", key = header("webhook-id"), ttl = "72h")]
#[post("/webhooks/provider")]
pub async fn receive_webhook(
    _: WebhookSender,
    app: web::Data<AppState>,
    #[body] Signed(delivery): Signed<ProviderEvent>,
) -> Result<HttpResponse, ApiError> {
    let received =
        app.bank.receive_webhook(webhooks::SENDER, &delivery.id, delivery.event).map_err(ApiError::Internal)?;
    Ok(HttpResponse::Ok().json(received))
}

/// The caller of a webhook route: the provider, one identity for all its deliveries. Set before
/// the body is read, as the idempotency layer reads the caller then; the body extractor
/// ([`Signed`]) refuses any delivery the provider did not sign, before anything is claimed.
#[derive(Debug, Clone, Copy)]
pub struct WebhookSender;

impl FromRequest for WebhookSender {
    type Error = std::convert::Infallible;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        req.extensions_mut().insert(Actor(webhooks::SENDER.to_owned()));
        ready(Ok(WebhookSender))
    }
}

/// A webhook delivery whose signature verifies (Standard Webhooks), with its JSON body: 401
/// problem+json when it does not.
#[derive(Debug)]
pub struct Signed<T>(pub webhooks::Delivery<T>);

impl<T: serde::de::DeserializeOwned + 'static> FromRequest for Signed<T> {
    type Error = actix_web::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self, actix_web::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let (req, body) = (req.clone(), web::Bytes::from_request(req, payload));
        Box::pin(async move {
            let body = body.await?;
            let secret = req.app_data::<web::Data<AppState>>().map(|app| app.webhook_secret.clone());
            let header =
                |name: &'static str| crate::api::single_header(req.headers().get_all(name).map(|v| v.as_bytes()));
            let refuse = |refused: webhooks::Refused| {
                let response = problem_response(DemoProblem::webhook_refused(&refused));
                actix_web::Error::from(InternalError::from_response(refused, response))
            };
            let secret = secret.ok_or_else(|| refuse(webhooks::Refused::BadSignature))?;
            let delivery =
                webhooks::Delivery::verify(&secret, header, &body, std::time::SystemTime::now()).map_err(refuse)?;
            let event = serde_json::from_slice(&body).map_err(|e| {
                let detail = format!("The event is not one this route takes: {e}");
                actix_web::Error::from(InternalError::from_response(
                    e,
                    problem_response(DemoProblem::bad_body(422, detail)),
                ))
            })?;
            Ok(Signed(delivery.with(event)))
        })
    }
}

/// `POST /notifications`: no key needed; the request itself is its key for ten minutes, so the
/// same body from the same account within that window is one notification.
#[idempotent(scope = "notifications.send", key = derived, ttl = "10m")]
#[post("/notifications")]
pub async fn send_notification(
    Caller(account): Caller,
    app: web::Data<AppState>,
    web::Json(req): web::Json<SendNotification>,
) -> Result<HttpResponse, ApiError> {
    let notification = done(app.bank.send_notification(&account, req))?;
    Ok(HttpResponse::Created().json(notification))
}

/// `POST /quotes`: any JSON object, fingerprinted whole, kept 3 seconds.
#[idempotent(scope = "quotes.create", ttl = "3s", lease = "3s")]
#[post("/quotes")]
pub async fn create_quote(
    Caller(account): Caller,
    app: web::Data<AppState>,
    web::Json(req): web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let quote = done(app.bank.create_quote(&account, req))?;
    Ok(HttpResponse::Created().json(quote))
}

#[get("/payments")]
async fn list_payments(Caller(account): Caller, app: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(app.bank.list(&account, "payment"))
}

/// `POST /deposits`: the deposit, the balance and the idempotency record commit in one
/// transaction of the store's database (501 on a store without SQL).
#[idempotent(scope = "deposits.create", fields = [amount], transactional = true)]
#[post("/deposits")]
pub async fn create_deposit(
    Caller(account): Caller,
    app: web::Data<AppState>,
    tx: Tx,
    web::Json(req): web::Json<CreateDeposit>,
) -> Result<HttpResponse, ApiError> {
    let deposit = app.deposits.create(&tx, &account, &req).await?;
    Ok(HttpResponse::Created().json(deposit))
}

#[get("/deposits")]
async fn list_deposits(Caller(account): Caller, app: web::Data<AppState>) -> HttpResponse {
    match app.deposits.summary(&account).await {
        Ok(Some(summary)) => HttpResponse::Ok().json(summary),
        Ok(None) => problem_response(DemoProblem::deposits_unsupported()),
        Err(e) => e.error_response(),
    }
}

#[get("/transfers")]
async fn list_transfers(Caller(account): Caller, app: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(app.bank.list(&account, "transfer"))
}

#[get("/payments/{id}")]
async fn get_payment(Caller(account): Caller, app: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    match app.bank.payment(&account, &id) {
        Some(p) => HttpResponse::Ok().json(p),
        None => problem_response(DemoProblem::payment_not_found(&id)),
    }
}

#[get("/payments/{id}/refunds")]
async fn list_refunds(Caller(account): Caller, app: web::Data<AppState>, id: web::Path<String>) -> HttpResponse {
    match app.bank.refunds(&account, &id) {
        Some(refunds) => HttpResponse::Ok().json(refunds),
        None => problem_response(DemoProblem::payment_not_found(&id)),
    }
}

/// `GET /metrics`, without authentication: the Prometheus exposition (see [`crate::metrics`]).
#[get("/metrics")]
async fn metrics() -> HttpResponse {
    let (status, content_type, body) = crate::metrics::exposition();
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status).insert_header((header::CONTENT_TYPE, content_type)).body(body)
}

/// `GET /openapi.json`, without authentication (see [`crate::openapi`]).
#[get("/openapi.json")]
async fn openapi(app: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().insert_header((header::CONTENT_TYPE, crate::openapi::CONTENT_TYPE)).body(app.openapi.clone())
}

/// The payment routes, served both at the root and under `/v1`.
fn payment_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(create_payment)
        .service(list_payments)
        .service(get_payment)
        .service(create_refund)
        .service(list_refunds);
}

/// A JSON body that is too large (413), not declared `application/json` (415), not JSON (400) or
/// JSON of another shape (422) is rejected before the idempotency layer runs, as a problem+json,
/// with the statuses of the axum binary.
fn json_config() -> web::JsonConfig {
    web::JsonConfig::default().limit(MAX_BODY).error_handler(|err, _req| {
        let status = match &err {
            JsonPayloadError::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            JsonPayloadError::Deserialize(e) if e.is_data() => StatusCode::UNPROCESSABLE_ENTITY,
            other => other.status_code(),
        };
        let response = problem_response(DemoProblem::bad_body(status.as_u16(), err.to_string()));
        InternalError::from_response(err, response).into()
    })
}

/// Everything the application needs, opened once: the idempotency runtime (store connected,
/// policies validated) and the handlers' state.
#[derive(Debug, Clone)]
pub struct Prepared {
    idempotency: Idempotency,
    state: web::Data<AppState>,
}

/// Opens the ledger and the store and validates the policies.
pub async fn prepare(config: &Config) -> Result<Prepared, String> {
    let (ledger, entries) = Ledger::open(&config.ledger)?;
    let store = config.open_store().await?;
    let deposits = Deposits::open(&config.store).await?;
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
    Ok(Prepared { idempotency, state: web::Data::new(state) })
}

/// Installs the application's data and routes: `App::new().configure(|c| configure(c, &prepared))`.
pub fn configure(cfg: &mut web::ServiceConfig, prepared: &Prepared) {
    cfg.app_data(prepared.idempotency.data())
        .app_data(prepared.state.clone())
        .app_data(json_config())
        .configure(payment_routes)
        .service(web::scope("/v1").configure(payment_routes))
        .service(create_transfer)
        .service(list_transfers)
        .service(create_quote)
        .service(receive_webhook)
        .service(send_notification)
        .service(create_deposit)
        .service(list_deposits)
        .route("/_idempotency/policies", web::get().to(|_: Caller, request: HttpRequest| policy_report(request)))
        .route("/_idempotency/records/{scope}/{key}", web::get().to(record_status))
        .route("/healthz", web::get().to(health))
        .service(login)
        .service(checkout_form)
        .service(submit_checkout)
        .service(receipt)
        .route("/_idempotency/tokens", web::post().to(tokens))
        .service(metrics)
        .service(openapi)
        // A request no route takes: 405 with `Allow` where the path is served, else 404, both
        // problems (actix-web itself answers 404 to both, without a body).
        .default_service(web::to(|request: HttpRequest| async move {
            problem_response(DemoProblem::unrouted(request.method().as_str(), request.path()))
        }));
}

/// Binds `config.addr` and returns the bound address and the running server (it runs on the
/// current actix system until stopped).
pub async fn start(config: &Config) -> Result<(SocketAddr, Server), String> {
    start_until(config, std::future::pending()).await
}

/// Like [`start`], until `shutdown` resolves: the server then stops accepting connections, lets
/// the requests in flight finish (those whose client went away included) and store their
/// outcomes, for at most [`SHUTDOWN_GRACE`], and stops.
///
/// actix-web's own signal handling is turned off: on a signal it stops its workers once their
/// connections are closed, which cancels the handlers whose client already went away (they run on
/// the workers' tasks, held by no connection).
pub async fn start_until(
    config: &Config,
    shutdown: impl std::future::Future<Output = ()> + 'static,
) -> Result<(SocketAddr, Server), String> {
    let prepared = prepare(config).await?;
    let idempotency = prepared.idempotency.clone();
    let server = HttpServer::new(move || {
        let prepared = prepared.clone();
        // A mutating route without a policy is refused rather than served unprotected.
        App::new().wrap(idempotent_actix::enforce::Enforce::refuse()).configure(move |c| configure(c, &prepared))
    })
    .disable_signals()
    .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
    .bind(config.addr)
    .map_err(|e| format!("cannot listen on {}: {e}", config.addr))?;
    let addr = *server.addrs().first().ok_or_else(|| format!("cannot listen on {}", config.addr))?;
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        shutdown.await;
        handle.pause().await;
        if !idempotency.drain(SHUTDOWN_GRACE).await {
            eprintln!("shutdown: requests still running after {SHUTDOWN_GRACE:?}; exiting");
        }
        handle.stop(true).await;
    });
    Ok((addr, server))
}
