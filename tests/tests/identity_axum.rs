//! The request-identity conformance suite against an axum fixture app on a loopback port.

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, Request};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Form, Json, Router};
use idempotent_axum::core::store::MemoryStore;
use idempotent_axum::enforce::Enforce;
use idempotent_axum::{idempotent, Actor, ActorSource, Idempotency};
use idempotent_tests::identity::{Counter, Counters, Fixture};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

type Count = Extension<Arc<Counters>>;
type Created = (StatusCode, String);

#[derive(Debug, Deserialize)]
struct Pair {
    a: String,
    b: String,
}

#[derive(Debug, Deserialize, Serialize)]
struct Tags {
    tags: HashSet<String>,
    note: String,
}

#[idempotent(scope = "identity.cancel")]
async fn cancel(Extension(count): Count, Path(_id): Path<u64>) -> Created {
    (StatusCode::CREATED, count.hit(Counter::Cancel))
}

#[idempotent(scope = "identity.search")]
async fn search(Extension(count): Count, RawQuery(_query): RawQuery) -> Created {
    (StatusCode::CREATED, count.hit(Counter::Search))
}

#[idempotent(scope = "identity.paged", fields = [query(page)])]
async fn paged(Extension(count): Count, Query(_query): Query<HashMap<String, String>>) -> Created {
    (StatusCode::CREATED, count.hit(Counter::Paged))
}

#[idempotent(scope = "identity.forms")]
async fn forms(Extension(count): Count, Form(pair): Form<Pair>) -> Created {
    let _ = (pair.a, pair.b);
    (StatusCode::CREATED, count.hit(Counter::Forms))
}

#[idempotent(scope = "identity.bytes")]
async fn upload(Extension(count): Count, _body: Bytes) -> Created {
    (StatusCode::CREATED, count.hit(Counter::Bytes))
}

#[idempotent(scope = "identity.json")]
async fn amounts(Extension(count): Count, Json(_body): Json<Value>) -> Created {
    (StatusCode::CREATED, count.hit(Counter::Json))
}

#[idempotent(scope = "identity.tags", fields = [tags])]
async fn tag(Extension(count): Count, Json(_tags): Json<Tags>) -> Created {
    (StatusCode::CREATED, count.hit(Counter::Tags))
}

#[idempotent(scope = "identity.actor")]
async fn whoami(Extension(count): Count, Json(_body): Json<Value>) -> Created {
    (StatusCode::CREATED, count.hit(Counter::Actor))
}

/// Declares `POST /stale` but is mounted at `/elsewhere`.
#[idempotent(scope = "identity.stale", route = "POST /stale")]
async fn elsewhere(Extension(count): Count, Json(_body): Json<Value>) -> Created {
    (StatusCode::CREATED, count.hit(Counter::Elsewhere))
}

/// Mounted at `/stale`, with no idempotency policy.
async fn stale(Extension(count): Count, Json(_body): Json<Value>) -> Created {
    (StatusCode::CREATED, count.hit(Counter::Stale))
}

/// Authentication: `X-User` stands in for the subject of a verified token.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let user = request.headers().get("x-user").and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(user) = user {
        request.extensions_mut().insert(Actor(user));
    }
    next.run(request).await
}

async fn start_axum() -> Fixture {
    let counters = Arc::new(Counters::default());
    let idempotency = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(ActorSource::BearerToken)
        .build()
        .expect("valid registry");
    let orders = Router::new().route("/orders/{id}/cancel", post(cancel));
    let router = Router::new()
        .merge(orders.clone())
        .nest("/v1", orders)
        .route("/search", post(search))
        .route("/paged", post(paged))
        .route("/forms", post(forms))
        .route("/bytes", post(upload))
        .route("/json", post(amounts))
        .route("/tags", post(tag))
        .route("/whoami", post(whoami))
        .route("/elsewhere", post(elsewhere))
        .route("/stale", post(stale))
        .layer(Enforce::refuse())
        .layer(middleware::from_fn(authenticate))
        .layer(Extension(counters.clone()))
        .layer(idempotency.layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    Fixture::new(addr, counters)
}

idempotent_tests::identity_conformance_tests!(start_axum());
