//! A model-based property test of the execution state machine: the real engine and memory store
//! on a virtual clock, driven by random interleavings of requests on one key whose handlers
//! finish (with a stored or a released outcome), panic, crash (their task is dropped, as when a
//! process dies) or run on while time passes, lease renewals included.
//!
//! Invariants:
//! - two handlers of one key never run at the same time;
//! - once an outcome is stored, every later request replays exactly that response and no handler
//!   runs again;
//! - a request never waits for ever: when every handler has ended and the leases have run out, a
//!   request replays the stored outcome or runs.

use bytes::Bytes;
use idempotent_core::engine::{Captured, Config, Outcome, Request, Runtime};
use idempotent_core::fingerprint::FingerprintBuilder;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::policy::Policy;
use idempotent_core::response::StoredResponse;
use idempotent_core::store::MemoryStore;
use proptest::prelude::*;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const LEASE: Duration = Duration::from_millis(600);
static POLICY: Policy = Policy { lease: LEASE, ..Policy::new("model.key") };

/// What the test does next.
#[derive(Debug, Clone)]
enum Step {
    /// A new request with the key arrives.
    Start,
    /// Handler `n` (of those started, modulo their number) returns 201 (stored) or 503 (released).
    Finish(usize, bool),
    /// Handler `n` panics.
    Panic(usize),
    /// The request running handler `n` is dropped with its task: a crash.
    Crash(usize),
    /// Virtual time passes.
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Start),
        2 => (0..8usize, any::<bool>()).prop_map(|(n, stored)| Step::Finish(n, stored)),
        1 => (0..8usize).prop_map(Step::Panic),
        1 => (0..8usize).prop_map(Step::Crash),
        3 => prop_oneof![1..200u64, 200..2000u64].prop_map(Step::Advance),
    ]
}

enum Command {
    Return(bool),
    Panic,
}

/// Which handlers are running; a handler that starts while another runs is recorded.
#[derive(Default)]
struct Running {
    now: BTreeSet<usize>,
    overlaps: Vec<(usize, BTreeSet<usize>)>,
}

/// Leaves the running set when the handler ends, however it ends (a crash drops it).
struct Presence(Arc<Mutex<Running>>, usize);

impl Drop for Presence {
    fn drop(&mut self) {
        self.0.lock().unwrap().now.remove(&self.1);
    }
}

struct Live {
    task: JoinHandle<Outcome<usize>>,
    command: Option<oneshot::Sender<Command>>,
}

struct Model {
    runtime: Runtime,
    running: Arc<Mutex<Running>>,
    started: Arc<Mutex<BTreeSet<usize>>>,
    live: HashMap<usize, Live>,
    order: Vec<usize>,
    stored: Option<usize>,
    next: usize,
}

fn request() -> Request {
    Request {
        key: IdempotencyKey::parse(b"k").map(Some),
        actor: None,
        fingerprint: Ok(FingerprintBuilder::new("model.key").field("n", &1).unwrap().finish()),
    }
}

impl Model {
    fn new() -> Self {
        let config = Config { store_timeout: Duration::from_millis(100), ..Config::default() };
        Self {
            runtime: Runtime::new(Arc::new(MemoryStore::new()), config),
            running: Arc::default(),
            started: Arc::default(),
            live: HashMap::new(),
            order: Vec::new(),
            stored: None,
            next: 0,
        }
    }

