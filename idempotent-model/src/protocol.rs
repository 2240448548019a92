//! The claim protocol as a stateright [`Model`]: workers that claim one key, run the handler, renew
//! the lease, store or release the outcome and crash, over a network that loses and delays
//! messages, against one store record.
//!
//! # What a worker does
//! Each step is one of the engine's ([`idempotent_core::engine`]):
//! - a request (client attempt) sends a claim with a fresh token, waiting at most the store
//!   timeout for the answer; no answer in time is a 503 and the client tries again later, with a
//!   new token (the claim may still reach the store, late, and hold the key under the old one);
//!   in progress or a mismatch also ends the attempt; a stored outcome is replayed;
//! - once acquired, the lease is vouched for from the claim's send time plus the lease, and the
//!   keeper renews it every renewal period on the worker's own clock from when the answer came; a
//!   renewal confirmed extends the vouched time to its send time plus the lease, a fenced one marks
//!   the claim lost, one without an answer in time changes nothing;
//! - the handler ends at any moment; its outcome is stored (or, for a retryable outcome, the
//!   claim released). Storing is retried after each attempt without an answer, with the engine's
//!   waits, and abandoned once the claim is known lost; a fenced answer ends it;
//! - a worker may crash at any moment; whatever it had sent may still reach the store.
//!
//! A worker *believes it holds the claim* while its handler runs, its claim is not known lost and
//! its own clock is before the vouched time less the safety margin: what
//! [`ClaimFence::check`](idempotent_core::engine::ClaimFence::check) answers the handler. (Once the
//! handler has ended, what the worker writes is fenced by the store: the outcome properties.)
//!
//! # Time
//! A tick advances the store's clock by one; each worker's clock by one, or by none or two while it
//! stays within `drift` ticks of the store's. Timers are on time by their own clock: no tick passes
//! while a renewal, a completion attempt or a timeout is due.
//!
//! Every time in the state is counted from the store's clock's present (a tick moves them all one
//! back), and a time long past is the same as any other time as far past: so the state space is
//! finite without a horizon, and a run may go on for as long as it likes (a stray request may
//! arrive any time later). Storing an outcome is retried with the engine's waits and never given
//! up: giving up after the completion patience is one of the moments a crash may stop a worker,
//! and the model lets a worker crash at any moment.
//!
//! # Properties
//! See [`Protocol::properties`]: never two workers that believe they hold the claim; an outcome
//! is only ever stored by the token holding the claim, and only one; every replay is of that one
//! outcome; and, so that none of this holds vacuously, a takeover, a fenced completion and a replay
//! each happen in some run.
//!
//! # The fault budget
//! In the fault budget mode ([`Protocol::fault_budget`]) at most `k` renewals of a claim fail in
//! a row (lost, late, or left on the wire when the keeper sends the next), and the next one is
//! applied and answered within the store timeout; workers do not crash. Then also: no claim is
//! acquired while another token's handler runs or stores its outcome. The engine's budget is
//! [`Timing::renewal_failures_tolerated`]: the suite checks that it holds and that one failure
//! more does not.

use crate::store::{step, Answer, Op, Record, Rules, Tick, Token};
use crate::timing::Timing;
use stateright::{Model, Property};

/// What is checked: the engine, or a variant that must fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The engine as it is.
    Engine,
    /// A lease vouched for from the time its answer arrived instead of when it was sent.
    DeadlineFromReply,
    /// A safety margin one tick short of twice the drift.
    MarginBelowTwiceDrift,
    /// A store whose completion does not check the token.
    UnfencedCompletion,
}

/// One configuration to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Protocol {
    /// How many workers claim the key (at most 4).
    pub workers: u8,
    /// Client attempts per worker, each with its own token (at most 4).
    pub attempts: u8,
    /// The durations, in ticks.
    pub timing: Timing,
    /// Whether workers may crash.
    pub crashes: bool,
    /// The most ticks a run may last (`None`: no bound; the state space is finite anyway): a
    /// bound makes a smaller check of the runs that fit in it.
    pub horizon: Option<u8>,
    /// Engine or variant.
    pub variant: Variant,
    /// The fault budget mode: `None`, every renewal may fail (the engine's model: a live handler
    /// may lose its claim, and the fence keeps it from writing); `Some(k)`, at most `k` renewals
    /// of a claim fail in a row, and the next one is applied and answered within the store
    /// timeout. Then property `live handler keeps its claim` is checked too.
    pub renewal_failures: Option<u8>,
}

