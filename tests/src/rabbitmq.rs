//! A real RabbitMQ broker for the consumer tests, and the few things the tests do on it.
//!
//! [`amqp_url`] finds one: `IDEMPOTENT_TEST_AMQP_URL` when set, else
//! `amqp://guest:guest@127.0.0.1:5672/%2f` when it answers, else it starts the installed
//! `rabbitmq-server` (`service rabbitmq-server start`, else `rabbitmq-server -detached`) and waits
//! for it. When none can be had the tests print a loud `SKIPPED` line and pass, except under
//! `CI=true`, where that is a failure. `scripts/services.sh` installs Debian's `rabbitmq-server`
//! and starts it on 5672.
//!
//! Every test names its own queues ([`unique`]), so tests run in parallel against one broker.

use idempotent_rabbitmq::lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use idempotent_rabbitmq::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use idempotent_rabbitmq::lapin::types::FieldTable;
use idempotent_rabbitmq::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

static URL: OnceCell<Option<String>> = OnceCell::const_new();

/// The broker's default address with the default user.
pub const LOCAL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// `prefix` with a random suffix: a queue or exchange name of one test's own.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Whether the broker at `url` accepts a connection within two seconds.
pub async fn answers(url: &str) -> bool {
    let attempt = Connection::connect(url, ConnectionProperties::default());
    match tokio::time::timeout(Duration::from_secs(2), attempt).await {
        Ok(Ok(connection)) => {
            let _ = connection.close(200, "OK".into()).await;
            true
        }
        _ => false,
    }
}

/// A RabbitMQ broker for the tests, or `None` (after a loud `SKIPPED` line) when none can be
/// had. Panics under `CI=true` instead of returning `None`.
pub async fn amqp_url() -> Option<String> {
    let url = URL.get_or_init(find).await.clone();
    if url.is_none() {
        let msg = "SKIPPED: no RabbitMQ broker: set IDEMPOTENT_TEST_AMQP_URL, run rabbitmq-server on 127.0.0.1:5672 \
                   (scripts/services.sh installs and starts it)";
        assert!(!crate::redis_server::in_ci(), "{msg} (a skip is a failure under CI=true)");
        eprintln!("\n==================== {msg} ====================\n");
    }
    url
}

async fn find() -> Option<String> {
    if let Some(url) = std::env::var("IDEMPOTENT_TEST_AMQP_URL").ok().filter(|u| !u.is_empty()) {
        return Some(url);
    }
    if answers(LOCAL).await {
        return Some(LOCAL.to_owned());
    }
    let quiet = |c: &mut Command| c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
    let started = quiet(Command::new("service").args(["rabbitmq-server", "start"])).is_ok_and(|s| s.success())
        || quiet(Command::new("rabbitmq-server").arg("-detached")).is_ok_and(|s| s.success());
    if !started {
        return None;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !answers(LOCAL).await {
        if Instant::now() > deadline {
            eprintln!("rabbitmq-server did not start within 60 s");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Some(LOCAL.to_owned())
}

/// A connection and a channel with publisher confirms, for a test's publishing and reading.
pub struct Client {
    /// The connection (kept open while the client lives).
    pub connection: Connection,
    /// Its channel.
    pub channel: Channel,
}

impl Client {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Client {
        let connection = Connection::connect(url, ConnectionProperties::default()).await.expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
        Client { connection, channel }
    }

    /// Publishes `body` to `queue` through the default exchange with `props`, confirmed.
    pub async fn publish(&self, queue: &str, body: &[u8], props: BasicProperties) {
        let confirm = self.channel.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, props);
        let confirmation = confirm.await.expect("publish").await.expect("confirmation");
        assert!(confirmation.is_ack(), "the broker did not confirm the message to {queue}");
    }

    /// A JSON message to `queue`.
    pub async fn publish_json(&self, queue: &str, body: &serde_json::Value) {
        let props = BasicProperties::default().with_content_type("application/json".into());
        self.publish(queue, body.to_string().as_bytes(), props).await;
    }

    /// Declares a server-named exclusive queue (for replies) and answers its name.
    pub async fn reply_queue(&self) -> String {
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let queue = self.channel.queue_declare("".into(), options, FieldTable::default()).await.expect("reply queue");
        queue.name().as_str().to_owned()
    }

    /// The next message of `queue`, acknowledged, waiting up to `within`.
    pub async fn get(&self, queue: &str, within: Duration) -> Option<idempotent_rabbitmq::lapin::message::Delivery> {
        let deadline = Instant::now() + within;
        loop {
            let options = BasicGetOptions { no_ack: true };
            if let Some(message) = self.channel.basic_get(queue.into(), options).await.expect("basic.get") {
                return Some(message.delivery);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many messages `queue` holds ready.
    pub async fn ready(&self, queue: &str) -> u32 {
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let queue = self.channel.queue_declare(queue.into(), options, FieldTable::default()).await.expect("queue");
        queue.message_count()
    }

    /// Waits up to 20 s for `queue` to exist (a worker declares it at start-up). A passive
    /// declaration of a missing queue closes its channel, so each look is on a channel of its own.
    pub async fn await_queue(&self, queue: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let channel = self.connection.create_channel().await.expect("channel");
            let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            if channel.queue_declare(queue.into(), options, FieldTable::default()).await.is_ok() {
                let _ = channel.close(200, "OK".into()).await;
                return;
            }
            assert!(Instant::now() < deadline, "queue {queue} was never declared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Empties `queue` if it exists (on a channel of its own, which a missing queue closes).
    pub async fn purge(&self, queue: &str) {
        let channel = self.connection.create_channel().await.expect("channel");
        let options = idempotent_rabbitmq::lapin::options::QueuePurgeOptions::default();
        if channel.queue_purge(queue.into(), options).await.is_ok() {
            let _ = channel.close(200, "OK".into()).await;
        }
    }

    /// Deletes `queues` (a test's own), best effort.
    pub async fn delete(&self, queues: &[&str]) {
        for queue in queues {
            let _ = self.channel.queue_delete((*queue).into(), QueueDeleteOptions::default()).await;
        }
    }
}

/// Closes, from the broker's side, every connection named `name` (the worker of queue `q` names
/// its connection `idempotent-rabbitmq q`), with `rabbitmqctl`: a network cut as the worker sees
/// it. Answers how many it closed.
pub fn close_connections(name: &str) -> usize {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "--no-table-headers", "--silent", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl list_connections");
    let listing = String::from_utf8_lossy(&out.stdout);
    let pids: Vec<&str> = listing
        .lines()
        .filter(|line| line.contains(&format!("\"{name}\"")))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    for pid in &pids {
        let status = Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by the test"])
            .stdout(Stdio::null())
            .status()
            .expect("rabbitmqctl close_connection");
        assert!(status.success(), "rabbitmqctl close_connection {pid} failed");
    }
    pids.len()
}
