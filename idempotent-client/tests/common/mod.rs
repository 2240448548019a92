//! A scripted HTTP server on a loopback port: each connection reads one request, records it and
//! answers with the next step of a script (a response, a connection closed or reset without an
//! answer, a body cut short, or silence).

#![allow(dead_code)]

use idempotent_client::retry::FixedJitter;
use idempotent_client::IdempotencyMiddleware;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One step of a script.
#[derive(Clone)]
pub enum Reply {
    /// A whole response, then close.
    Send(String),
    /// Close without answering, after reading the request.
    Close,
    /// Reset the connection (RST), after reading the request.
    Reset,
    /// The head and the first bytes of a longer body, then close.
    Cut(String),
    /// Never answer.
    Hang,
}

pub fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut text = format!("HTTP/1.1 {status} Scripted\r\ncontent-length: {}\r\nconnection: close\r\n", body.len());
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(body);
    Reply::Send(text)
}

pub fn problem(status: u16, type_uri: &str, retry_after: Option<&str>, body_retry_after: Option<u64>) -> Reply {
    let mut body = serde_json::json!({"type": type_uri, "title": "t", "status": status, "detail": "d"});
    if let Some(s) = body_retry_after {
        body["retry_after"] = s.into();
    }
    let mut headers = vec![("content-type", "application/problem+json")];
    if let Some(r) = retry_after {
        headers.push(("retry-after", r));
    }
    response(status, &headers, &body.to_string())
}

pub fn created(replayed: bool) -> Reply {
    let headers: &[(&str, &str)] = if replayed {
        &[("content-type", "application/json"), ("idempotent-replayed", "true")]
    } else {
        &[("content-type", "application/json")]
    };
    response(201, headers, r#"{"id":"pay_1"}"#)
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub key: Option<String>,
    pub body: Vec<u8>,
}

pub struct Server {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    /// Serves `script`, one step per connection; the last step repeats.
    pub async fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for n in 0.. {
                let Ok((stream, _)) = listener.accept().await else { return };
                let reply = script[n.min(script.len() - 1)].clone();
                let log = log.clone();
                tokio::spawn(async move { serve(stream, reply, log).await });
            }
        });
        Self { addr, seen }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(mut stream: TcpStream, reply: Reply, log: Arc<Mutex<Vec<Seen>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let method = head.split_whitespace().next().unwrap_or_default().to_owned();
    let body = buf[head_end..head_end + length].to_vec();
    log.lock().unwrap().push(Seen { method, key: header("idempotency-key"), body });
    match reply {
        Reply::Send(text) => {
            let _ = stream.write_all(text.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        Reply::Close => drop(stream),
        Reply::Reset => {
            let _ = stream.set_zero_linger();
            drop(stream);
        }
        Reply::Cut(head) => {
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(b"{\"id\":").await;
            let _ = stream.flush().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Reply::Hang => tokio::time::sleep(Duration::from_secs(30)).await,
    }
}

pub fn client(middleware: IdempotencyMiddleware) -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new()).with(middleware).build()
}

/// Quick retries: a 10 ms backoff ceiling, no jitter draw.
pub fn quick() -> idempotent_client::Builder {
    IdempotencyMiddleware::builder()
        .backoff(Duration::from_millis(10), Duration::from_millis(20))
        .jitter(FixedJitter(1.0))
}

pub fn pay(c: &ClientWithMiddleware, server: &Server) -> reqwest_middleware::RequestBuilder {
    c.post(server.url("/payments")).json(&serde_json::json!({"amount": 1000}))
}
