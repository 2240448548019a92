//! The load generator: hyper's HTTP/1 client, one keep-alive connection per client, each client
//! sending its requests one after another; and the bursts of one key on many connections.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, COOKIE, HOST, SET_COOKIE};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The request body every variant is sent.
pub const BODY: &str = r#"{"amount":100,"currency":"EUR"}"#;

/// The route measured for throughput.
pub const CHARGE: &str = "/charge";
/// The route of the duplicate-execution bursts.
pub const BURST: &str = "/burst";

/// Where a variant listens, and whether each connection needs a session first (`GET /login`,
/// whose cookie it then sends).
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub addr: SocketAddr,
    pub session: bool,
}

/// What a response said.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// The response carries a replay header (`Idempotent-Replayed: true` of ours, the peer's
    /// `idempotency-replayed: true`).
    pub replayed: bool,
    pub body: Bytes,
}

/// One keep-alive HTTP/1 connection.
pub struct Client {
    sender: SendRequest<Full<Bytes>>,
    host: HeaderValue,
    cookie: Option<HeaderValue>,
}

impl Client {
    /// Opens a connection to `addr`; its driver runs as a task of the current runtime.
    pub async fn connect(addr: SocketAddr) -> Result<Self, String> {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let host = HeaderValue::from_str(&addr.to_string()).map_err(|e| e.to_string())?;
        Ok(Self { sender, host, cookie: None })
    }

    /// Opens a connection to `target`, with a session of its own when the target needs one.
    pub async fn open(target: Target) -> Result<Self, String> {
        let mut client = Self::connect(target.addr).await?;
        if target.session {
            client.login().await?;
        }
        Ok(client)
    }

    /// `GET /login`: keeps the session cookie the server sets.
    pub async fn login(&mut self) -> Result<(), String> {
        let request = Request::builder()
            .method(Method::GET)
            .uri("/login")
            .header(HOST, self.host.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = self.send(request).await?;
        let cookie = response
            .0
            .get(SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .ok_or_else(|| format!("GET /login answered {} without a session cookie", response.1))?;
        self.cookie = Some(HeaderValue::from_str(cookie).map_err(|e| e.to_string())?);
        Ok(())
    }

    /// The session cookie of this connection, if it has one.
    pub fn cookie(&self) -> Option<HeaderValue> {
        self.cookie.clone()
    }

    /// Sends `cookie` with every later request.
    pub fn set_cookie(&mut self, cookie: Option<HeaderValue>) {
        self.cookie = cookie;
    }

    /// `POST path` with the charge body and `key` as its `Idempotency-Key`.
    pub async fn post(&mut self, path: &str, key: &str) -> Result<Answer, String> {
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("idempotency-key", key);
        if let Some(cookie) = &self.cookie {
            builder = builder.header(COOKIE, cookie.clone());
        }
        let request = builder.body(Full::new(Bytes::from_static(BODY.as_bytes()))).map_err(|e| e.to_string())?;
        let (headers, status, body) = self.send(request).await?;
        let replayed = ["idempotent-replayed", "idempotency-replayed"]
            .iter()
            .any(|name| headers.get(*name).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true")));
        Ok(Answer { status, replayed, body })
    }

    async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<(hyper::HeaderMap, StatusCode, Bytes), String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = self.sender.send_request(request).await.map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((parts.headers, parts.status, body))
    }
}

/// First executions (a fresh key per request) or replays (keys cycling over a few completed ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    First,
    Replay,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::First, Mode::Replay];

    pub fn label(self) -> &'static str {
        match self {
            Mode::First => "first",
            Mode::Replay => "replay",
        }
    }
}

/// How long a cell runs, and how many keys each client cycles over in replay mode.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub warmup: Duration,
    pub measure: Duration,
    pub replay_keys: usize,
}

