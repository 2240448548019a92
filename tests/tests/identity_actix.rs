//! The request-identity conformance suite against an actix-web fixture app on a loopback port.
//!
//! actix-web's server runs on its own system (a thread with a local task set), so it is started
//! on a dedicated thread that hands back the bound address.

use actix_web::dev::Service;
use actix_web::{web, App, HttpMessage, HttpRequest, HttpResponse, HttpServer};
use idempotent_actix::core::store::MemoryStore;
use idempotent_actix::enforce::Enforce;
use idempotent_actix::{idempotent, Actor, ActorSource, Idempotency};
use idempotent_tests::identity::{Counter, Counters, Fixture};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

type Count = web::Data<Counters>;

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

fn created(count: &Counters, counter: Counter) -> HttpResponse {
    HttpResponse::Created().body(count.hit(counter))
}

#[idempotent(scope = "identity.cancel")]
async fn cancel(count: Count, _id: web::Path<u64>) -> HttpResponse {
    created(&count, Counter::Cancel)
}

#[idempotent(scope = "identity.search")]
async fn search(count: Count, request: HttpRequest) -> HttpResponse {
    let _query = request.query_string();
    created(&count, Counter::Search)
}

#[idempotent(scope = "identity.paged", fields = [query(page)])]
async fn paged(count: Count, _query: web::Query<HashMap<String, String>>) -> HttpResponse {
    created(&count, Counter::Paged)
}

#[idempotent(scope = "identity.forms")]
async fn forms(count: Count, pair: web::Form<Pair>) -> HttpResponse {
    let Pair { a, b } = pair.into_inner();
    let _ = (a, b);
    created(&count, Counter::Forms)
}

#[idempotent(scope = "identity.bytes")]
async fn upload(count: Count, _body: web::Bytes) -> HttpResponse {
    created(&count, Counter::Bytes)
}

#[idempotent(scope = "identity.json")]
async fn amounts(count: Count, _body: web::Json<Value>) -> HttpResponse {
    created(&count, Counter::Json)
}

#[idempotent(scope = "identity.tags", fields = [tags])]
async fn tag(count: Count, _tags: web::Json<Tags>) -> HttpResponse {
    created(&count, Counter::Tags)
}

#[idempotent(scope = "identity.actor")]
async fn whoami(count: Count, _body: web::Json<Value>) -> HttpResponse {
    created(&count, Counter::Actor)
}

/// Declares `POST /stale` but is mounted at `/elsewhere`.
#[idempotent(scope = "identity.stale", route = "POST /stale")]
async fn elsewhere(count: Count, _body: web::Json<Value>) -> HttpResponse {
    created(&count, Counter::Elsewhere)
}

/// Mounted at `/stale`, with no idempotency policy.
async fn stale(count: Count, _body: web::Json<Value>) -> HttpResponse {
    created(&count, Counter::Stale)
}

async fn start_actix() -> Fixture {
    let counters = Arc::new(Counters::default());
    let idempotency = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(ActorSource::BearerToken)
        .build()
        .expect("valid registry");
    let enforce = Enforce::refuse();
    let data = web::Data::from(counters.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                App::new()
                    .wrap(enforce.clone())
                    // Authentication: `X-User` stands in for the subject of a verified token.
                    .wrap_fn(|request, service| {
                        let user = request.headers().get("x-user").and_then(|v| v.to_str().ok()).map(str::to_owned);
                        if let Some(user) = user {
                            request.extensions_mut().insert(Actor(user));
                        }
                        service.call(request)
                    })
                    .app_data(idempotency.data())
                    .app_data(data.clone())
                    .route("/orders/{id}/cancel", web::post().to(cancel))
                    .service(web::scope("/v1").route("/orders/{id}/cancel", web::post().to(cancel)))
                    .route("/search", web::post().to(search))
                    .route("/paged", web::post().to(paged))
                    .route("/forms", web::post().to(forms))
                    .route("/bytes", web::post().to(upload))
                    .route("/json", web::post().to(amounts))
                    .route("/tags", web::post().to(tag))
                    .route("/whoami", web::post().to(whoami))
                    .route("/elsewhere", web::post().to(elsewhere))
                    .route("/stale", web::post().to(stale))
            })
            .workers(1)
            .bind("127.0.0.1:0")
            .expect("bind a loopback port");
            let _ = tx.send(server.addrs()[0]);
            let _ = server.run().await;
        })
    });
    let addr = rx.await.expect("server thread");
    Fixture::new(addr, counters)
}

idempotent_tests::identity_conformance_tests!(start_actix());
