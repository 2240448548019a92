//! A TCP proxy on a loopback port that injects faults between a client and a server, one
//! connection at a time.
//!
//! Each accepted connection takes the next [`Fault`] queued with [`FaultProxy::push`], or the
//! default ([`Fault::Pass`] unless [`FaultProxy::set_default`] says otherwise):
//!
//! - [`Fault::Pass`] forwards both ways;
//! - [`Fault::Reset`] reads the client's first bytes (the request has left the client), then
//!   resets the connection without ever connecting to the server: the request never arrives;
//! - [`Fault::DropResponse`] forwards the request, waits for the server's first response bytes
//!   (the server has executed it and answered), then closes the client's connection without
//!   passing them on: a response lost mid-flight;
//! - [`Fault::Delay`] holds the connection for a while, then forwards as `Pass`.
//!
//! An HTTP client that keeps connections alive sends several requests down one connection, so
//! tests that count attempts give their client no idle pool (`pool_max_idle_per_host(0)`): one
//! request, one connection, one fault.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways.
    Pass,
    /// Reset the connection once the client has sent its first bytes, before anything reaches the
    /// server.
    Reset,
    /// Forward the request, then close the client's connection without an answer as soon as the
    /// server starts answering.
    DropResponse,
    /// Wait this long before forwarding anything, then forward both ways.
    Delay(Duration),
}

#[derive(Debug)]
struct State {
    upstream: SocketAddr,
    queue: Mutex<VecDeque<Fault>>,
    default: Mutex<Fault>,
    accepted: AtomicUsize,
    applied: Mutex<Vec<Fault>>,
}

impl State {
    fn next_fault(&self) -> Fault {
        let fault = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .unwrap_or_else(|| *self.default.lock().unwrap_or_else(|e| e.into_inner()));
        self.applied.lock().unwrap_or_else(|e| e.into_inner()).push(fault);
        fault
    }
}

/// A running fault proxy; dropping it stops accepting connections.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1:0` in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let state = Arc::new(State {
            upstream,
            queue: Mutex::new(VecDeque::new()),
            default: Mutex::new(Fault::Pass),
            accepted: AtomicUsize::new(0),
            applied: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let fault = shared.next_fault();
                let upstream = shared.upstream;
                tokio::spawn(async move {
                    let _ = handle(client, upstream, fault).await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues `fault` for the next connection that has none queued before it.
    pub fn push(&self, fault: Fault) {
        self.state.queue.lock().unwrap_or_else(|e| e.into_inner()).push_back(fault);
    }

    /// The fault of connections when the queue is empty.
    pub fn set_default(&self, fault: Fault) {
        *self.state.default.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// The fault applied to each connection accepted so far, in order.
    pub fn applied(&self) -> Vec<Fault> {
        self.state.applied.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(mut client: TcpStream, upstream: SocketAddr, fault: Fault) -> std::io::Result<()> {
    match fault {
        Fault::Pass => pass(client, upstream).await,
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            pass(client, upstream).await
        }
        Fault::Reset => {
            let mut buf = [0u8; 1];
            client.read_exact(&mut buf).await?;
            // SO_LINGER 0: closing sends RST instead of FIN.
            client.set_zero_linger()?;
            drop(client);
            Ok(())
        }
        Fault::DropResponse => {
            let server = TcpStream::connect(upstream).await?;
            let (mut from_client, _to_client) = client.into_split();
            let (mut from_server, mut to_server) = server.into_split();
            let forward = tokio::spawn(async move {
                let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
            });
            let mut first = [0u8; 1];
            // Any byte from the server means it has answered; the client never sees it.
            let _ = from_server.read(&mut first).await;
            forward.abort();
            Ok(())
        }
    }
}

async fn pass(mut client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream).await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    let _ = server.shutdown().await;
    Ok(())
}
