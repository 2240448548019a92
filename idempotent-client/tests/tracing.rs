//! The middleware's `tracing` events. Alone in its test binary: a thread-local subscriber
//! shares the callsites' cached interest with every other test thread of the process, and a test
//! hitting a callsite without a subscriber at the wrong moment would hide events from this one.

mod common;

use common::{client, created, problem, quick, Reply, Server};
use idempotent_client::Outcome;
use std::sync::{Arc, Mutex};

/// A `tracing` writer that keeps everything written.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn attempts_are_traced_and_the_key_is_never_logged_in_clear() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = Server::start(vec![Reply::Close, problem(503, "about:blank", Some("0"), None), created(true)]).await;
    let secret = "order-secret-7f3a9";
    let c = client(quick().build());
    let r =
        c.post(server.url("/payments?token=abc")).header("Idempotency-Key", secret).body("{}").send().await.unwrap();
    assert_eq!(Outcome::of(&r).unwrap().attempts(), 3);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(!text.contains(secret), "the key leaked into the logs:\n{text}");
    assert!(!text.contains("token=abc"), "the query leaked into the logs:\n{text}");
    assert!(text.contains("key=sha256:"), "{text}");
    assert_eq!(text.matches("retrying under the same key").count(), 2, "{text}");
    assert!(text.contains("attempt=1") && text.contains("attempt=3"), "{text}");
    assert!(text.contains("operation answered") && text.contains("replayed=true"), "{text}");
}
