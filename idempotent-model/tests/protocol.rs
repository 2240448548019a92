//! The claim protocol checked exhaustively: the engine's configurations hold every property and
//! show every `sometimes` event; each variant that must fail does.
//!
//! Each check prints its states, depth and time (`--nocapture`). The longer run is
//! [`longer_run`], ignored here: see its docs.

use idempotent_model::{check, find_failure, Outcome, Protocol, Variant};

/// Both cores of a small machine.
const THREADS: usize = 2;

fn holds(outcome: &Outcome) {
    println!("{}", outcome.summary());
    assert!(
        outcome.broken().is_empty(),
        "{}: broken {:?}\n{:#?}",
        outcome.summary(),
        outcome.broken(),
        outcome.discoveries
    );
    assert!(outcome.never_seen().is_empty(), "{}: vacuous, never {:?}", outcome.summary(), outcome.never_seen());
}

fn fails(outcome: &Outcome, property: &str) {
    println!("{}: breaks {:?}", outcome.summary(), outcome.broken());
    let path = outcome.discoveries.get(property).unwrap_or_else(|| panic!("{}: {property} holds", outcome.summary()));
    println!("  {:?}", path.clone().into_actions());
}

/// One worker whose client tries twice, each attempt with its own token, clocks one tick off:
/// the second attempt races the first one's claim, which may reach the store late and take the
/// key while nobody waits for it; crashes and lost messages everywhere.
#[test]
fn one_client_two_attempts_with_drift() {
    holds(&check(Protocol::engine(1, 2, 1), THREADS));
}

/// Two workers, exact clocks, every run of up to seven ticks (beyond a lease): a claim taken over
/// from a worker still running, late completions fenced, replays.
#[test]
fn two_workers_within_a_lease_and_a_tick() {
    let mut protocol = Protocol::engine(2, 1, 0);
    protocol.crashes = false;
    protocol.horizon = Some(7);
    holds(&check(protocol, THREADS));
}

/// Vouching for a lease from the time its answer arrived: a claim answered a tick late lets its
/// worker believe in it a tick after the store gave the key to another.
#[test]
fn deadline_from_the_reply_fails() {
    fails(&find_failure(Protocol::engine(2, 1, 0).with(Variant::DeadlineFromReply), THREADS), "one holder");
}

/// A margin one tick short of twice the drift: a slow clock keeps its worker believing while the
/// store's deadline has passed.
#[test]
fn margin_below_twice_the_drift_fails() {
    fails(&find_failure(Protocol::engine(2, 1, 1).with(Variant::MarginBelowTwiceDrift), THREADS), "one holder");
}

/// A store whose completion does not check the token: a crashed worker's late completion writes
/// over the claim of the worker that took the key over.
#[test]
fn completion_without_the_token_check_fails() {
    fails(&find_failure(Protocol::engine(2, 1, 0).with(Variant::UnfencedCompletion), THREADS), "outcome by its holder");
}

/// The longer run: `IDEMPOTENT_MODEL_LONG=1 cargo test -p idempotent-model --release --test
/// protocol -- --ignored --nocapture`, with `IDEMPOTENT_MODEL_WORKERS` (default 2),
/// `IDEMPOTENT_MODEL_ATTEMPTS` (1), `IDEMPOTENT_MODEL_DRIFT` (0), `IDEMPOTENT_MODEL_HORIZON` (none:
/// every run, however long) and `IDEMPOTENT_MODEL_CRASHES` (1).
#[test]
#[ignore = "minutes to hours: run on purpose (see the docs)"]
fn longer_run() {
    let var = |name: &str, default: i64| -> i64 {
        std::env::var(name).map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}"))).unwrap_or(default)
    };
    assert!(std::env::var("IDEMPOTENT_MODEL_LONG").is_ok(), "set IDEMPOTENT_MODEL_LONG=1 to run the longer check");
    let mut protocol = Protocol::engine(
        var("IDEMPOTENT_MODEL_WORKERS", 2) as u8,
        var("IDEMPOTENT_MODEL_ATTEMPTS", 1) as u8,
        var("IDEMPOTENT_MODEL_DRIFT", 0) as i16,
    );
    protocol.crashes = var("IDEMPOTENT_MODEL_CRASHES", 1) != 0;
    protocol.horizon = u8::try_from(var("IDEMPOTENT_MODEL_HORIZON", 0)).ok().filter(|&h| h > 0);
    holds(&check(protocol, THREADS));
}
