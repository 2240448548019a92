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
//!
//! # Live switches
//!
//! Put between an application and its store (the application connects to [`FaultProxy::addr`]),
//! the proxy also acts on connections that are already open, for faults that must strike at an
//! exact moment of a request:
//!
//! - [`FaultProxy::set_flow`] sets how bytes travel in one [`Direction`] on every forwarded
//!   connection, open or new: [`Flow::Pass`], [`Flow::Blackhole`] (read and dropped without a
//!   word to either side, as in a network partition; [`FaultProxy::stall`] does it both ways), or
//!   [`Flow::Delay`] (each chunk forwarded that long after it was read, in order, so bytes sent
//!   after the delay is lifted still queue behind the late ones, as on one TCP stream);
//! - [`FaultProxy::cut`] resets every open connection (RST both ways) and resets new ones at
//!   once until [`FaultProxy::heal`], which also sets both flows back to [`Flow::Pass`];
//! - [`FaultProxy::forwarded`] counts the bytes delivered in each direction.
//!
//! The switches apply to connections forwarded as [`Fault::Pass`] or [`Fault::Delay`] (after its
//! initial wait). Bytes dropped by a blackhole are gone: lifting it does not resend them, so a
//! connection that lost bytes is of no further use to a stateful protocol. The end of a stream
//! (a side closing its connection) is still passed on.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

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

/// One direction of a forwarded connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the client (the application) to the server (the store).
    ToServer,
    /// From the server back to the client.
    ToClient,
}

/// How bytes travel in one direction, switchable while connections are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Forwarded as they come.
    Pass,
    /// Read and dropped: they never arrive and neither side is told.
    Blackhole,
    /// Each chunk forwarded this long after the proxy read it, in order.
    Delay(Duration),
}

#[derive(Debug)]
struct State {
    upstream: SocketAddr,
    queue: Mutex<VecDeque<Fault>>,
    default: Mutex<Fault>,
    accepted: AtomicUsize,
    applied: Mutex<Vec<Fault>>,
    to_server: Mutex<Flow>,
    to_client: Mutex<Flow>,
    forwarded_to_server: AtomicU64,
    forwarded_to_client: AtomicU64,
    /// While set, new connections are reset as soon as they are accepted.
    cut: AtomicBool,
    /// Bumped by every [`FaultProxy::cut`]: open connections reset when it changes.
    cuts: watch::Sender<u64>,
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

    fn flow(&self, direction: Direction) -> Flow {
        let flow = match direction {
            Direction::ToServer => &self.to_server,
            Direction::ToClient => &self.to_client,
        };
        *flow.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forwarded(&self, direction: Direction) -> &AtomicU64 {
        match direction {
            Direction::ToServer => &self.forwarded_to_server,
            Direction::ToClient => &self.forwarded_to_client,
        }
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
            to_server: Mutex::new(Flow::Pass),
            to_client: Mutex::new(Flow::Pass),
            forwarded_to_server: AtomicU64::new(0),
            forwarded_to_client: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            cuts: watch::Sender::new(0),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                if shared.cut.load(Ordering::SeqCst) {
                    let _ = client.set_zero_linger();
                    continue;
                }
                let fault = shared.next_fault();
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = handle(client, state, fault).await;
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

    /// From now on, bytes in `direction` travel as `flow` on every forwarded connection, open or
    /// new.
    pub fn set_flow(&self, direction: Direction, flow: Flow) {
        let slot = match direction {
            Direction::ToServer => &self.state.to_server,
            Direction::ToClient => &self.state.to_client,
        };
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = flow;
    }

    /// Blackholes both directions: nothing passes, on open connections or new ones, and nobody
    /// is told.
    pub fn stall(&self) {
        self.set_flow(Direction::ToServer, Flow::Blackhole);
        self.set_flow(Direction::ToClient, Flow::Blackhole);
    }

    /// Resets every open connection (RST to both sides) and, until [`heal`](Self::heal), every
    /// new one as soon as it is accepted: the server is unreachable.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.cuts.send_modify(|n| *n += 1);
    }

    /// Back to normal: new connections are forwarded again and both flows are [`Flow::Pass`].
    /// Connections reset by [`cut`](Self::cut) stay closed.
    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        self.set_flow(Direction::ToServer, Flow::Pass);
        self.set_flow(Direction::ToClient, Flow::Pass);
    }