impl Protocol {
    /// The engine's protocol with `workers` workers of `attempts` attempts each, clocks up to
    /// `drift` ticks off.
    pub fn engine(workers: u8, attempts: u8, drift: Tick) -> Self {
        let timing = Timing::engine(drift);
        // Storing an outcome goes on past the lease: late completions are part of the protocol.
        assert!(timing.completion_patience > timing.lease);
        Protocol {
            workers,
            attempts,
            timing,
            crashes: true,
            horizon: None,
            variant: Variant::Engine,
            renewal_failures: None,
        }
    }

    /// The fault budget mode ([`Protocol::renewal_failures`]): `workers` workers of one attempt
    /// each, clocks up to `drift` ticks off, no crashes (a crashed handler is not live), at most
    /// `failures` renewals failing in a row; every other request may still be lost or late, and
    /// storing an outcome is retried.
    pub fn fault_budget(workers: u8, drift: Tick, failures: u8) -> Self {
        Protocol { crashes: false, renewal_failures: Some(failures), ..Protocol::engine(workers, 1, drift) }
    }

    /// The same with `variant`.
    pub fn with(mut self, variant: Variant) -> Self {
        self.variant = variant;
        if variant == Variant::MarginBelowTwiceDrift {
            self.timing.margin = 2 * self.timing.drift - 1;
        }
        self
    }

    fn rules(&self) -> Rules {
        Rules { fenced_completion: self.variant != Variant::UnfencedCompletion }
    }

    fn token(&self, worker: usize, attempt: u8) -> Token {
        worker as Token * self.attempts + attempt
    }
}

/// Where a request or its answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Wire {
    /// On its way to the store.
    Sent,
    /// Applied; the answer on its way back.
    Answered(Answer),
    /// The request or its answer was lost: only the timeout ends the wait.
    Lost,
}

/// A store operation a worker waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Call {
    /// The operation.
    pub op: Op,
    /// When it was sent, by the worker's clock, from now.
    pub sent: Tick,
    /// Where it is.
    pub wire: Wire,
}

/// A worker's claim, once acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hold {
    /// The claim's token.
    pub token: Token,
    /// Until when (worker's clock, from now) the store is known to hold the lease.
    pub vouched: Tick,
    /// A renewal was fenced: the claim was taken over.
    pub lost: bool,
    /// When the keeper renews next (worker's clock, from now).
    pub next_renewal: Tick,
}

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Between client attempts.
    Idle,
    /// Waiting for its claim's answer.
    Claiming,
    /// The handler runs.
    Running,
    /// Storing the outcome: `attempt` attempts made, the next at `retry_at`.
    Completing {
        /// Attempts made so far (counted up to the last distinct wait).
        attempt: u8,
        /// When the next attempt is due (worker's clock, from now); `None` while one is on the
        /// wire.
        retry_at: Option<Tick>,
    },
    /// Releasing the claim.
    Releasing,
    /// The request is over.
    Finished,
    /// Crashed.
    Crashed,
}

/// One worker (a process serving one request at a time for the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Worker {
    /// Its clock less the store's.
    pub offset: Tick,
    /// Client attempts made.
    pub attempts: u8,
    /// What it does.
    pub phase: Phase,
    /// Its claim, once acquired.
    pub hold: Option<Hold>,
    /// The claim, completion or release it waits for.
    pub call: Option<Call>,
    /// The renewal it waits for.
    pub renewal: Option<Call>,
    /// Renewals of its claim that failed in a row (counted in the fault budget mode only).
    pub failed: u8,
}

/// The whole system: the key's record, the workers, the requests nobody waits for any more, and
/// what has happened so far. Times are counted from now, by the store's clock.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    /// The key's record.
    pub record: Record,
    /// The workers.
    pub workers: Vec<Worker>,
    /// Requests still on the wire whose sender stopped waiting (timed out, finished or crashed);
    /// kept sorted, each once (a second copy of a request changes nothing the first could not).
    pub strays: Vec<Op>,
    /// Ticks so far, counted only under a [`Protocol::horizon`].
    pub ticks: u8,
    /// The outcome the first replay answered, once one did.
    pub first_replay: Option<Token>,
    /// What the last step did that the properties look at ([`Event`] bits); cleared by the next
    /// step, so that a past event does not split every later state in two.
    pub events: u8,
}

