//! The Redis, PostgreSQL and MySQL stores over TLS (feature `tls`), against servers of this test
//! binary's own that present a certificate of a CA made at run time ([`idempotent_tests::tls`]):
//! the store contract over `rediss://`, `rediss+cluster://`, `sslmode=verify-full` and
//! `ssl-mode=VERIFY_IDENTITY`, a protected request
//! over `rediss://`, client certificates, connections that really are TLS, and the errors at
//! start-up for a server whose certificate does not verify (another CA, another name).

use axum::http::StatusCode;
use axum::{routing, Json, Router};
use idempotent_core::fingerprint::{Fingerprint, FingerprintBuilder};
use idempotent_core::response::StoredResponse;
use idempotent_core::store::{
    self, Claim, MySqlConfig, MySqlStore, PostgresConfig, PostgresStore, RecordKey, RedisStore, Store, StoreError,
};
use idempotent_tests::mysql::{tls_server, tls_url};
use idempotent_tests::redis_server::test_prefix;
use idempotent_tests::tls::{self, pki, postgres_url};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(3600);

fn fp(n: u32) -> Fingerprint {
    FingerprintBuilder::new("payments.create").field("n", &n).unwrap().finish()
}

fn fresh_key() -> RecordKey {
    RecordKey::new("payments.create", "acct_1", uuid::Uuid::new_v4().to_string())
}

/// Claim, complete, replay and mismatch on `store`: one round trip of each kind over its
/// connection.
async fn claim_complete_replay(store: &dyn Store) {
    let k = fresh_key();
    let Claim::Acquired(token) = store.claim(&k, &fp(1), LEASE).await.unwrap() else { panic!("first claim") };
    let response = StoredResponse::new(201, [("content-type", "application/json")], bytes::Bytes::from_static(b"{}"));
    store.complete(&k, &token, &response, TTL).await.unwrap();
    assert_eq!(store.claim(&k, &fp(1), LEASE).await.unwrap(), Claim::Completed(response));
    assert_eq!(store.claim(&k, &fp(2), LEASE).await.unwrap(), Claim::Mismatch);
}

/// The error of a connection attempt that must fail on the server's certificate: it fails at
/// start-up, and its message says so.
fn certificate_error<T>(result: Result<T, StoreError>, what: &str) -> String {
    let Err(err) = result else { panic!("{what}: connected") };
    let msg = err.to_string();
    eprintln!("{what}: {msg}");
    assert!(matches!(err, StoreError::Unavailable(_)), "{what}: {err:?}");
    assert!(
        msg.contains("TLS: the server's certificate does not verify"),
        "{what}: the error does not say it is the certificate: {msg}"
    );
    msg
}

// --- Redis ---------------------------------------------------------------------------------

/// A store on `spec` trusting the test CA, with `prefix`.
async fn redis_store_on(spec: &str, prefix: &str) -> Arc<RedisStore> {
    let store = RedisStore::builder(spec).root_certificate(pki().ca_pem.as_bytes()).prefix(prefix).build().await;
    Arc::new(store.unwrap_or_else(|e| panic!("connect to {spec}: {e}")))
}

fn redis_spec(port: u16) -> String {
    format!("rediss://127.0.0.1:{port}")
}

fn redis_cluster_spec(port: u16) -> String {
    format!("rediss+cluster://127.0.0.1:{port}")
}

async fn redis_store() -> Option<Arc<RedisStore>> {
    Some(redis_store_on(&redis_spec(tls::redis().await?), &test_prefix()).await)
}

async fn reopen_redis(store: Arc<RedisStore>) -> Arc<RedisStore> {
    redis_store_on(&redis_spec(tls::redis().await.expect("the TLS Redis")), store.prefix()).await
}

async fn redis_cluster_store() -> Option<Arc<RedisStore>> {
    let store = redis_store_on(&redis_cluster_spec(tls::redis_cluster().await?), &test_prefix()).await;
    assert!(store.is_cluster());
    Some(store)
}

async fn reopen_redis_cluster(store: Arc<RedisStore>) -> Arc<RedisStore> {
    redis_store_on(&redis_cluster_spec(tls::redis_cluster().await.expect("the TLS cluster")), store.prefix()).await
}

idempotent_tests::store_contract_tests!(redis_over_tls, redis_store(), reopen = reopen_redis);
idempotent_tests::store_contract_tests!(redis_cluster_over_tls, redis_cluster_store(), reopen = reopen_redis_cluster);

