//! The issued-token conformance suite against an actix-web fixture app, on the SQLite, PostgreSQL
//! and Redis stores, over loopback ports.

use actix_web::http::{header, StatusCode};
use actix_web::{web, App, HttpResponse, HttpServer};
use idempotent_actix::{idempotent, mint_token, ActorSource, Idempotency, Mint};
use idempotent_tests::issued::{problem_page, Flags, Opener, Server, FORM_SCOPE, QUOTA, SECRET};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize, Serialize)]
struct Checkout {
    amount: i64,
}

type Flagged = web::Data<Flags>;

async fn checkout_run(flags: &Flags) -> HttpResponse {
    match flags.run().await {
        Ok(n) => HttpResponse::SeeOther().insert_header((header::LOCATION, format!("/receipt/{n}"))).finish(),
        Err(status) => HttpResponse::new(StatusCode::from_u16(status).unwrap_or_default()),
    }
}

#[idempotent(scope = "tokens.checkout", key = issued(ttl = "15m", from = form("_idem")), fields = [amount],
             on_conflict = "wait", lease = "3s", ttl = "1h")]
async fn checkout(flags: Flagged, _c: web::Form<Checkout>) -> HttpResponse {
    checkout_run(&flags).await
}

#[idempotent(scope = "tokens.reject", key = issued(ttl = "15m", from = form("_idem")), fields = [amount],
             lease = "3s", ttl = "1h")]
async fn checkout_reject(flags: Flagged, _c: web::Form<Checkout>) -> HttpResponse {
    checkout_run(&flags).await
}

#[idempotent(scope = "tokens.header", key = issued(from = header("x-form-token")), lease = "3s")]
async fn by_header(flags: Flagged, _c: web::Form<Checkout>) -> HttpResponse {
    match flags.run().await {
        Ok(n) => HttpResponse::Created().body(format!("run {n}")),
        Err(status) => HttpResponse::new(StatusCode::from_u16(status).unwrap_or_default()),
    }
}

async fn form(mint: Mint) -> HttpResponse {
    match mint.token(FORM_SCOPE).await {
        Ok(token) => HttpResponse::Ok().body(token.token),
        Err(problem) => idempotent_actix::render_problem(&problem),
    }
}

async fn start(open: Opener, flags: Arc<Flags>) -> Server {
    let (ready, addr) = tokio::sync::oneshot::channel();
    let data = web::Data::from(flags.clone());
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let idempotency = Idempotency::builder(open().await)
                .actor(ActorSource::BearerToken)
                .token_secret(SECRET)
                .token_quota(QUOTA)
                .store_timeout(Duration::from_millis(400))
                .problem_page(problem_page)
                // The demo's routes may be linked in: its deposits need SQL.
                .without_transactions(idempotent_actix::core::engine::WithoutTransactions::NotImplemented)
                .build()
                .expect("valid registry");
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(idempotency.data())
                    .app_data(data.clone())
                    .route("/form", web::get().to(form))
                    .route("/checkout", web::post().to(checkout))
                    .route("/checkout-reject", web::post().to(checkout_reject))
                    .route("/by-header", web::post().to(by_header))
                    .route("/_idempotency/tokens", web::post().to(mint_token))
            })
            .workers(1)
            .disable_signals()
            .bind("127.0.0.1:0")
            .expect("bind a loopback port");
            let _ = ready.send((server.addrs()[0], actix_web::rt::System::current()));
            let _ = server.run().await;
        })
    });
    let (addr, system) = addr.await.expect("server thread");
    // Stopping the system stops its arbiters at once: their tasks (handlers, lease renewals) are
    // dropped, as in a crash.
    Server::new(addr, flags, Box::new(move || system.stop()))
}

idempotent_tests::issued_conformance_tests!(start);
