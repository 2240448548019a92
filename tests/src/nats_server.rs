//! A real NATS server with JetStream for the consumer tests.
//!
//! [`nats_url`] finds one: `IDEMPOTENT_TEST_NATS_URL` when set, else `nats://127.0.0.1:4222` when
//! it answers with JetStream enabled, else a `nats-server -js` from `PATH` started on a free
//! loopback port with its store in a temporary directory (a watchdog kills it and removes the
//! directory once the test binary has exited). When none can be had the tests print a loud
//! `SKIPPED` line and pass, except under `CI=true`, where that is a failure.
//! `scripts/services.sh` installs and starts one on 4222 (Debian's `nats-server`).
//!
//! Every test names its own streams and consumers ([`unique`]), so tests run in parallel
//! against one server.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

static URL: OnceCell<Option<String>> = OnceCell::const_new();

/// `prefix` with a random suffix: a stream, consumer or subject name of one test's own.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Whether the server at `url` accepts a connection and has JetStream, within two seconds: its
/// JetStream API answers an account info request (asked raw, so any server version answers in a
/// form this reads).
pub async fn has_jetstream(url: &str) -> bool {
    let attempt = async {
        let client = async_nats::connect(url).await.ok()?;
        let answer = client.request("$JS.API.INFO", "".into()).await.ok()?;
        let info: serde_json::Value = serde_json::from_slice(&answer.payload).ok()?;
        info.get("error").is_none().then_some(())
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Some(())))
}

/// A NATS server with JetStream for the tests, or `None` (after a loud `SKIPPED` line) when none
/// can be had. Panics under `CI=true` instead of returning `None`.
pub async fn nats_url() -> Option<String> {
    let url = URL.get_or_init(find).await.clone();
    if url.is_none() {
        let msg = "SKIPPED: no NATS server with JetStream: set IDEMPOTENT_TEST_NATS_URL, run `nats-server -js` on \
                   127.0.0.1:4222 (scripts/services.sh does), or put nats-server on PATH";
        assert!(!crate::redis_server::in_ci(), "{msg} (a skip is a failure under CI=true)");
        eprintln!("\n==================== {msg} ====================\n");
    }
    url
}

async fn find() -> Option<String> {
    if let Some(url) = std::env::var("IDEMPOTENT_TEST_NATS_URL").ok().filter(|u| !u.is_empty()) {
        return Some(url);
    }
    let local = "nats://127.0.0.1:4222".to_owned();
    if has_jetstream(&local).await {
        return Some(local);
    }
    let port = crate::redis_server::free_port(false)?;
    let dir = std::env::temp_dir().join(format!("idempotent-nats-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let child = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    crate::process::after_exit(&format!("kill -9 {} 2>/dev/null; rm -rf '{}'", child.id(), dir.display()));
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !has_jetstream(&url).await {
        if Instant::now() > deadline {
            eprintln!("nats-server on port {port} did not start");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Some(url)
}