/// What a step did, as bits of [`State::events`].
#[derive(Debug)]
pub struct Event;

impl Event {
    /// A claim took over another token's claim.
    pub const TAKEOVER: u8 = 1;
    /// A completion was fenced by another token's claim.
    pub const FENCED_COMPLETION: u8 = 2;
    /// A claim was answered with a stored outcome.
    pub const REPLAY: u8 = 4;
    /// A replay answered another outcome than the first replay did.
    pub const WRONG_REPLAY: u8 = 8;
    /// An outcome was written by a token that did not hold the claim.
    pub const FOREIGN_WRITE: u8 = 16;
    /// An outcome was written over another.
    pub const SECOND_OUTCOME: u8 = 32;
    /// A claim was acquired while another token's handler ran or stored its outcome.
    pub const LIVE_TAKEOVER: u8 = 64;
}

/// One step of the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Time passes: the store's clock by one, worker `i`'s by one plus the `i`-th of the choices
    /// encoded in base 3 (`0`: one, `1`: none, `2`: two).
    Tick(u16),
    /// The worker starts a client attempt: sends a claim.
    Claim(usize),
    /// The worker's handler ends; its outcome is stored (`true`) or released.
    HandlerDone(usize, bool),
    /// The worker sends the next attempt to store its outcome.
    Complete(usize),
    /// The worker's keeper sends a renewal.
    Renew(usize),
    /// The store applies the worker's request (`true`: the renewal).
    Apply(usize, bool),
    /// The request or its answer is lost.
    Lose(usize, bool),
    /// The worker receives the answer.
    Receive(usize, bool),
    /// The worker stops waiting.
    Timeout(usize, bool),
    /// The store applies a stray request.
    ApplyStray(usize),
    /// A stray request is lost.
    DropStray(usize),
    /// The worker crashes.
    Crash(usize),
}

impl Worker {
    fn clock(&self) -> Tick {
        self.offset
    }

    fn slot(&self, renewal: bool) -> Option<Call> {
        if renewal {
            self.renewal
        } else {
            self.call
        }
    }

    fn slot_mut(&mut self, renewal: bool) -> &mut Option<Call> {
        if renewal {
            &mut self.renewal
        } else {
            &mut self.call
        }
    }

    /// Whether the keeper still renews: from the claim until the outcome is stored or released.
    fn keeping(&self) -> bool {
        matches!(self.phase, Phase::Running | Phase::Completing { .. } | Phase::Releasing)
            && self.hold.is_some_and(|h| !h.lost)
    }
}

impl Protocol {
    /// Whether worker `w` believes it holds the claim in `s`.
    pub fn believes(&self, s: &State, w: usize) -> bool {
        let worker = &s.workers[w];
        worker.phase == Phase::Running
            && worker.keeping()
            && worker.hold.is_some_and(|h| worker.clock() < h.vouched - self.timing.margin)
    }

    /// Whether `worker`'s renewal on the wire must succeed: the fault budget is spent.
    fn must_renew(&self, worker: &Worker) -> bool {
        self.renewal_failures.is_some_and(|k| worker.failed >= k)
    }

    /// A renewal of `worker` ended without being confirmed.
    fn renewal_failed(&self, worker: &mut Worker) {
        if self.renewal_failures.is_some() {
            worker.failed = worker.failed.saturating_add(1);
        }
    }

    /// Something due at `s` that time may not pass.
    fn due(&self, s: &State) -> bool {
        s.workers.iter().any(|w| {
            let clock = w.clock();
            let timeout = [w.call, w.renewal].iter().flatten().any(|c| clock > c.sent + self.timing.store_timeout);
            // A renewal that must succeed is answered by the end of the store timeout.
            let owed = self.must_renew(w) && w.renewal.is_some_and(|c| clock >= c.sent + self.timing.store_timeout);
            let renewal = w.keeping() && w.hold.is_some_and(|h| clock >= h.next_renewal);
            let completion = matches!(w.phase, Phase::Completing { retry_at: Some(at), .. } if clock >= at);
            timeout || renewal || completion || owed
        })
    }