/// What one cell (variant, mode, clients) measured.
#[derive(Debug, Clone, Default)]
pub struct Measured {
    /// Requests completed within the measured window.
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Answers that were not 2xx, over the whole cell (priming and warm-up included).
    pub non_2xx: u64,
    /// Requests that failed without an answer (connection errors), over the whole cell.
    pub errors: u64,
    /// Answers within the window that carried a replay header.
    pub replayed: u64,
    /// The first non-2xx status seen, with its body, to say what went wrong.
    pub first_failure: Option<String>,
    /// CPU time per request in the window of the threads that serve (every thread of this
    /// process but the load generator's), in microseconds: what a request costs the server,
    /// whatever share of the cores the load generator takes. Store servers run in processes of
    /// their own and are not counted.
    pub server_cpu_us: f64,
    /// CPU time per request in the window of the load generator's threads, in microseconds.
    pub load_cpu_us: f64,
    /// Of `server_cpu_us`, the time in the kernel (system calls, wake-ups, page faults), from the
    /// threads' `stime` in clock ticks (10 ms), in microseconds per request.
    pub server_sys_us: f64,
    /// Context switches of the serving threads per request (voluntary and not): how often a
    /// serving thread went to sleep or was preempted. A server that answers more requests per
    /// wake-up switches less per request.
    pub server_switches: f64,
}

/// CPU time this process's threads have run so far, in nanoseconds, split into the load
/// generator's (the main thread and the `compare-load` runtime's) and everyone else's (the
/// servers'), from `/proc/self/task/*/schedstat` (Linux; zeros elsewhere).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSplit {
    pub load_ns: u64,
    pub server_ns: u64,
    /// The servers' time in the kernel, in clock ticks (`/proc/self/task/*/stat`'s `stime`).
    pub server_sys_ticks: u64,
    /// The servers' context switches, voluntary and not (`/proc/self/task/*/status`).
    pub server_switches: u64,
}

impl CpuSplit {
    pub fn now() -> Self {
        let main = std::process::id().to_string();
        let mut split = Self::default();
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return split };
        for task in tasks.flatten() {
            let dir = task.path();
            let ran = std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|ns| ns.parse::<u64>().ok()));
            let Some(ns) = ran else { continue };
            let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if task.file_name().to_str() == Some(main.as_str()) || name.starts_with("compare-load") {
                split.load_ns += ns;
            } else {
                split.server_ns += ns;
                // `stat` after the command's closing parenthesis: state is field 3, stime 15.
                let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
                let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
                split.server_sys_ticks += after.split_whitespace().nth(12).and_then(|t| t.parse().ok()).unwrap_or(0);
                let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
                split.server_switches += status
                    .lines()
                    .filter(|l| l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
        split
    }
}

#[derive(Default)]
struct ClientTally {
    latencies: Vec<Duration>,
    non_2xx: u64,
    errors: u64,
    replayed: u64,
    first_failure: Option<String>,
}

impl ClientTally {
    fn note(&mut self, answer: &Result<Answer, String>) {
        match answer {
            Ok(a) if a.status.is_success() => {}
            Ok(a) => {
                self.non_2xx += 1;
                self.first_failure.get_or_insert_with(|| {
                    format!("{} {}", a.status, String::from_utf8_lossy(&a.body[..a.body.len().min(160)]))
                });
            }
            Err(e) => {
                self.errors += 1;
                self.first_failure.get_or_insert_with(|| e.clone());
            }
        }
    }
}

