//! The servers compared: one small JSON handler, bare and protected, on axum and actix-web; the
//! hand-written ceilings on axum; the peer (axum-idempotent on ruts sessions).

use crate::hand::{self, Hand};
use actix_web::{web, HttpResponse, HttpServer};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use idempotent_axum::core::store::{MemoryStore, MySqlStore, PostgresStore, RedisStore, SqliteStore, Store};

/// The memory store's bound in this benchmark: 4 GiB, room for about five million records.
const MEMORY_STORE_BYTES: usize = 4 << 30;
use idempotent_tests::mysql::TestDb;
use idempotent_tests::postgres::TestSchema;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The request body.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Charge {
    pub amount: i64,
    pub currency: String,
}

/// The response body: the charge echoed, with an id.
#[derive(Debug, Serialize)]
pub struct Receipt {
    id: String,
    amount: i64,
    currency: String,
    status: &'static str,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A receipt for `charge`, with a fresh id.
pub fn receipt(charge: Charge) -> Receipt {
    Receipt {
        id: format!("ch_{:016x}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        amount: charge.amount,
        currency: charge.currency,
        status: "succeeded",
    }
}

/// How long a burst handler works: long enough for every request of a burst to arrive meanwhile.
pub const BURST_WORK: Duration = Duration::from_millis(50);

async fn axum_bare(Json(c): Json<Charge>) -> (StatusCode, Json<Receipt>) {
    (StatusCode::CREATED, Json(receipt(c)))
}

#[idempotent_axum::idempotent(scope = "compare.charge", fields = [amount, currency])]
async fn axum_ours(Json(c): Json<Charge>) -> (StatusCode, Json<Receipt>) {
    (StatusCode::CREATED, Json(receipt(c)))
}

async fn axum_counted(State(runs): State<Arc<AtomicU64>>, Json(c): Json<Charge>) -> (StatusCode, Json<Receipt>) {
    runs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(BURST_WORK).await;
    (StatusCode::CREATED, Json(receipt(c)))
}

#[idempotent_axum::idempotent(scope = "compare.burst", fields = [amount, currency])]
async fn axum_ours_counted(State(runs): State<Arc<AtomicU64>>, Json(c): Json<Charge>) -> (StatusCode, Json<Receipt>) {
    runs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(BURST_WORK).await;
    (StatusCode::CREATED, Json(receipt(c)))
}

#[actix_web::post("/charge")]
async fn actix_bare(c: web::Json<Charge>) -> HttpResponse {
    HttpResponse::Created().json(receipt(c.into_inner()))
}

#[idempotent_actix::idempotent(scope = "compare.charge", fields = [amount, currency])]
#[actix_web::post("/charge")]
async fn actix_ours(c: web::Json<Charge>) -> HttpResponse {
    HttpResponse::Created().json(receipt(c.into_inner()))
}

#[idempotent_actix::idempotent(scope = "compare.burst", fields = [amount, currency])]
#[actix_web::post("/burst")]
async fn actix_ours_counted(runs: web::Data<AtomicU64>, c: web::Json<Charge>) -> HttpResponse {
    runs.fetch_add(1, Ordering::SeqCst);
    actix_web::rt::time::sleep(BURST_WORK).await;
    HttpResponse::Created().json(receipt(c.into_inner()))
}

/// `GET /login` of the peer's server: puts a value in the session, so that the session exists
/// and its cookie is set.
async fn peer_login(session: ruts::Session<ruts::store::moka::MokaStore>) -> StatusCode {
    let ttl = ruts::store::Ttl::new(3600).expect("an hour is a valid ttl");
    match session.set("client", &1u32, ttl, None).await {
        Ok(()) => StatusCode::NO_CONTENT,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Framework {
    Axum,
    Actix,
}

impl Framework {
    pub fn label(self) -> &'static str {
        match self {
            Framework::Axum => "axum",
            Framework::Actix => "actix",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    None,
    Memory,
    Sqlite,
    Postgres,
    /// PostgreSQL with group commit off (`PostgresConfig::group_commit(1)`).
    PostgresUnbatched,
    MySql,
    Redis,
    Moka,
}

impl StoreKind {
    pub fn label(self) -> &'static str {
        match self {
            StoreKind::None => "none",
            StoreKind::Memory => "memory",
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
            StoreKind::PostgresUnbatched => "postgres unbatched",
            StoreKind::MySql => "mysql",
            StoreKind::Redis => "redis",
            StoreKind::Moka => "moka",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The handler alone.
    Bare,
    /// `#[idempotent]` on one of our stores.
    Ours,
    /// The same round trips and guarantees as our store, written by hand in the handler.
    Hand,
    /// axum-idempotent with ruts sessions in moka.
    Peer,
}

/// One row of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub kind: Kind,
    pub framework: Framework,
    pub store: StoreKind,
}

impl Variant {
    pub const fn new(kind: Kind, framework: Framework, store: StoreKind) -> Self {
        Self { kind, framework, store }
    }

    /// Every row, in table order.
    pub fn all() -> Vec<Variant> {
        use Framework::*;
        use StoreKind::*;
        let mut rows = vec![Variant::new(Kind::Bare, Axum, None), Variant::new(Kind::Bare, Actix, None)];
        for framework in [Axum, Actix] {
            for store in [Memory, Sqlite, Postgres, MySql, Redis] {
                rows.push(Variant::new(Kind::Ours, framework, store));
                if framework == Axum && store == Postgres {
                    rows.push(Variant::new(Kind::Ours, framework, PostgresUnbatched));
                }
            }
        }
        for store in [Redis, Postgres, MySql, Sqlite] {
            rows.push(Variant::new(Kind::Hand, Axum, store));
        }
        rows.push(Variant::new(Kind::Peer, Axum, Moka));
        rows
    }

    pub fn label(self) -> String {
        match self.kind {
            Kind::Bare => format!("bare {}", self.framework.label()),
            Kind::Ours => format!("ours {} {}", self.framework.label(), self.store.label()),
            Kind::Hand => format!("hand {} {}", self.framework.label(), self.store.label()),
            Kind::Peer => "peer axum-idempotent".to_owned(),
        }
    }

    /// Whether the duplicate-execution bursts run on this variant.
    pub fn bursts(self) -> bool {
        match self.kind {
            Kind::Ours => self.framework == Framework::Axum || self.store == StoreKind::Memory,
            Kind::Peer => true,
            Kind::Bare | Kind::Hand => false,
        }
    }

    /// Whether a repeated key is answered with a replay.
    pub fn replays(self) -> bool {
        self.kind != Kind::Bare
    }

    /// Whether each connection needs a session first.
    pub fn session(self) -> bool {
        self.kind == Kind::Peer
    }
}

/// What the run found reachable, and names unique to it.
#[derive(Debug, Clone)]
pub struct Services {
    pub redis_url: Option<String>,
    pub postgres: bool,
    pub mysql: bool,
    pub run_id: String,
}

impl Services {
    /// Whether `store` can be had.
    pub fn has(&self, store: StoreKind) -> bool {
        match store {
            StoreKind::Postgres | StoreKind::PostgresUnbatched => self.postgres,
            StoreKind::MySql => self.mysql,
            StoreKind::Redis => self.redis_url.is_some(),
            _ => true,
        }
    }
}

/// Where a variant keeps its records, made before its server starts.
#[derive(Debug, Clone)]
enum Backing {
    None,
    Memory,
    Sqlite(PathBuf),
    /// A test schema, and the store's group commit bound (1: off, its default).
    /// The test schema, and the store's group commit bound (`None`: its default).
    Postgres(Arc<TestSchema>, Option<usize>),
    MySql(Arc<TestDb>),
    Redis {
        url: String,
        prefix: String,
    },
}

impl Backing {
    async fn new(v: Variant, services: &Services) -> Result<Self, String> {
        let tag = format!("{}-{}-{}", v.kind.label(), v.framework.label(), v.store.label());
        Ok(match v.store {
            StoreKind::None | StoreKind::Moka => Backing::None,
            StoreKind::Memory => Backing::Memory,
            StoreKind::Sqlite => {
                Backing::Sqlite(std::env::temp_dir().join(format!("compare-{}-{tag}.sqlite", services.run_id)))
            }
            StoreKind::Postgres | StoreKind::PostgresUnbatched => {
                let schema = TestSchema::new().await.ok_or("no PostgreSQL server for the test schema")?;
                Backing::Postgres(schema, (v.store == StoreKind::PostgresUnbatched).then_some(1))
            }
            StoreKind::MySql => Backing::MySql(TestDb::new().await.ok_or("no MySQL server for the test database")?),
            StoreKind::Redis => Backing::Redis {
                url: services.redis_url.clone().ok_or("no Redis server")?,
                prefix: format!("compare:{}:{tag}:", services.run_id),
            },
        })
    }

    /// Our store on this backing, with its default settings (PostgreSQL and MySQL: the test
    /// schema's or database's, with the default sweep interval; `postgres unbatched`: with
    /// `group_commit(1)`), except the memory store's bound: a full run completes more
    /// than a million keys on it, each kept for the route's 24 hours, which would fill the default
    /// 256 MiB (and every later request would be answered 503, store full).
    async fn store(&self) -> Result<Arc<dyn Store>, String> {
        Ok(match self {
            Backing::None | Backing::Memory => Arc::new(MemoryStore::with_limits(usize::MAX, MEMORY_STORE_BYTES)),
            Backing::Sqlite(path) => {
                Arc::new(SqliteStore::connect(&format!("sqlite:{}", path.display())).await.map_err(|e| e.to_string())?)
            }
            Backing::Postgres(schema, group_commit) => {
                let config =
                    schema.config().max_connections(hand::PG_CONNECTIONS).sweep_interval(Some(Duration::from_secs(60)));
                let config = match group_commit {
                    Some(bound) => config.group_commit(*bound),
                    None => config,
                };
                Arc::new(PostgresStore::connect_with(&schema.url, config).await.map_err(|e| e.to_string())?)
            }
            Backing::MySql(db) => {
                let config =
                    db.config().max_connections(hand::MY_CONNECTIONS).sweep_interval(Some(Duration::from_secs(60)));
                Arc::new(MySqlStore::connect_with(&db.url, config).await.map_err(|e| e.to_string())?)
            }
            Backing::Redis { url, prefix } => {
                Arc::new(RedisStore::builder(url).prefix(prefix.clone()).build().await.map_err(|e| e.to_string())?)
            }
        })
    }

    /// The hand-written ceiling's database on this backing, pooled as our store pools it.
    async fn hand(&self) -> Result<Hand, String> {
        match self {
            Backing::Sqlite(path) => hand::sqlite(path).await,
            Backing::Postgres(schema, _) => hand::postgres(&schema.url, &schema.name).await,
            Backing::MySql(db) => hand::mysql(&db.url).await,
            Backing::Redis { url, prefix } => hand::redis(url, prefix).await,
            Backing::None | Backing::Memory => Err("no hand-written ceiling on this store".into()),
        }
    }

    fn remove_files(&self) {
        if let Backing::Sqlite(path) = self {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Bare => "bare",
            Kind::Ours => "ours",
            Kind::Hand => "hand",
            Kind::Peer => "peer",
        }
    }
}

/// A running server of one variant.
pub struct Server {
    pub addr: SocketAddr,
    /// Executions of the burst handler.
    pub runs: Arc<AtomicU64>,
    backing: Backing,
    stop: Stop,
}

enum Stop {
    Axum(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>),
    Actix(actix_web::dev::ServerHandle, std::thread::JoinHandle<()>),
}

impl Server {
    /// Starts `v`'s server: axum on `axum_rt` (its two workers), actix-web on a system of its
    /// own with two workers.
    pub async fn start(v: Variant, services: &Services, axum_rt: &tokio::runtime::Handle) -> Result<Self, String> {
        let backing = Backing::new(v, services).await?;
        let runs = Arc::new(AtomicU64::new(0));
        let started = match v.framework {
            Framework::Axum => start_axum(v, backing.clone(), runs.clone(), axum_rt).await,
            Framework::Actix => start_actix(v, backing.clone(), runs.clone()).await,
        };
        match started {
            Ok((addr, stop)) => Ok(Server { addr, runs, backing, stop }),
            Err(e) => {
                backing.remove_files();
                Err(e)
            }
        }
    }

    /// Stops the server and waits for it (its store is dropped with it), then removes the
    /// variant's files.
    pub async fn stop(self) {
        match self.stop {
            Stop::Axum(stop, task) => {
                let _ = stop.send(());
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            }
            Stop::Actix(handle, thread) => {
                handle.stop(true).await;
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
        }
        self.backing.remove_files();
    }
}

async fn axum_router(v: Variant, backing: &Backing, runs: Arc<AtomicU64>) -> Result<Router, String> {
    Ok(match v.kind {
        Kind::Bare => Router::new().route("/charge", post(axum_bare)),
        Kind::Ours => {
            let idempotency = idempotent_axum::Idempotency::builder(backing.store().await?)
                .actor(idempotent_axum::ActorSource::Anonymous)
                .build()
                .map_err(|e| e.to_string())?;
            Router::new()
                .route("/charge", post(axum_ours))
                .route("/burst", post(axum_ours_counted))
                .layer(idempotency.layer())
                .with_state(runs)
        }
        Kind::Hand => Router::new().route("/charge", post(hand::handler)).with_state(backing.hand().await?),
        Kind::Peer => {
            use axum_idempotent::{IdempotentLayer, IdempotentOptions};
            use ruts::store::moka::MokaStore;
            let sessions = Arc::new(MokaStore::builder().build());
            let options = IdempotentOptions::default().use_idempotency_key_header(Some("Idempotency-Key"), true);
            let keyed = Router::new()
                .route("/charge", post(axum_bare))
                .route("/burst", post(axum_counted))
                .with_state(runs)
                .layer(IdempotentLayer::<MokaStore>::new(options));
            Router::new()
                .route("/login", get(peer_login))
                .merge(keyed)
                .layer(
                    ruts::SessionLayer::new(sessions).with_cookie_options(ruts::CookieOptions::build().name("session")),
                )
                .layer(tower_cookies::CookieManagerLayer::new())
        }
    })
}

async fn start_axum(
    v: Variant,
    backing: Backing,
    runs: Arc<AtomicU64>,
    rt: &tokio::runtime::Handle,
) -> Result<(SocketAddr, Stop), String> {
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(async move {
        let router = match axum_router(v, &backing, runs).await {
            Ok(router) => router,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        let addr = listener.local_addr().expect("a bound listener has an address");
        let _ = ready_tx.send(Ok(addr));
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    let addr = ready.await.map_err(|_| "the axum server task ended".to_owned())??;
    Ok((addr, Stop::Axum(stop, task)))
}

async fn start_actix(v: Variant, backing: Backing, runs: Arc<AtomicU64>) -> Result<(SocketAddr, Stop), String> {
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let idempotency = match v.kind {
                Kind::Ours => match backing.store().await {
                    Ok(store) => match idempotent_actix::Idempotency::builder(store)
                        .actor(idempotent_actix::ActorSource::Anonymous)
                        .build()
                    {
                        Ok(i) => Some(i),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return;
                        }
                    },
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                },
                _ => None,
            };
            let runs = web::Data::from(runs);
            let server = HttpServer::new(move || {
                let (idempotency, runs) = (idempotency.clone(), runs.clone());
                actix_web::App::new().configure(move |cfg| match idempotency {
                    Some(idempotency) => {
                        cfg.app_data(idempotency.data()).app_data(runs).service(actix_ours).service(actix_ours_counted);
                    }
                    None => {
                        cfg.service(actix_bare);
                    }
                })
            })
            .workers(2)
            .tcp_nodelay(true)
            .disable_signals()
            .bind("127.0.0.1:0");
            let server = match server {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let addr = server.addrs()[0];
            let server = server.run();
            let _ = ready_tx.send(Ok((addr, server.handle())));
            let _ = server.await;
        })
    });
    let (addr, handle) = ready.await.map_err(|_| "the actix-web system ended".to_owned())??;
    Ok((addr, Stop::Actix(handle, thread)))
}
