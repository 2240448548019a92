//! Fault paths of the actix-web adapter over real HTTP on a loopback port. The fixture app below
//! serves the routes of the shared fault suite ([`idempotent_tests::fault_tests!`]: panics,
//! retryable statuses, disconnects, oversized and failing bodies, wait mode, optional keys,
//! cookies); the tests after it are this adapter's own (an unreachable store, a missing runtime,
//! the key header's name, an actor extension, the routing attribute).

use actix_web::dev::Payload;
use actix_web::{post, web, App, FromRequest, HttpMessage, HttpRequest, HttpResponse, HttpServer};
use idempotent_actix::core::registry::{self, Framework};
use idempotent_actix::core::store::MemoryStore;
use idempotent_actix::{idempotent, Actor, Idempotency};
use idempotent_tests::faults::Unreachable;
use idempotent_tests::http::{new_key, send, Captured};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::future::{ready, Ready};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize, Serialize)]
struct Item {
    name: String,
}

static PANICS: AtomicUsize = AtomicUsize::new(0);
static FLAKY: AtomicUsize = AtomicUsize::new(0);
static SLOW: AtomicUsize = AtomicUsize::new(0);
static BIG: AtomicUsize = AtomicUsize::new(0);
static STREAM: AtomicUsize = AtomicUsize::new(0);
static WAITED: AtomicUsize = AtomicUsize::new(0);
static OPTIONAL: AtomicUsize = AtomicUsize::new(0);
static DOWN: AtomicUsize = AtomicUsize::new(0);
static WHO: AtomicUsize = AtomicUsize::new(0);
static BROKEN: AtomicUsize = AtomicUsize::new(0);
static LIMITED: AtomicUsize = AtomicUsize::new(0);
static OPTION_BODY: AtomicUsize = AtomicUsize::new(0);

/// Its body is read by an extractor the attribute does not recognise as the body (and it is not
/// marked `#[body]`), so the request's body cannot be part of its identity.
#[idempotent(scope = "faults.option_body")]
async fn option_body(item: Option<web::Json<Item>>) -> HttpResponse {
    OPTION_BODY.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Ok().body(item.map(|i| i.name.clone()).unwrap_or_default())
}

/// Its effects happen, then its response body fails half-way (an upstream stream that breaks).
#[idempotent(scope = "faults.broken")]
async fn broken_body() -> HttpResponse {
    BROKEN.fetch_add(1, Ordering::SeqCst);
    let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
        vec![Ok(bytes::Bytes::from_static(b"partial")), Err(std::io::Error::other("upstream closed"))];
    HttpResponse::Ok().streaming(futures_util::stream::iter(chunks))
}

#[idempotent(scope = "faults.limited")]
async fn limited(item: web::Json<Item>) -> HttpResponse {
    LIMITED.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Ok().body(item.name.clone())
}

#[idempotent(scope = "faults.panic", fields = [name])]
#[post("/panic")]
async fn panics_once(item: web::Json<Item>) -> HttpResponse {
    if PANICS.fetch_add(1, Ordering::SeqCst) == 0 {
        panic!("first call fails");
    }
    HttpResponse::Created().body(item.into_inner().name)
}

#[idempotent(scope = "faults.flaky", fields = [name])]
#[post("/flaky")]
async fn unavailable_once(item: web::Json<Item>) -> HttpResponse {
    if FLAKY.fetch_add(1, Ordering::SeqCst) == 0 {
        return HttpResponse::ServiceUnavailable().body("downstream busy");
    }
    HttpResponse::Created().body(item.into_inner().name)
}

#[idempotent(scope = "faults.slow", fields = [name])]
#[post("/slow")]
async fn slow(item: web::Json<Item>) -> HttpResponse {
    actix_web::rt::time::sleep(Duration::from_millis(600)).await;
    SLOW.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created().body(format!("slow {}", item.name))
}

#[idempotent(scope = "faults.big")]
async fn big() -> HttpResponse {
    BIG.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created().body("x".repeat(10_000))
}

#[idempotent(scope = "faults.stream")]
async fn stream() -> HttpResponse {
    STREAM.fetch_add(1, Ordering::SeqCst);
    let chunks = (0..20).map(|i| Ok::<_, std::io::Error>(bytes::Bytes::from(format!("{i:04}").repeat(100))));
    HttpResponse::Ok().streaming(futures_util::stream::iter(chunks))
}

#[idempotent(scope = "faults.wait", fields = [name], on_conflict = "wait")]
async fn waits(item: web::Json<Item>) -> (String, actix_web::http::StatusCode) {
    actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    WAITED.fetch_add(1, Ordering::SeqCst);
    (item.into_inner().name, actix_web::http::StatusCode::CREATED)
}

#[idempotent(scope = "faults.optional", key = "optional")]
async fn optional() -> HttpResponse {
    OPTIONAL.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created().finish()
}

#[idempotent(scope = "faults.down")]
async fn down() -> HttpResponse {
    DOWN.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created().finish()
}

#[idempotent(scope = "faults.cookie")]
async fn cookie() -> HttpResponse {
    HttpResponse::Created()
        .insert_header(("set-cookie", "session=secret"))
        .insert_header(("x-order", "o-1"))
        .insert_header(("date", "Thu, 01 Jan 1970 00:00:00 GMT"))
        .body("ok")
}

/// Authentication that names the caller through an [`Actor`] extension.
struct Who;

impl FromRequest for Who {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        if let Some(user) = req.headers().get("x-user").and_then(|v| v.to_str().ok()) {
            req.extensions_mut().insert(Actor(user.to_owned()));
        }
        ready(Ok(Who))
    }
}

