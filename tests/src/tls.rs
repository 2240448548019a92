//! TLS servers for the store tests: a Redis node, a one-node Redis Cluster, a Redis node that
//! requires client certificates and a PostgreSQL cluster, each of the test binary's own, on free
//! loopback ports, serving a certificate made at run time.
//!
//! [`pki`] makes, once per test binary, a test CA and a server certificate it signs for
//! `localhost` and `127.0.0.1` (not `127.0.0.2`, where the servers listen too, so that a test can
//! reach one under a name its certificate does not have), a client certificate, and a second CA
//! that signed nothing the servers present. The PEM files live in a temporary directory.
//!
//! The servers run in the foreground as child processes in directories of their own, like
//! [`crate::redis_server`]'s: a small `sh` watchdog per server stops it and removes its directory
//! once the test binary has exited. Redis listens only on its TLS port (`--port 0`), so nothing
//! reaches it in clear. PostgreSQL is made with `initdb` (from `PATH` or
//! `/usr/lib/postgresql/*/bin`) with `ssl=on`, and run as the `postgres` user when the tests run
//! as root (PostgreSQL refuses to run as root). When a server cannot be had the tests print a
//! loud `SKIPPED` line and pass, except under `CI=true`, where that is a failure.

use crate::postgres::{find_bin, is_root};
use crate::process::after_exit;
use crate::redis_server::{free_port, in_ci};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use sqlx::Connection;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// The certificates of the TLS tests, as PEM text and as files.
#[derive(Debug)]
pub struct Pki {
    /// The directory of the files (and of the servers' directories).
    pub dir: PathBuf,
    /// The test CA's certificate, which signed the servers' and the client's certificates.
    pub ca_pem: String,
    /// [`ca_pem`](Self::ca_pem) as a file.
    pub ca_file: PathBuf,
    /// Another CA's certificate: it signed nothing the servers present.
    pub other_ca_pem: String,
    /// [`other_ca_pem`](Self::other_ca_pem) as a file.
    pub other_ca_file: PathBuf,
    /// The servers' certificate (for `localhost` and `127.0.0.1`), signed by the test CA.
    pub server_cert_pem: String,
    /// The servers' private key.
    pub server_key_pem: String,
    /// A client certificate signed by the test CA.
    pub client_cert_pem: String,
    /// The client certificate's private key.
    pub client_key_pem: String,
}

static PKI: LazyLock<Pki> = LazyLock::new(make_pki);

/// The test binary's certificates, made on first use.
pub fn pki() -> &'static Pki {
    &PKI
}

/// A self-signed CA named `name`.
fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    (Issuer::new(params, key), cert.pem())
}

/// A certificate for `names` (DNS names or IP addresses) and `usage`, signed by `issuer`; its
/// PEM and its key's.
fn leaf(issuer: &Issuer<'_, KeyPair>, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("leaf parameters");
    params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("idempotent test client"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("leaf certificate");
    (cert.pem(), key.serialize_pem())
}

fn make_pki() -> Pki {
    let dir = std::env::temp_dir().join(format!("idempotent-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the TLS test directory");
    after_exit(&format!("rm -rf '{}'", dir.display()));
    let (issuer, ca_pem) = ca("idempotent test CA");
    let (_, other_ca_pem) = ca("idempotent other CA");
    let (server_cert_pem, server_key_pem) =
        leaf(&issuer, &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert_pem, client_key_pem) = leaf(&issuer, &[], ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a PEM file");
        path
    };
    let ca_file = write("ca.pem", &ca_pem);
    let other_ca_file = write("other-ca.pem", &other_ca_pem);
    Pki {
        dir,
        ca_pem,
        ca_file,
        other_ca_pem,
        other_ca_file,
        server_cert_pem,
        server_key_pem,
        client_cert_pem,
        client_key_pem,
    }
}

/// Prints a loud `SKIPPED` line saying what is missing, or panics under `CI=true`.
pub fn skip(what: &str, hint: &str) {
    let msg = format!("SKIPPED: no {what}: {hint}");
    if in_ci() {
        panic!("{msg} (a skip is a failure under CI=true)");
    }
    eprintln!("\n==================== {msg} ====================\n");
}

/// Writes `text` to `dir/name`, readable by its owner only.
fn write_private(dir: &Path, name: &str, text: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).ok()?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).ok()?;
    Some(path)
}