    /// The store applies `op` to the record, noting what the properties look at.
    fn apply(&self, s: &mut State, op: Op) -> Answer {
        let before = s.record;
        let (after, answer) = step(before, op, 0, self.timing.lease, self.rules());
        if let (Op::Claim { token, .. }, Answer::Acquired, Some(_)) = (op, answer, self.renewal_failures) {
            let live = |w: &Worker| {
                matches!(w.phase, Phase::Running | Phase::Completing { .. }) && w.hold.is_some_and(|h| h.token != token)
            };
            if s.workers.iter().any(live) {
                s.events |= Event::LIVE_TAKEOVER;
            }
        }
        match (op, before, answer) {
            (Op::Claim { token, .. }, Record::Held { token: held, .. }, Answer::Acquired) if held != token => {
                s.events |= Event::TAKEOVER;
            }
            (Op::Claim { .. }, _, Answer::Completed { by }) => {
                s.events |= Event::REPLAY;
                if *s.first_replay.get_or_insert(by) != by {
                    s.events |= Event::WRONG_REPLAY;
                }
            }
            (Op::Complete { token }, _, Answer::Fenced) => {
                if matches!(before, Record::Held { token: held, .. } | Record::Done { token: held, .. } if held != token)
                {
                    s.events |= Event::FENCED_COMPLETION;
                }
            }
            _ => {}
        }
        if let (Record::Done { token, .. }, false) = (after, before == after) {
            if !matches!(before, Record::Held { token: held, .. } if held == token) {
                s.events |= Event::FOREIGN_WRITE;
            }
            // The model's store never forgets an outcome: one written over another is a second.
            if matches!(before, Record::Done { .. }) {
                s.events |= Event::SECOND_OUTCOME;
            }
        }
        s.record = after;
        answer
    }

    /// Forgets what can no longer matter, so that states that differ only in it are one:
    /// - the vouched time and renewal schedule of a claim known lost (nothing renews or believes
    ///   in it any more), and the clock of a worker that is done;
    /// - stray renewals, completions and releases of a token that can never hold the record
    ///   again: it does not hold it now, and no claim of it is on the wire (with the store's
    ///   fenced completion only: without it a stray completion still writes).
    fn canonical(&self, s: &mut State) {
        for worker in &mut s.workers {
            if let Some(hold) = worker.hold.as_mut().filter(|h| h.lost) {
                hold.vouched = self.floor();
                hold.next_renewal = 0;
            }
            if !worker.keeping() {
                worker.failed = 0;
            }
            let done = matches!(worker.phase, Phase::Finished | Phase::Crashed)
                || (worker.phase == Phase::Idle && worker.attempts == self.attempts);
            if done {
                worker.offset = 0;
                worker.phase = Phase::Finished;
            }
        }
        if !self.rules().fenced_completion {
            return;
        }
        let claims: Vec<Token> = s
            .strays
            .iter()
            .chain(s.workers.iter().filter_map(|w| w.call.as_ref().filter(|c| c.wire == Wire::Sent).map(|c| &c.op)))
            .filter_map(|op| match op {
                Op::Claim { token, .. } => Some(*token),
                _ => None,
            })
            .collect();
        let record = s.record;
        s.strays.retain(|op| match op {
            Op::Renew { token } | Op::Complete { token } | Op::Release { token } => {
                matches!(record, Record::Held { token: held, .. } if held == *token) || claims.contains(token)
            }
            _ => true,
        });
    }

    /// One tick of the store's clock: every time in the state moves one back (a time long past
    /// stays at [`Self::floor`]), and each worker's clock by the `choice` of its drift.
    fn tick(&self, s: &mut State, mut choice: u16) {
        let floor = self.floor();
        let back = |t: &mut Tick| *t = (*t - 1).max(floor);
        if let Record::Held { deadline, .. } = &mut s.record {
            *deadline = (*deadline - 1).max(0);
        }
        for worker in &mut s.workers {
            worker.offset += [0, -1, 1][usize::from(choice % 3)];
            choice /= 3;
            if let Some(hold) = &mut worker.hold {
                back(&mut hold.vouched);
                back(&mut hold.next_renewal);
            }
            for call in [&mut worker.call, &mut worker.renewal].into_iter().flatten() {
                back(&mut call.sent);
            }
            if let Phase::Completing { retry_at: Some(at), .. } = &mut worker.phase {
                back(at);
            }
        }
    }