#[idempotent(scope = "faults.who", route = "POST /who")]
async fn who(_who: Who) -> HttpResponse {
    let n = WHO.fetch_add(1, Ordering::SeqCst);
    HttpResponse::Created().body(n.to_string())
}

/// Runs an actix-web server on its own system thread and returns its base URL.
async fn serve<F>(idempotency: Option<Idempotency>, routes: F) -> String
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(move || {
                let app = App::new().configure(routes.clone());
                match &idempotency {
                    Some(i) => app.app_data(i.data()),
                    None => app,
                }
            })
            .workers(1)
            .bind("127.0.0.1:0")
            .unwrap();
            let _ = tx.send(server.addrs()[0]);
            let _ = server.run().await;
        })
    });
    format!("http://{}", rx.await.unwrap())
}

async fn app() -> String {
    let idem = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_actix::ActorSource::Anonymous)
        .max_stored_body(1024)
        .build()
        .unwrap();
    serve(Some(idem), |c: &mut web::ServiceConfig| {
        c.service(panics_once)
            .service(unavailable_once)
            .service(slow)
            .route("/big", web::post().to(big))
            .route("/stream", web::post().to(stream))
            .route("/wait", web::post().to(waits))
            .route("/optional", web::post().to(optional))
            .route("/cookie", web::post().to(cookie))
            .route("/who", web::post().to(who))
            .route("/broken", web::post().to(broken_body))
            .route("/option-body", web::post().to(option_body))
            .service(web::resource("/limited").app_data(web::PayloadConfig::new(64)).route(web::post().to(limited)));
    })
    .await
}

fn post_to(base: &str, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
    let r = reqwest::Client::new().post(format!("{base}{path}")).json(&json!({"name": "n"}));
    match key {
        Some(k) => r.header("Idempotency-Key", k),
        None => r,
    }
}

idempotent_tests::fault_tests!();

#[tokio::test]
async fn a_body_taken_by_an_unmarked_extractor_is_refused_not_fingerprinted_as_empty() {
    let base = app().await;
    let response = send(post_to(&base, "/option-body", Some(&new_key()))).await;
    response.assert_problem(500, "urn:idempotent:problem:misconfigured");
    assert!(response.json()["detail"].as_str().unwrap().contains("#[body]"));
    assert_eq!(OPTION_BODY.load(Ordering::SeqCst), 0, "nothing ran");
}

#[tokio::test]
async fn an_actor_extension_namespaces_keys() {
    let base = app().await;
    let key = new_key();
    let as_user = |user: &str| post_to(&base, "/who", Some(&key)).header("x-user", user.to_owned());
    let a = send(as_user("alice")).await;
    let b = send(as_user("bob")).await;
    assert_eq!((a.status, b.status), (201, 201));
    assert!(!b.replayed(), "another caller's response is never replayed");
    let again = send(as_user("alice")).await;
    assert!(again.replayed());
    assert_eq!(again.body, a.body);
}

#[tokio::test]
async fn the_registry_reads_the_neighbouring_routing_attribute() {
    let routes = registry::routes_of(Framework::Actix);
    let find = |scope: &str| *routes.iter().find(|r| r.scope() == Some(scope)).unwrap();
    assert_eq!((find("faults.panic").method, find("faults.panic").path), (Some("POST"), Some("/panic")));
    assert_eq!((find("faults.who").method, find("faults.who").path), (Some("POST"), Some("/who")));
    assert_eq!((find("faults.big").method, find("faults.big").path), (None, None));
    assert!(routes.iter().all(|r| r.framework == Framework::Actix));
}

#[tokio::test]
async fn an_unreachable_store_fails_closed_with_503() {
    let idem = Idempotency::builder(Arc::new(Unreachable))
        .actor(idempotent_actix::ActorSource::Anonymous)
        .store_retry_after(Duration::from_secs(5))
        .build()
        .unwrap();
    let base = serve(Some(idem), |c: &mut web::ServiceConfig| {
        c.route("/down", web::post().to(down));
    })
    .await;
    let r = send(post_to(&base, "/down", Some(&new_key()))).await;
    r.assert_problem(503, "urn:idempotent:problem:store-unavailable");
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(DOWN.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_route_without_the_runtime_says_so() {
    let base = serve(None, |c: &mut web::ServiceConfig| {
        c.route("/down", web::post().to(down));
    })
    .await;
    let r = send(post_to(&base, "/down", Some(&new_key()))).await;
    r.assert_problem(500, "urn:idempotent:problem:misconfigured");
}

#[tokio::test]
async fn the_key_header_name_is_configurable() {
    let idem = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_actix::ActorSource::Anonymous)
        .header_name("X-Request-Key")
        .build()
        .unwrap();
    let base = serve(Some(idem), |c: &mut web::ServiceConfig| {
        c.route("/cookie", web::post().to(cookie));
    })
    .await;
    let client = reqwest::Client::new();
    let missing = send(client.post(format!("{base}/cookie")).header("Idempotency-Key", "k")).await;
    missing.assert_problem(400, "urn:idempotent:problem:key-missing");
    assert!(missing.json()["detail"].as_str().unwrap().contains("x-request-key"));
    let key = new_key();
    assert_eq!(send(client.post(format!("{base}/cookie")).header("X-Request-Key", &key)).await.status, 201);
    assert!(send(client.post(format!("{base}/cookie")).header("X-Request-Key", &key)).await.replayed());
    assert!(Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_actix::ActorSource::Anonymous)
        .header_name("bad header")
        .build()
        .is_err());
}