#[tokio::test]
async fn redis_seed_urls_over_tls() {
    let Some(port) = tls::redis_cluster().await else { return };
    let store = RedisStore::cluster([redis_spec(port)])
        .root_certificate(pki().ca_pem.as_bytes())
        .prefix(test_prefix())
        .build()
        .await
        .expect("connect to the cluster through a rediss:// seed");
    assert!(store.is_cluster());
    claim_complete_replay(&store).await;
}

#[tokio::test]
async fn redis_server_signed_by_another_ca_is_refused_at_start_up() {
    let (Some(port), Some(cluster)) = (tls::redis().await, tls::redis_cluster().await) else { return };
    for spec in [redis_spec(port), redis_cluster_spec(cluster)] {
        let result = RedisStore::builder(&spec).root_certificate(pki().other_ca_pem.as_bytes()).build().await;
        certificate_error(result, &format!("{spec} with another CA"));
    }
}

/// `#insecure` (no verification of the server's certificate) is refused, not honoured.
#[tokio::test]
async fn redis_insecure_urls_are_refused() {
    let Some(port) = tls::redis().await else { return };
    let spec = format!("rediss://127.0.0.1:{port}/#insecure");
    let Err(err) = RedisStore::connect(&spec).await else { panic!("{spec} connected") };
    eprintln!("{spec}: {err}");
    assert!(matches!(&err, StoreError::Config(m) if m.contains("insecure")), "{err:?}");
}

/// A root or client certificate that is not one is a configuration error, before any connection.
#[tokio::test]
async fn redis_certificates_that_are_not_certificates() {
    let spec = "rediss://127.0.0.1:1";
    let malformed = &b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"[..];
    for pem in [&b"not a certificate"[..], malformed, pki().client_key_pem.as_bytes()] {
        let result = RedisStore::builder(spec).root_certificate(pem).build().await;
        let Err(StoreError::Config(msg)) = result else { panic!("{result:?}") };
        eprintln!("root certificate: {msg}");
    }
    let key = pki().client_key_pem.as_bytes();
    for (cert, key) in [(&b"not a certificate"[..], key), (pki().client_cert_pem.as_bytes(), &b"not a key"[..])] {
        let result = RedisStore::builder(spec).client_certificate(cert, key).build().await;
        let Err(StoreError::Config(msg)) = result else { panic!("{result:?}") };
        eprintln!("client certificate: {msg}");
    }
}

/// A specification string alone verifies the server against the platform's root certificates,
/// which do not hold the test CA.
#[tokio::test]
async fn redis_specification_strings_verify_against_the_platform_roots() {
    let (Some(port), Some(cluster)) = (tls::redis().await, tls::redis_cluster().await) else { return };
    for spec in [redis_spec(port), redis_cluster_spec(cluster)] {
        let msg = certificate_error(store::connect(&spec).await, &format!("{spec} with the platform's roots"));
        assert!(msg.contains("UnknownIssuer"), "{msg}");
    }
}

/// A specification string carries no certificate: a private CA is trusted through
/// `SSL_CERT_FILE`, which replaces the platform's roots. The variable is the whole process's, so
/// the connection runs in a child: this test binary, running only
/// `specification_string_in_a_child`.
#[tokio::test]
async fn redis_specification_strings_trust_ssl_cert_file() {
    let (Some(port), Some(cluster)) = (tls::redis().await, tls::redis_cluster().await) else { return };
    let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["specification_string_in_a_child", "--exact", "--ignored", "--nocapture"])
        .env("SSL_CERT_FILE", &pki().ca_file)
        .env("IDEMPOTENT_TEST_TLS_SPECS", format!("{} {}", redis_spec(port), redis_cluster_spec(cluster)))
        .output()
        .expect("run the child");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("1 passed"), "child failed:\n{stdout}\n{stderr}");
}

#[tokio::test]
#[ignore = "run by redis_specification_strings_trust_ssl_cert_file, in a process of its own"]
async fn specification_string_in_a_child() {
    let Ok(specs) = std::env::var("IDEMPOTENT_TEST_TLS_SPECS") else { return };
    for spec in specs.split(' ') {
        let store = store::connect(spec).await.unwrap_or_else(|e| panic!("{spec}: {e}"));
        claim_complete_replay(&*store).await;
    }
}