    /// Bytes delivered so far in `direction`, over all connections.
    pub fn forwarded(&self, direction: Direction) -> u64 {
        self.state.forwarded(direction).load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(mut client: TcpStream, state: Arc<State>, fault: Fault) -> std::io::Result<()> {
    let upstream = state.upstream;
    match fault {
        Fault::Pass => relay(client, state).await,
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            relay(client, state).await
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

/// Forwards both ways under the live switches until both sides have closed, or a cut.
async fn relay(client: TcpStream, state: Arc<State>) -> std::io::Result<()> {
    let server = TcpStream::connect(state.upstream).await?;
    let (from_client, to_client) = client.into_split();
    let (from_server, to_server) = server.into_split();
    let up = tokio::spawn(pump(from_client, to_server, Direction::ToServer, state.clone()));
    let down = tokio::spawn(pump(from_server, to_client, Direction::ToClient, state));
    let _ = tokio::join!(up, down);
    Ok(())
}

/// One direction of a relayed connection: a reader that applies the direction's flow to each
/// chunk it reads, and a writer that delivers the chunks in order, each at its time. A cut resets
/// both sockets (SO_LINGER 0, then closed) and ends the pump.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, direction: Direction, state: Arc<State>) {
    let mut cuts = state.cuts.subscribe();
    cuts.mark_unchanged();
    // `None` is the end of the stream, passed on (after the chunks before it) as a shutdown.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let reader = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send((Instant::now(), None));
                    return;
                }
                Ok(n) => n,
            };
            let at = match state.flow(direction) {
                Flow::Pass => Instant::now(),
                Flow::Blackhole => continue,
                Flow::Delay(d) => Instant::now() + d,
            };
            if tx.send((at, Some(buf[..n].to_vec()))).is_err() {
                return;
            }
        }
    };
    let writer = async {
        while let Some((at, Some(chunk))) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            state.forwarded(direction).fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        let _ = to.shutdown().await;
    };
    let cut = tokio::select! {
        _ = cuts.changed() => true,
        _ = async { tokio::join!(reader, writer) } => false,
    };
    if cut {
        let _ = from.as_ref().set_zero_linger();
        let _ = to.as_ref().set_zero_linger();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that echoes every byte back.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// What comes back within `wait`: `Some(bytes)` (empty at the end of the stream or on a
    /// reset), `None` if nothing came.
    async fn read(c: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(wait, c.read(&mut buf)).await {
            Ok(Ok(n)) => Some(buf[..n].to_vec()),
            Ok(Err(_)) => Some(Vec::new()),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn live_switches_act_on_open_and_new_connections() {
        let proxy = FaultProxy::start(echo().await).await;
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"a").await.unwrap();
        assert_eq!(read(&mut c, Duration::from_secs(5)).await.as_deref(), Some(&b"a"[..]));

        proxy.stall();
        c.write_all(b"b").await.unwrap();
        assert_eq!(read(&mut c, Duration::from_millis(200)).await, None, "blackholed");
        proxy.heal();
        c.write_all(b"c").await.unwrap();
        assert_eq!(read(&mut c, Duration::from_secs(5)).await.as_deref(), Some(&b"c"[..]), "b is gone for good");

        proxy.set_flow(Direction::ToClient, Flow::Blackhole);
        c.write_all(b"d").await.unwrap();
        assert_eq!(read(&mut c, Duration::from_millis(200)).await, None);
        assert_eq!(proxy.forwarded(Direction::ToServer), 3, "a, c and d reached the server");
        assert_eq!(proxy.forwarded(Direction::ToClient), 2, "only a and c came back");

        proxy.heal();
        proxy.set_flow(Direction::ToServer, Flow::Delay(Duration::from_millis(300)));
        let sent = std::time::Instant::now();
        c.write_all(b"e").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await; // the proxy has read e under the delay
        proxy.set_flow(Direction::ToServer, Flow::Pass);
        c.write_all(b"f").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(read(&mut c, Duration::from_secs(5)).await.unwrap());
        }
        assert_eq!(got, b"ef", "order kept: f waits behind the delayed e");
        assert!(sent.elapsed() >= Duration::from_millis(300));

        proxy.cut();
        assert_eq!(read(&mut c, Duration::from_secs(5)).await.as_deref(), Some(&b""[..]), "reset");
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        let _ = refused.write_all(b"g").await;
        assert_eq!(read(&mut refused, Duration::from_secs(5)).await.as_deref(), Some(&b""[..]), "new ones too");

        proxy.heal();
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        again.write_all(b"h").await.unwrap();
        assert_eq!(read(&mut again, Duration::from_secs(5)).await.as_deref(), Some(&b"h"[..]));
    }
}