    /// Sends request `id` and runs until its handler started or it was answered.
    async fn start(&mut self) -> Result<(), TestCaseError> {
        let id = self.next;
        self.next += 1;
        let (tx, rx) = oneshot::channel::<Command>();
        let (running, started) = (self.running.clone(), self.started.clone());
        let handler = async move {
            let _presence = {
                let mut r = running.lock().unwrap();
                if !r.now.is_empty() {
                    let others = r.now.clone();
                    r.overlaps.push((id, others));
                }
                r.now.insert(id);
                started.lock().unwrap().insert(id);
                Presence(running.clone(), id)
            };
            let stored = match rx.await {
                Ok(Command::Return(stored)) => stored,
                Ok(Command::Panic) => panic!("handler {id} panics"),
                Err(_) => std::future::pending().await,
            };
            let status = if stored { 201 } else { 503 };
            let record = StoredResponse::new(status, Vec::<(&str, &str)>::new(), Bytes::from(id.to_string()));
            Captured::new(record, id)
        };
        let runtime = self.runtime.clone();
        let task = tokio::spawn(async move { runtime.execute(&POLICY, request(), handler).await });
        loop {
            if self.started.lock().unwrap().contains(&id) {
                self.live.insert(id, Live { task, command: Some(tx) });
                self.order.push(id);
                prop_assert!(
                    self.stored.is_none(),
                    "handler {id} ran after request {:?} stored its outcome",
                    self.stored
                );
                return Ok(());
            }
            if task.is_finished() {
                let outcome = task.await.unwrap();
                return self.answered(id, outcome);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A request that was answered without running its handler.
    fn answered(&self, id: usize, outcome: Outcome<usize>) -> Result<(), TestCaseError> {
        match (outcome, self.stored) {
            (Outcome::Replayed(stored), Some(winner)) => {
                let expected = winner.to_string();
                prop_assert_eq!(&stored.body[..], expected.as_bytes(), "request {} replays the stored outcome", id);
            }
            (Outcome::Replayed(stored), None) => {
                prop_assert!(false, "request {id} replayed {stored:?} but nothing was stored");
            }
            (Outcome::Problem(p), None) => {
                prop_assert_eq!(p.status, 409, "request {}: {:?}", id, p);
            }
            (other, stored) => prop_assert!(false, "request {id}: {other:?} with {stored:?} stored"),
        }
        Ok(())
    }

    fn pick(&self, n: usize) -> Option<usize> {
        let open: Vec<usize> = self.order.iter().copied().filter(|id| self.live.contains_key(id)).collect();
        (!open.is_empty()).then(|| open[n % open.len()])
    }

    async fn finish(&mut self, n: usize, command: Command) -> Result<(), TestCaseError> {
        let Some(id) = self.pick(n) else { return Ok(()) };
        let mut live = self.live.remove(&id).unwrap();
        let stored = matches!(command, Command::Return(true));
        let _ = live.command.take().unwrap().send(command);
        let outcome = live.task.await.unwrap();
        match outcome {
            Outcome::Executed(got) => {
                prop_assert_eq!(got, id);
                if stored {
                    prop_assert!(self.stored.is_none(), "two outcomes stored: {:?} then {}", self.stored, id);
                    self.stored = Some(id);
                }
            }
            Outcome::Problem(p) => prop_assert_eq!(p.status, 500, "a panicking handler is a 500: {:?}", p),
            Outcome::Replayed(r) => prop_assert!(false, "handler {id} ran, yet its request replayed {r:?}"),
        }
        Ok(())
    }

    fn crash(&mut self, n: usize) {
        if let Some(id) = self.pick(n) {
            self.live.remove(&id).unwrap().task.abort();
        }
    }

    async fn run(&mut self, steps: Vec<Step>) -> Result<(), TestCaseError> {
        for step in steps {
            match step {
                Step::Start => self.start().await?,
                Step::Finish(n, stored) => self.finish(n, Command::Return(stored)).await?,
                Step::Panic(n) => self.finish(n, Command::Panic).await?,
                Step::Crash(n) => self.crash(n),
                Step::Advance(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            }
            let overlaps = &self.running.lock().unwrap().overlaps;
            prop_assert!(overlaps.is_empty(), "handlers ran at the same time: {overlaps:?}");
        }
        // Every handler ends; once the leases of crashed requests have run out, a request
        // replays the stored outcome or runs.
        while let Some(id) = self.pick(0) {
            self.finish(id, Command::Return(false)).await?;
        }
        tokio::time::sleep(LEASE * 2).await;
        let before = self.next;
        self.start().await?;
        let ran = self.started.lock().unwrap().contains(&before);
        prop_assert_eq!(
            ran,
            self.stored.is_none(),
            "after everything ended: ran {} with {:?} stored",
            ran,
            self.stored
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn one_key_never_runs_twice_at_once_and_replays_one_outcome(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async move { Model::new().run(steps).await })?;
    }
}