/// The server's certificate names `127.0.0.1` and `localhost`; reached as `127.0.0.2`, it is
/// refused.
#[tokio::test]
async fn redis_server_under_another_name_is_refused_at_start_up() {
    let Some(port) = tls::redis().await else { return };
    let spec = format!("rediss://127.0.0.2:{port}");
    let result = RedisStore::builder(&spec).root_certificate(pki().ca_pem.as_bytes()).build().await;
    let msg = certificate_error(result, "a name the certificate does not have");
    assert!(msg.contains("not valid for name \"127.0.0.2\""), "{msg}");
}

#[tokio::test]
async fn redis_client_certificates() {
    let Some(port) = tls::redis_requiring_client_certificates().await else { return };
    let spec = redis_spec(port);
    let without = RedisStore::builder(&spec).root_certificate(pki().ca_pem.as_bytes()).build().await;
    let err = without.expect_err("a server that requires a client certificate, without one");
    eprintln!("without a client certificate: {err}");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("requires a client certificate"), "{err}");
    let store = RedisStore::builder(&spec)
        .root_certificate(pki().ca_pem.as_bytes())
        .client_certificate(pki().client_cert_pem.as_bytes(), pki().client_key_pem.as_bytes())
        .prefix(test_prefix())
        .build()
        .await
        .expect("connect with a client certificate");
    claim_complete_replay(&store).await;
}

static CHARGES: AtomicUsize = AtomicUsize::new(0);

#[idempotent_axum::idempotent(scope = "tls.charge")]
async fn charge(Json(body): Json<serde_json::Value>) -> (StatusCode, String) {
    let n = CHARGES.fetch_add(1, Ordering::SeqCst) + 1;
    (StatusCode::CREATED, format!("charge {n} of {}", body["amount"]))
}

