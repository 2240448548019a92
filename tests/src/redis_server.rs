//! Real Redis servers for the store tests.
//!
//! [`redis_url`] finds a single node: `IDEMPOTENT_TEST_REDIS_URL` when set, else
//! `redis://127.0.0.1:6379` when it answers `PING`, else a `redis-server` from `PATH` started on a
//! free loopback port (without persistence). [`redis_cluster`] starts a three-master Redis Cluster
//! on loopback ports, once per test binary, shared by its tests; a test that changes a cluster's
//! topology starts one of its own ([`crate::redis_cluster::RedisCluster`]). When no server can be had the tests print a loud
//! `SKIPPED` line and pass — except under `CI=true`, where that is a failure.
//!
//! Servers started here run in the foreground as child processes, each in its own temporary
//! directory. A small `sh` watchdog per process polls the test binary's pid and kills the server
//! and removes its directory once the binary has exited, so nothing is left running.
//!
//! Every test uses its own random key prefix ([`test_prefix`]), so tests run in parallel against
//! one server.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

static SINGLE: OnceCell<Option<String>> = OnceCell::const_new();
static CLUSTER: OnceCell<Option<Vec<String>>> = OnceCell::const_new();

/// A fresh key prefix, unique to the calling test.
pub fn test_prefix() -> String {
    format!("idemtest:{}:", uuid::Uuid::new_v4().simple())
}

/// Whether an unavailable server must fail the run (`CI=true`) rather than skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Prints a loud `SKIPPED` line saying what is missing and how to provide it (`hint`), or panics
/// under `CI=true`.
pub(crate) fn skip(what: &str, hint: &str) {
    let msg = format!("SKIPPED: no Redis {what}: {hint}");
    if in_ci() {
        panic!("{msg} (a skip is a failure under CI=true)");
    }
    eprintln!("\n==================== {msg} ====================\n");
}

/// Whether the server at `url` answers `PING` within a second.
pub async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else { return false };
    let attempt = async {
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING").query_async::<String>(&mut c).await.ok()
    };
    matches!(tokio::time::timeout(Duration::from_secs(1), attempt).await, Ok(Some(p)) if p == "PONG")
}

/// A single Redis node for the tests, or `None` (after a loud `SKIPPED` line) when none can be
/// had. Panics under `CI=true` instead of returning `None`.
pub async fn redis_url() -> Option<String> {
    let url = SINGLE
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("IDEMPOTENT_TEST_REDIS_URL") {
                if !url.is_empty() {
                    return Some(url);
                }
            }
            let local = "redis://127.0.0.1:6379".to_owned();
            if ping(&local).await {
                return Some(local);
            }
            let server = RedisProcess::start(free_port(false)?, &[]).await?;
            let url = server.url();
            // Kept running until the test binary exits (see the module docs).
            std::mem::forget(server);
            Some(url)
        })
        .await
        .clone();
    if url.is_none() {
        skip(
            "server",
            "set IDEMPOTENT_TEST_REDIS_URL, run redis-server on 127.0.0.1:6379, or put redis-server on PATH",
        );
    }
    url
}

/// A three-master Redis Cluster on loopback ports, as `redis://127.0.0.1:PORT` seed URLs, started
/// once per test binary; `None` (after a loud `SKIPPED` line) when it cannot be started. Panics
/// under `CI=true` instead of returning `None`.
pub async fn redis_cluster() -> Option<Vec<String>> {
    let nodes = CLUSTER.get_or_init(start_cluster).await.clone();
    if nodes.is_none() {
        skip("cluster", "put redis-server and redis-cli on PATH (the cluster is started from them)");
    }
    nodes
}

async fn start_cluster() -> Option<Vec<String>> {
    let cluster = crate::redis_cluster::RedisCluster::try_start(3, 0, &[]).await?;
    let urls = cluster.urls();
    // Kept running until the test binary exits (see the module docs).
    std::mem::forget(cluster);
    Some(urls)
}

/// A free loopback port; with `bus`, one whose cluster bus port (`port + 10000`) is free too.
pub fn free_port(bus: bool) -> Option<u16> {
    for _ in 0..200 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
        let port = l.local_addr().ok()?.port();
        if !bus {
            return Some(port);
        }
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Some(port);
        }
    }
    None
}

/// A `redis-server` child process started by the tests, without persistence, in its own
/// temporary directory. Dropping it kills the server; a watchdog kills it anyway when the test
/// binary exits.
#[derive(Debug)]
pub struct RedisProcess {
    /// The loopback port it listens on.
    pub port: u16,
    child: Child,
    watchdog: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
}

fn spawn(port: u16, dir: &std::path::Path, extra: &[String]) -> Option<(Child, Option<Child>)> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("redis.log")).ok()?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().ok()?)
        .stderr(log)
        .spawn()
        .ok()?;
    let watchdog = watchdog(child.id(), dir);
    Some((child, watchdog))
}

impl RedisProcess {
    /// Starts `redis-server` from `PATH` on `port` with `extra` arguments and waits until it
    /// answers `PING`; `None` when it is not installed or does not come up.
    pub async fn start(port: u16, extra: &[&str]) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!("idempotent-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let (child, watchdog) = spawn(port, &dir, &extra)?;
        let mut server = Self { port, child, watchdog, dir, extra };
        server.wait_up().await.then_some(server)
    }

    /// Kills the server (SIGKILL) and starts it again on the same port, directory and arguments,
    /// as a crash and a restart by a supervisor: with `--appendonly yes` among the arguments its
    /// records survive. Answers whether it came back.
    pub async fn restart(&mut self) -> bool {
        self.kill();
        match spawn(self.port, &self.dir, &self.extra) {
            Some((child, watchdog)) => {
                (self.child, self.watchdog) = (child, watchdog);
                self.wait_up().await
            }
            None => false,
        }
    }

    async fn wait_up(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(&self.url()).await {
            if Instant::now() > deadline || matches!(self.child.try_wait(), Ok(Some(_))) {
                eprintln!("redis-server on port {} did not start; log in {}", self.port, self.dir.display());
                self.kill();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGSTOP) without closing anything: its kernel still accepts connections
    /// and acknowledges what is sent, but nothing is answered until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Lets a [paused](Self::pause) server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} {}", self.child.id());
    }

    /// Kills the server (SIGKILL: no shutdown, no goodbye to clients) and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills `pid` and removes `dir` once this test binary has exited.
fn watchdog(pid: u32, dir: &std::path::Path) -> Option<Child> {
    crate::process::after_exit(&format!("kill -9 {pid} 2>/dev/null; rm -rf '{}'", dir.display()))
}
