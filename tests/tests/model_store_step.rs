//! Each real store against the model's store step ([`idempotent_model::store::step`]): the same
//! random sequences of operations on one key (claims with three tokens and two fingerprints,
//! renewals, completions, releases, inspections, invalidations, and waits past the lease) run on
//! the store and on the step, answer for answer.
//!
//! Every case is compared, a claim sent again by a token whose own claim's lease ran out
//! included: every store leases it anew.
//!
//! Real time stands in for the model's ticks: a claim's lease is [`LEASE`], a wait sleeps half
//! as long again, and the operations between two waits take a small part of a lease. The
//! sequences of one store run at once, each on its own key, so a store's check takes about as
//! long as its longest sequence's waits.

use idempotent_model::store::{step, Answer, Op, Purge, Record, Rules, Tick};
use idempotent_tests::spec::{store, Driver};
use std::time::Duration;

/// The lease of every claim and renewal.
const LEASE: Duration = Duration::from_millis(1500);
/// The model's lease, in ticks; a wait is one more.
const LEASE_TICKS: Tick = 2;
/// Sequences per store, and operations per sequence.
const SEQUENCES: u64 = 40;
const OPS: usize = 14;

/// A step of a sequence: an operation, or a wait past every lease running now.
#[derive(Debug, Clone, Copy)]
enum Step {
    Op(Op),
    Wait,
}

/// A small deterministic generator (xorshift), so a failing sequence can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn sequence(seed: u64) -> Vec<Step> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut waits = 0;
    (0..OPS)
        .map(|_| {
            let token = rng.below(3) as u8;
            match rng.below(20) {
                0..=6 => Step::Op(Op::Claim { token, fingerprint: u8::from(rng.below(5) == 0) }),
                7..=9 => Step::Op(Op::Renew { token }),
                10..=12 => Step::Op(Op::Complete { token }),
                13..=14 => Step::Op(Op::Release { token }),
                15 => Step::Op(Op::Inspect),
                16 => Step::Op(Op::Invalidate(if rng.below(2) == 0 { Purge::Completed } else { Purge::Any })),
                _ if waits < 2 => {
                    waits += 1;
                    Step::Wait
                }
                _ => Step::Op(Op::Claim { token, fingerprint: 0 }),
            }
        })
        .collect()
}

/// Runs every sequence on `name`'s store and on the step; panics at the first answer that differs.
async fn matches_the_step(name: &str) {
    let Some(store) = store(name).await else { return };
    let runs = (0..SEQUENCES).map(|seed| {
        let store = store.clone();
        async move {
            let steps = sequence(seed);
            let driver = Driver::new(store, &format!("seq-{seed}"), 3, LEASE);
            let (mut record, mut now) = (Record::Empty, 0 as Tick);
            let mut answers: Vec<(Op, Answer)> = Vec::new();
            for s in steps {
                let op = match s {
                    Step::Wait => {
                        tokio::time::sleep(LEASE * 3 / 2).await;
                        now += LEASE_TICKS + 1;
                        continue;
                    }
                    Step::Op(op) => op,
                };
                let (next, expected) = step(record, op, now, LEASE_TICKS, Rules::STORE);
                record = next;
                let got = driver.run(op).await.unwrap_or_else(|e| panic!("{name}: {op:?}: {e}"));
                answers.push((op, got));
                assert_eq!(got, expected, "{name}, sequence {seed}: {op:?} after {answers:?}");
            }
            answers.len()
        }
    });
    let ops: usize = futures_util::future::join_all(runs).await.into_iter().sum();
    eprintln!("{name}: {ops} operations in {SEQUENCES} sequences agree with the model's store step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_matches_the_model() {
    matches_the_step("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_matches_the_model() {
    matches_the_step("sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_matches_the_model() {
    matches_the_step("postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_matches_the_model() {
    matches_the_step("mysql").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_matches_the_model() {
    matches_the_step("redis").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster_matches_the_model() {
    matches_the_step("redis-cluster").await;
}

/// The sequences are not all alike: each kind of operation and answer occurs, waits included, and
/// so does a claim sent again by the token whose own lease ran out.
#[test]
fn the_sequences_cover_every_answer() {
    let mut seen = std::collections::HashSet::new();
    let (mut waits, mut resent_expired) = (0, 0);
    for seed in 0..SEQUENCES {
        let (mut record, mut now) = (Record::Empty, 0 as Tick);
        for s in sequence(seed) {
            match s {
                Step::Wait => {
                    waits += 1;
                    now += LEASE_TICKS + 1;
                }
                Step::Op(op) => {
                    if matches!((op, record), (Op::Claim { token, .. }, Record::Held { token: held, deadline, .. }) if token == held && deadline <= now)
                    {
                        resent_expired += 1;
                    }
                    let (next, answer) = step(record, op, now, LEASE_TICKS, Rules::STORE);
                    record = next;
                    seen.insert(std::mem::discriminant(&answer));
                }
            }
        }
    }
    assert!(waits >= SEQUENCES / 2, "{waits} waits");
    assert!(resent_expired >= 3, "{resent_expired} claims sent again after their own lease ran out");
    assert_eq!(seen.len(), 12, "every kind of answer");
}