/// Waits up to `limit` until `127.0.0.1:port` accepts a connection; `false` when it does not or
/// `child` exits first.
async fn wait_listening(port: u16, child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return true;
        }
        if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `redis-server` child process listening only on a TLS port, on `127.0.0.1` and `127.0.0.2`.
/// Dropping it kills the server; a watchdog kills it anyway when the test binary exits.
#[derive(Debug)]
pub struct TlsRedis {
    /// The TLS port.
    pub port: u16,
    child: Child,
    watchdog: Option<Child>,
    dir: PathBuf,
}

impl TlsRedis {
    /// Starts `redis-server` from `PATH` with the test server certificate, not asking clients
    /// for certificates unless `extra` (later arguments win) says otherwise, and waits until its
    /// port accepts connections; `None` when it is not installed or does not come up.
    pub async fn start(extra: &[&str]) -> Option<Self> {
        let pki = pki();
        // A free bus port too (port + 10000), for a cluster node.
        let port = free_port(true)?;
        let dir = pki.dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).ok()?;
        let cert = write_private(&dir, "server.pem", &pki.server_cert_pem)?;
        let key = write_private(&dir, "server.key", &pki.server_key_pem)?;
        let log = std::fs::File::create(dir.join("redis.log")).ok()?;
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1", "127.0.0.2"])
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca_file)
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().ok()?)
            .stderr(log)
            .spawn()
            .ok()?;
        let watchdog = after_exit(&format!("kill -9 {} 2>/dev/null; rm -rf '{}'", child.id(), dir.display()));
        let mut server = Self { port, child, watchdog, dir };
        if !wait_listening(port, &mut server.child, Duration::from_secs(10)).await {
            eprintln!("redis-server with TLS on port {port} did not start:\n{}", server.log());
            return None;
        }
        Some(server)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// `rediss://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A connection to the TLS Redis on `port`, trusting the test CA.
pub async fn redis_admin(port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let certificates = redis::TlsCertificates { client_tls: None, root_cert: Some(pki().ca_pem.clone().into_bytes()) };
    let client = redis::Client::build_with_tls(format!("rediss://127.0.0.1:{port}"), certificates)?;
    client.get_multiplexed_async_connection().await
}

static REDIS: OnceCell<Option<u16>> = OnceCell::const_new();
static REDIS_CLUSTER: OnceCell<Option<u16>> = OnceCell::const_new();
static REDIS_MUTUAL: OnceCell<Option<u16>> = OnceCell::const_new();

const REDIS_HINT: &str = "put redis-server (Redis 7, built with TLS) on PATH";

/// Starts a server once per test binary and keeps it running until the binary exits.
async fn shared_redis(cell: &'static OnceCell<Option<u16>>, what: &str, extra: &[&str]) -> Option<u16> {
    let port = cell
        .get_or_init(|| async {
            let server = TlsRedis::start(extra).await?;
            let port = server.port;
            std::mem::forget(server);
            Some(port)
        })
        .await;
    if port.is_none() {
        skip(what, REDIS_HINT);
    }
    *port
}

/// The TLS port of a Redis node shared by the test binary's tests, which does not ask for client
/// certificates; `None` (after a loud `SKIPPED` line) when it cannot be started.
pub async fn redis() -> Option<u16> {
    shared_redis(&REDIS, "Redis server with TLS", &[]).await
}

/// The TLS port of a Redis node that requires a client certificate signed by the test CA
/// (`tls-auth-clients yes`).
pub async fn redis_requiring_client_certificates() -> Option<u16> {
    shared_redis(&REDIS_MUTUAL, "Redis server with TLS client authentication", &["--tls-auth-clients", "yes"]).await
}

/// The TLS port of a one-node Redis Cluster (every slot on the node, cluster bus over TLS), shared
/// by the test binary's tests.
pub async fn redis_cluster() -> Option<u16> {
    let port = REDIS_CLUSTER
        .get_or_init(|| async {
            let args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--tls-cluster", "yes"];
            let server = TlsRedis::start(&args).await?;
            let mut c = redis_admin(server.port).await.ok()?;
            let _: () = redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(0).arg(16383).query_async(&mut c).await.ok()?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await.ok()?;
                if info.contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!("one-node TLS cluster did not reach cluster_state:ok: {info}");
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let port = server.port;
            std::mem::forget(server);
            Some(port)
        })
        .await;
    if port.is_none() {
        skip("Redis Cluster with TLS", REDIS_HINT);
    }
    *port
}