/// Runs one cell against `target`: `clients` connections, each priming its replay keys (replay
/// mode), then all released together for the warm-up and the measured window. Keys are
/// `{tag}-{client}-{n}`; replay keys use the tag `r` whatever the cell, so that later cells of a
/// variant find them completed.
pub async fn cell(target: Target, mode: Mode, clients: usize, timing: Timing, tag: &str) -> Measured {
    // The clients and this task, which reads the threads' CPU time at the window's ends.
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let barrier = barrier.clone();
            let tag = match mode {
                Mode::First => format!("{tag}-{client}"),
                Mode::Replay => format!("r-{client}"),
            };
            tokio::spawn(async move {
                let mut tally = ClientTally::default();
                let mut connection = Client::open(target).await;
                if let (Mode::Replay, Ok(c)) = (mode, connection.as_mut()) {
                    for k in 0..timing.replay_keys {
                        let answer = c.post(CHARGE, &format!("{tag}-{k}")).await;
                        tally.note(&answer);
                    }
                }
                barrier.wait().await;
                let start = Instant::now();
                let (from, until) = (start + timing.warmup, start + timing.warmup + timing.measure);
                let mut seq = 0usize;
                loop {
                    if Instant::now() >= until {
                        break;
                    }
                    let c = match connection.as_mut() {
                        Ok(c) => c,
                        Err(e) => {
                            tally.errors += 1;
                            tally.first_failure.get_or_insert_with(|| e.clone());
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            connection = Client::open(target).await;
                            continue;
                        }
                    };
                    let key = match mode {
                        Mode::First => format!("{tag}-{seq}"),
                        Mode::Replay => format!("{tag}-{}", seq % timing.replay_keys),
                    };
                    seq += 1;
                    let sent = Instant::now();
                    let answer = c.post(CHARGE, &key).await;
                    let done = Instant::now();
                    tally.note(&answer);
                    match answer {
                        Ok(a) => {
                            if done >= from && done < until {
                                tally.latencies.push(done - sent);
                                tally.replayed += u64::from(a.replayed);
                            }
                        }
                        Err(_) => connection = Client::open(target).await,
                    }
                }
                tally
            })
        })
        .collect();
    barrier.wait().await;
    let start = tokio::time::Instant::now();
    tokio::time::sleep_until(start + timing.warmup).await;
    let cpu_from = CpuSplit::now();
    tokio::time::sleep_until(start + timing.warmup + timing.measure).await;
    let cpu_until = CpuSplit::now();
    let mut latencies = Vec::new();
    let mut measured = Measured { seconds: timing.measure.as_secs_f64(), ..Measured::default() };
    for task in tasks {
        let tally = task.await.expect("a client task");
        latencies.extend(tally.latencies);
        measured.non_2xx += tally.non_2xx;
        measured.errors += tally.errors;
        measured.replayed += tally.replayed;
        if measured.first_failure.is_none() {
            measured.first_failure = tally.first_failure;
        }
    }
    latencies.sort_unstable();
    measured.requests = latencies.len() as u64;
    measured.rps = measured.requests as f64 / measured.seconds;
    measured.p50_ms = percentile(&latencies, 0.50);
    measured.p99_ms = percentile(&latencies, 0.99);
    let per_request = |ns: u64| ns as f64 / 1e3 / measured.requests.max(1) as f64;
    measured.server_cpu_us = per_request(cpu_until.server_ns.saturating_sub(cpu_from.server_ns));
    measured.load_cpu_us = per_request(cpu_until.load_ns.saturating_sub(cpu_from.load_ns));
    // Linux's clock tick for `stime` (USER_HZ) is 100 per second.
    let sys_ticks = cpu_until.server_sys_ticks.saturating_sub(cpu_from.server_sys_ticks);
    measured.server_sys_us = per_request(sys_ticks * 10_000_000);
    let switches = cpu_until.server_switches.saturating_sub(cpu_from.server_switches);
    measured.server_switches = switches as f64 / measured.requests.max(1) as f64;
    measured
}

/// The `q` quantile of sorted durations, in milliseconds (nearest rank).
fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e3
}

/// `n` concurrent `POST /burst` carrying one `key`, each on a fresh connection, all released
/// together once every connection is open; with a session target, all of them carry one session
/// (one client retrying). Answers the count of each status (0 for a request without an answer).
pub async fn burst(target: Target, key: &str, n: usize) -> BTreeMap<u16, u64> {
    let cookie = match target.session {
        true => match Client::open(target).await {
            Ok(c) => c.cookie(),
            Err(_) => None,
        },
        false => None,
    };
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, cookie, key) = (barrier.clone(), cookie.clone(), key.to_owned());
            tokio::spawn(async move {
                let connection = Client::connect(target.addr).await;
                barrier.wait().await;
                let mut c = connection.ok()?;
                c.set_cookie(cookie);
                c.post(BURST, &key).await.ok().map(|a| a.status.as_u16())
            })
        })
        .collect();
    let mut statuses = BTreeMap::new();
    for task in tasks {
        let status = task.await.ok().flatten().unwrap_or(0);
        *statuses.entry(status).or_insert(0) += 1;
    }
    statuses
}
