//! The issued-token conformance suite against an axum fixture app, on the SQLite, PostgreSQL and
//! Redis stores, over loopback ports.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use idempotent_axum::{idempotent, mint_token, ActorSource, Idempotency, Mint};
use idempotent_tests::issued::{problem_page, Flags, Opener, Server, FORM_SCOPE, QUOTA, SECRET};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize, Serialize)]
struct Checkout {
    amount: i64,
}

type Flagged = State<Arc<Flags>>;

async fn checkout_run(flags: &Flags) -> Response {
    match flags.run().await {
        Ok(n) => (StatusCode::SEE_OTHER, [(header::LOCATION, format!("/receipt/{n}"))]).into_response(),
        Err(status) => StatusCode::from_u16(status).unwrap_or_default().into_response(),
    }
}

#[idempotent(scope = "tokens.checkout", key = issued(ttl = "15m", from = form("_idem")), fields = [amount],
             on_conflict = "wait", lease = "3s", ttl = "1h")]
async fn checkout(State(flags): Flagged, Form(_c): Form<Checkout>) -> Response {
    checkout_run(&flags).await
}

#[idempotent(scope = "tokens.reject", key = issued(ttl = "15m", from = form("_idem")), fields = [amount],
             lease = "3s", ttl = "1h")]
async fn checkout_reject(State(flags): Flagged, Form(_c): Form<Checkout>) -> Response {
    checkout_run(&flags).await
}

#[idempotent(scope = "tokens.header", key = issued(from = header("x-form-token")), lease = "3s")]
async fn by_header(State(flags): Flagged, Form(_c): Form<Checkout>) -> Response {
    match flags.run().await {
        Ok(n) => (StatusCode::CREATED, format!("run {n}")).into_response(),
        Err(status) => StatusCode::from_u16(status).unwrap_or_default().into_response(),
    }
}

async fn form(mint: Mint) -> Response {
    match mint.token(FORM_SCOPE).await {
        Ok(token) => token.token.into_response(),
        Err(problem) => idempotent_axum::render_problem(&problem),
    }
}

async fn start(open: Opener, flags: Arc<Flags>) -> Server {
    let (ready, addr) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let state = flags.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async move {
            let idempotency = Idempotency::builder(open().await)
                .actor(ActorSource::BearerToken)
                .token_secret(SECRET)
                .token_quota(QUOTA)
                .store_timeout(Duration::from_millis(400))
                .problem_page(problem_page)
                // The demo's routes may be linked in: its deposits need SQL.
                .without_transactions(idempotent_axum::core::engine::WithoutTransactions::NotImplemented)
                .build()
                .expect("valid registry");
            let app = Router::new()
                .route("/form", get(form))
                .route("/checkout", post(checkout))
                .route("/checkout-reject", post(checkout_reject))
                .route("/by-header", post(by_header))
                .route("/_idempotency/tokens", post(mint_token))
                .layer(idempotency.layer())
                .with_state(state);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let _ = ready.send(listener.local_addr().unwrap());
            tokio::select! {
                _ = axum::serve(listener, app) => {}
                _ = stopped => {}
            }
        });
        // Dropping the runtime drops every task on it: in-flight handlers and lease renewals.
        runtime.shutdown_background();
    });
    let addr = addr.await.expect("server thread");
    Server::new(
        addr,
        flags,
        Box::new(move || {
            let _ = stop.send(());
        }),
    )
}

idempotent_tests::issued_conformance_tests!(start);