/// A PostgreSQL cluster of the test binary's own with `ssl=on`, listening on `127.0.0.1` and
/// `127.0.0.2`, trusting every local user; dropping it stops the server (immediate shutdown) and
/// a watchdog does so anyway when the test binary exits.
#[derive(Debug)]
pub struct TlsPostgres {
    /// The port.
    pub port: u16,
    child: Child,
    watchdog: Option<Child>,
    dir: PathBuf,
}

/// `bin` run as the `postgres` user when we are root (PostgreSQL refuses to run as root);
/// `setpriv` executes it in place, so the child is the server itself.
fn as_postgres(bin: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

impl TlsPostgres {
    /// Makes a cluster with `initdb` and starts `postgres` on a free loopback port with the test
    /// server certificate, and waits until it accepts a `verify-full` connection; `None` when
    /// PostgreSQL is not installed or does not come up.
    pub async fn start() -> Option<Self> {
        let (initdb, postgres) = (find_bin("initdb")?, find_bin("postgres")?);
        let root = is_root();
        let pki = pki();
        let port = free_port(false)?;
        let dir = pki.dir.join(format!("pg-{port}"));
        std::fs::create_dir_all(&dir).ok()?;
        let cert = write_private(&dir, "server.crt", &pki.server_cert_pem)?;
        let key = write_private(&dir, "server.key", &pki.server_key_pem)?;
        if root && !Command::new("chown").args(["-R", "postgres:"]).arg(&dir).status().ok()?.success() {
            eprintln!("cannot give {} to the postgres user", dir.display());
            return None;
        }
        let data = dir.join("data");
        let out = as_postgres(&initdb, root)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        // TLS connections from any loopback address (initdb's rules cover 127.0.0.1 only).
        let hba = data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).ok()?;
        std::fs::write(&hba, format!("{rules}\nhostssl all all 127.0.0.0/8 trust\n")).ok()?;
        let log = std::fs::File::create(dir.join("postgres.log")).ok()?;
        let child = as_postgres(&postgres, root)
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args(["-c", "listen_addresses=127.0.0.1,127.0.0.2", "-c", "ssl=on", "-c", "fsync=off"])
            .arg("-c")
            .arg(format!("ssl_cert_file={}", cert.display()))
            .arg("-c")
            .arg(format!("ssl_key_file={}", key.display()))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().ok()?)
            .stderr(log)
            .spawn()
            .ok()?;
        // SIGQUIT: immediate shutdown, the server's children included.
        let watchdog = after_exit(&format!(
            "kill -QUIT {pid} 2>/dev/null; sleep 1; kill -9 {pid} 2>/dev/null; rm -rf '{dir}'",
            pid = child.id(),
            dir = dir.display()
        ));
        let mut server = Self { port, child, watchdog, dir };
        let url = server.url("127.0.0.1", "verify-full", &pki.ca_file);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&url)).await;
            if let Ok(Ok(c)) = attempt {
                let _ = c.close().await;
                return Some(server);
            }
            if Instant::now() > deadline || matches!(server.child.try_wait(), Ok(Some(_))) {
                eprintln!("PostgreSQL with TLS on port {port} did not start ({attempt:?}):\n{}", server.log());
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// `postgres://postgres@HOST:PORT/postgres?sslmode=MODE&sslrootcert=ROOT`.
    pub fn url(&self, host: &str, sslmode: &str, root: &Path) -> String {
        postgres_url(self.port, host, sslmode, root)
    }
}

/// `postgres://postgres@HOST:PORT/postgres?sslmode=MODE&sslrootcert=ROOT`.
pub fn postgres_url(port: u16, host: &str, sslmode: &str, root: &Path) -> String {
    format!("postgres://postgres@{host}:{port}/postgres?sslmode={sslmode}&sslrootcert={}", root.display())
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-QUIT").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static POSTGRES: OnceCell<Option<u16>> = OnceCell::const_new();

/// The port of a PostgreSQL server with TLS shared by the test binary's tests; `None` (after a
/// loud `SKIPPED` line) when it cannot be started.
pub async fn postgres() -> Option<u16> {
    let port = POSTGRES
        .get_or_init(|| async {
            let server = TlsPostgres::start().await?;
            let port = server.port;
            std::mem::forget(server);
            Some(port)
        })
        .await;
    if port.is_none() {
        skip(
            "PostgreSQL server with TLS",
            "install PostgreSQL (initdb and postgres on PATH or in /usr/lib/postgresql/*/bin; as root, a `postgres` user and setpriv)",
        );
    }
    *port
}