/// A real protected request whose record lives in Redis over TLS: run once, then replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_request_over_rediss_runs_once_then_replays() {
    let Some(store) = redis_store().await else { return };
    let idempotency =
        idempotent_axum::Idempotency::builder(store).actor(idempotent_axum::ActorSource::Anonymous).build().unwrap();
    let router = Router::new().route("/charges", routing::post(charge)).layer(idempotency.layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = reqwest::Client::new();
    let send = || {
        client
            .post(format!("http://{addr}/charges"))
            .header("Idempotency-Key", "tls-charge-1")
            .json(&serde_json::json!({"amount": 10}))
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(first.text().await.unwrap(), "charge 1 of 10");
    let second = send().await.unwrap();
    assert_eq!(second.status(), 201);
    assert_eq!(second.headers().get("idempotent-replayed").and_then(|v| v.to_str().ok()), Some("true"));
    assert_eq!(second.text().await.unwrap(), "charge 1 of 10");
    assert_eq!(CHARGES.load(Ordering::SeqCst), 1);
}

// --- PostgreSQL ----------------------------------------------------------------------------

fn pg_config() -> PostgresConfig {
    PostgresConfig::new()
        .schema(format!("idem_tls_{}", uuid::Uuid::new_v4().simple()))
        .sweep_interval(Some(Duration::from_millis(500)))
        .max_connections(4)
}

fn pg_url(port: u16) -> String {
    postgres_url(port, "127.0.0.1", "verify-full", &pki().ca_file)
}

async fn pg_store() -> Option<Arc<PostgresStore>> {
    let url = pg_url(tls::postgres().await?);
    Some(Arc::new(PostgresStore::connect_with(&url, pg_config()).await.expect("connect over TLS")))
}

async fn reopen_pg(store: Arc<PostgresStore>) -> Arc<PostgresStore> {
    let url = pg_url(tls::postgres().await.expect("the TLS PostgreSQL"));
    Arc::new(PostgresStore::connect_with(&url, store.config().clone()).await.expect("reconnect over TLS"))
}

idempotent_tests::store_contract_tests!(postgres_over_tls, pg_store(), reopen = reopen_pg);

#[tokio::test]
async fn postgres_connections_are_tls() {
    let Some(store) = pg_store().await else { return };
    let (ssl, version): (bool, String) =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert!(ssl, "the store's connection is not TLS");
    eprintln!("the store's connection: {version}");
    // The same URL as a specification string.
    let spec = pg_url(tls::postgres().await.unwrap());
    let store = store::connect(&spec).await.expect("connect the specification string");
    claim_complete_replay(&*store).await;
}

#[tokio::test]
async fn postgres_server_signed_by_another_ca_is_refused_at_start_up() {
    let Some(port) = tls::postgres().await else { return };
    let url = postgres_url(port, "127.0.0.1", "verify-full", &pki().other_ca_file);
    certificate_error(PostgresStore::connect(&url).await, "PostgreSQL with another CA");
    certificate_error(store::connect(&url).await, "PostgreSQL with another CA, as a specification string");
}

/// `verify-full` checks the name in the certificate, `verify-ca` only the chain.
#[tokio::test]
async fn postgres_server_under_another_name() {
    let Some(port) = tls::postgres().await else { return };
    let url = postgres_url(port, "127.0.0.2", "verify-full", &pki().ca_file);
    let msg = certificate_error(PostgresStore::connect(&url).await, "a name the certificate does not have");
    assert!(msg.contains("not valid for name \"127.0.0.2\""), "{msg}");
    let url = postgres_url(port, "127.0.0.2", "verify-ca", &pki().ca_file);
    let store = PostgresStore::connect_with(&url, pg_config()).await.expect("verify-ca ignores the name");
    claim_complete_replay(&store).await;
}

// --- MySQL (MariaDB) ---------------------------------------------------------------------------

fn my_config() -> MySqlConfig {
    MySqlConfig::new()
        .database(format!("idem_tls_{}", uuid::Uuid::new_v4().simple()))
        .sweep_interval(Some(Duration::from_millis(500)))
        .max_connections(4)
}

fn my_url(port: u16) -> String {
    tls_url(port, "127.0.0.1", "mysql", "VERIFY_IDENTITY", &pki().ca_file)
}

async fn my_store() -> Option<Arc<MySqlStore>> {
    let url = my_url(tls_server().await?);
    Some(Arc::new(MySqlStore::connect_with(&url, my_config()).await.expect("connect over TLS")))
}

async fn reopen_my(store: Arc<MySqlStore>) -> Arc<MySqlStore> {
    let url = my_url(tls_server().await.expect("the TLS MariaDB"));
    Arc::new(MySqlStore::connect_with(&url, store.config().clone()).await.expect("reconnect over TLS"))
}

idempotent_tests::store_contract_tests!(mysql_over_tls, my_store(), reopen = reopen_my);

/// The store's connections are TLS (the server refuses any other), and a specification string
/// with `ssl-mode=VERIFY_IDENTITY` connects as well.
#[tokio::test]
async fn mysql_connections_are_tls() {
    let Some(store) = my_store().await else { return };
    let (_, cipher): (String, String) =
        sqlx::query_as("SHOW SESSION STATUS LIKE 'Ssl_cipher'").fetch_one(store.pool()).await.unwrap();
    assert!(!cipher.is_empty(), "the store's connection is not TLS");
    eprintln!("the store's connection: {cipher}");
    let spec = my_url(tls_server().await.unwrap());
    let store = store::connect(&spec).await.expect("connect the specification string");
    claim_complete_replay(&*store).await;
    // In clear, the server refuses.
    let clear = tls_url(tls_server().await.unwrap(), "127.0.0.1", "mysql", "DISABLED", &pki().ca_file);
    let refused = MySqlStore::connect(&clear).await.expect_err("a connection in clear");
    assert!(matches!(refused, StoreError::Unavailable(_)), "{refused:?}");
}

#[tokio::test]
async fn mysql_server_signed_by_another_ca_is_refused_at_start_up() {
    let Some(port) = tls_server().await else { return };
    let url = tls_url(port, "127.0.0.1", "mysql", "VERIFY_IDENTITY", &pki().other_ca_file);
    certificate_error(MySqlStore::connect(&url).await, "MariaDB with another CA");
    certificate_error(store::connect(&url).await, "MariaDB with another CA, as a specification string");
}

/// `VERIFY_IDENTITY` checks the name in the certificate, `VERIFY_CA` only the chain.
#[tokio::test]
async fn mysql_server_under_another_name() {
    let Some(port) = tls_server().await else { return };
    let url = tls_url(port, "127.0.0.2", "mysql", "VERIFY_IDENTITY", &pki().ca_file);
    let msg = certificate_error(MySqlStore::connect(&url).await, "a name the certificate does not have");
    assert!(msg.contains("not valid for name \"127.0.0.2\""), "{msg}");
    let url = tls_url(port, "127.0.0.2", "mysql", "VERIFY_CA", &pki().ca_file);
    let store = MySqlStore::connect_with(&url, my_config()).await.expect("VERIFY_CA ignores the name");
    claim_complete_replay(&store).await;
}