    /// A time so far past that every comparison the model makes with it comes out as with any
    /// earlier one: before any worker's clock less the margin, before every timeout's end; and
    /// below any due timer (time does not pass while one is due).
    fn floor(&self) -> Tick {
        let t = &self.timing;
        -(t.store_timeout + t.margin + 2 * t.drift + 3)
    }

    /// A request nobody waits for any more: still on the wire if it had not reached the store.
    fn stray(s: &mut State, call: Option<Call>) {
        if let Some(Call { op, wire: Wire::Sent, .. }) = call {
            if let Err(at) = s.strays.binary_search(&op) {
                s.strays.insert(at, op);
            }
        }
    }

    /// The worker's request is over (answered or timed out): what it does next.
    fn settle(&self, s: &mut State, w: usize, renewal: bool, answer: Option<Answer>) {
        let worker = &mut s.workers[w];
        let clock = worker.clock();
        let Some(call) = worker.slot_mut(renewal).take() else { return };
        if renewal {
            if let Some(hold) = &mut worker.hold {
                match answer {
                    Some(Answer::Done) => {
                        let from = if self.variant == Variant::DeadlineFromReply { clock } else { call.sent };
                        hold.vouched = hold.vouched.max(from + self.timing.lease);
                        worker.failed = 0;
                    }
                    Some(Answer::Fenced) => hold.lost = true,
                    _ => self.renewal_failed(worker),
                }
            }
            return;
        }
        match (worker.phase, call.op, answer) {
            (Phase::Claiming, Op::Claim { token, .. }, Some(Answer::Acquired)) => {
                let from = if self.variant == Variant::DeadlineFromReply { clock } else { call.sent };
                worker.hold = Some(Hold {
                    token,
                    vouched: from + self.timing.lease,
                    lost: false,
                    next_renewal: clock + self.timing.period,
                });
                worker.phase = Phase::Running;
            }
            (Phase::Claiming, _, Some(Answer::Completed { .. })) => worker.phase = Phase::Finished,
            // In progress, a mismatch, or no answer (503): the client tries again later.
            (Phase::Claiming, _, _) => worker.phase = Phase::Idle,
            (Phase::Completing { attempt, .. }, _, None) => {
                let retry_at = clock + self.timing.completion_retry(attempt);
                worker.phase = Phase::Completing { attempt, retry_at: Some(retry_at) };
            }
            // Stored, or fenced (taken over, or stored by an earlier attempt): over; a release,
            // answered or not: over.
            _ => worker.phase = Phase::Finished,
        }
        if worker.phase == Phase::Finished {
            let renewal = worker.renewal.take();
            worker.hold = None;
            Self::stray(s, renewal);
        }
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        assert!((1..=4).contains(&self.workers) && (1..=4).contains(&self.attempts), "at most 16 tokens");
        let worker =
            Worker { offset: 0, attempts: 0, phase: Phase::Idle, hold: None, call: None, renewal: None, failed: 0 };
        vec![State {
            record: Record::Empty,
            workers: vec![worker; usize::from(self.workers)],
            strays: Vec::new(),
            ticks: 0,
            first_replay: None,
            events: 0,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for (w, worker) in s.workers.iter().enumerate() {
            let clock = worker.clock();
            match worker.phase {
                Phase::Idle if worker.attempts < self.attempts => actions.push(Action::Claim(w)),
                Phase::Running => {
                    actions.push(Action::HandlerDone(w, true));
                    actions.push(Action::HandlerDone(w, false));
                }
                Phase::Completing { retry_at: Some(at), .. } if clock >= at => actions.push(Action::Complete(w)),
                _ => {}
            }
            // A renewal that must succeed is not left behind on the wire.
            let owed = self.must_renew(worker) && worker.renewal.is_some_and(|c| c.wire == Wire::Sent);
            if worker.keeping() && worker.hold.is_some_and(|h| clock >= h.next_renewal) && !owed {
                actions.push(Action::Renew(w));
            }
            for renewal in [false, true] {
                let Some(call) = worker.slot(renewal) else { continue };
                // An answer that arrives by the end of the store timeout is taken.
                let in_time = clock <= call.sent + self.timing.store_timeout;
                // Within the fault budget a renewal may fail; once it is spent, it may not.
                let may_fail = !renewal || !self.must_renew(worker);
                match call.wire {
                    // A request is not lost here: one its sender stops waiting for goes astray, and
                    // a stray may be lost (the same runs, fewer states).
                    Wire::Sent => actions.push(Action::Apply(w, renewal)),
                    Wire::Answered(_) => {
                        if in_time {
                            actions.push(Action::Receive(w, renewal));
                        }
                        if may_fail {
                            actions.push(Action::Lose(w, renewal));
                        }
                    }
                    Wire::Lost => {}
                }
                if !in_time && may_fail {
                    actions.push(Action::Timeout(w, renewal));
                }
            }
            if self.crashes && !matches!(worker.phase, Phase::Idle | Phase::Finished | Phase::Crashed) {
                actions.push(Action::Crash(w));
            }
        }
        for i in 0..s.strays.len() {
            actions.push(Action::ApplyStray(i));
            actions.push(Action::DropStray(i));
        }
        if !self.due(s) && self.horizon.is_none_or(|h| s.ticks < h) {
            let drift = self.timing.drift;
            let mut choices = 1u16;
            for _ in &s.workers {
                choices *= 3;
            }
            'choice: for choice in 0..choices {
                let mut rest = choice;
                for worker in &s.workers {
                    let change = [0, -1, 1][usize::from(rest % 3)];
                    rest /= 3;
                    let done = worker.phase == Phase::Finished;
                    if (worker.offset + change).abs() > drift || (done && change != 0) {
                        continue 'choice;
                    }
                }
                actions.push(Action::Tick(choice));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        s.events = 0;
        match action {
            Action::Tick(choice) => {
                if self.horizon.is_some() {
                    s.ticks += 1;
                }
                self.tick(&mut s, choice)
            }
            Action::Claim(w) => {
                let token = self.token(w, s.workers[w].attempts);
                let worker = &mut s.workers[w];
                worker.attempts += 1;
                worker.phase = Phase::Claiming;
                let op = Op::Claim { token, fingerprint: 0 };
                worker.call = Some(Call { op, sent: worker.clock(), wire: Wire::Sent });
            }
            Action::HandlerDone(w, store) => {
                let worker = &mut s.workers[w];
                let clock = worker.clock();
                let token = worker.hold?.token;
                if store {
                    worker.phase = Phase::Completing { attempt: 0, retry_at: Some(clock) };
                } else {
                    worker.phase = Phase::Releasing;
                    worker.call = Some(Call { op: Op::Release { token }, sent: clock, wire: Wire::Sent });
                }
            }
            Action::Complete(w) => {
                let worker = &mut s.workers[w];
                let clock = worker.clock();
                let hold = worker.hold?;
                let Phase::Completing { attempt, .. } = worker.phase else { return None };
                if hold.lost {
                    // The claim is known taken over: storing is abandoned.
                    worker.phase = Phase::Finished;
                    worker.hold = None;
                    let renewal = worker.renewal.take();
                    Self::stray(&mut s, renewal);
                } else {
                    let attempt = (attempt + 1).min(self.timing.completion_attempts_apart());
                    worker.phase = Phase::Completing { attempt, retry_at: None };
                    worker.call = Some(Call { op: Op::Complete { token: hold.token }, sent: clock, wire: Wire::Sent });
                }
            }
            Action::Renew(w) => {
                let worker = &mut s.workers[w];
                let clock = worker.clock();
                let hold = worker.hold.as_mut()?;
                while hold.next_renewal <= clock {
                    hold.next_renewal += self.timing.period;
                }
                let token = hold.token;
                // The keeper does not wait for the renewal before: it may still be on the wire, or
                // its answer (taken now, which changes nothing but the time it is taken).
                if let Some(before) = worker.renewal.take() {
                    match before.wire {
                        Wire::Sent => {
                            self.renewal_failed(&mut s.workers[w]);
                            Self::stray(&mut s, Some(before));
                        }
                        Wire::Answered(answer) => {
                            s.workers[w].renewal = Some(before);
                            self.settle(&mut s, w, true, Some(answer));
                        }
                        Wire::Lost => self.renewal_failed(&mut s.workers[w]),
                    }
                }
                let worker = &mut s.workers[w];
                worker.renewal = Some(Call { op: Op::Renew { token }, sent: clock, wire: Wire::Sent });
            }
            Action::Apply(w, renewal) => {
                let call = s.workers[w].slot(renewal)?;
                let answer = self.apply(&mut s, call.op);
                *s.workers[w].slot_mut(renewal) = Some(Call { wire: Wire::Answered(answer), ..call });
            }
            Action::Lose(w, renewal) => {
                let call = s.workers[w].slot(renewal)?;
                *s.workers[w].slot_mut(renewal) = Some(Call { wire: Wire::Lost, ..call });
            }
            Action::Receive(w, renewal) => {
                let Wire::Answered(answer) = s.workers[w].slot(renewal)?.wire else { return None };
                self.settle(&mut s, w, renewal, Some(answer));
            }
            Action::Timeout(w, renewal) => {
                // A request not yet applied is on the wire still; the worker only stops waiting.
                let call = s.workers[w].slot(renewal);
                Self::stray(&mut s, call);
                self.settle(&mut s, w, renewal, None);
            }
            Action::ApplyStray(i) => {
                let op = s.strays.remove(i);
                self.apply(&mut s, op);
            }
            Action::DropStray(i) => {
                s.strays.remove(i);
            }
            Action::Crash(w) => {
                let worker = &mut s.workers[w];
                worker.phase = Phase::Crashed;
                worker.hold = None;
                let (call, renewal) = (worker.call.take(), worker.renewal.take());
                Self::stray(&mut s, call);
                Self::stray(&mut s, renewal);
            }
        }
        self.canonical(&mut s);
        Some(s)
    }

    /// - `one holder`: never two workers that both believe they hold the claim;
    /// - `outcome by its holder`: an outcome is written only by the token holding the claim;
    /// - `one outcome`: at most one outcome is ever written;
    /// - `replays the outcome`: every claim answered with an outcome gets the one stored;
    /// - `takeover`, `fenced completion`, `replay` (sometimes): each happens in some run.
    ///
    /// In the fault budget mode ([`Protocol::renewal_failures`]) also:
    /// - `live handler keeps its claim`: no claim is acquired while another token's handler runs
    ///   or stores its outcome;
    /// - `budget spent while the handler runs` (sometimes): a handler runs after as many
    ///   renewals failed in a row as the budget allows; and no `fenced completion` (a live
    ///   handler is never taken over, so nothing fences its completion).
    fn properties(&self) -> Vec<Property<Self>> {
        let mut properties = vec![
            Property::always("one holder", |m: &Protocol, s: &State| {
                (0..s.workers.len()).filter(|&w| m.believes(s, w)).count() <= 1
            }),
            Property::always("outcome by its holder", |_, s: &State| s.events & Event::FOREIGN_WRITE == 0),
            Property::always("one outcome", |_, s: &State| s.events & Event::SECOND_OUTCOME == 0),
            Property::always("replays the outcome", |_, s: &State| s.events & Event::WRONG_REPLAY == 0),
            Property::sometimes("takeover", |_, s: &State| s.events & Event::TAKEOVER != 0),
            Property::sometimes("replay", |_, s: &State| s.events & Event::REPLAY != 0),
        ];
        if self.renewal_failures.is_none() {
            properties.push(Property::sometimes("fenced completion", |_, s: &State| {
                s.events & Event::FENCED_COMPLETION != 0
            }));
        } else {
            properties.push(Property::always("live handler keeps its claim", |_, s: &State| {
                s.events & Event::LIVE_TAKEOVER == 0
            }));
            properties.push(Property::sometimes("budget spent while the handler runs", |m: &Protocol, s: &State| {
                s.workers.iter().any(|w| w.phase == Phase::Running && m.must_renew(w) && w.keeping())
            }));
        }
        properties
    }
}
