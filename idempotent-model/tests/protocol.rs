//! The claim protocol checked exhaustively: the engine's configurations hold every property and
//! show every `sometimes` event; each variant that must fail does.
//!
//! Each check prints its states, depth and time (`--nocapture`). The longer run is
//! [`longer_run`], ignored here: see its docs.

use idempotent_model::timing::Timing;
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
/// every run, however long) and `IDEMPOTENT_MODEL_CRASHES` (1); with
/// `IDEMPOTENT_MODEL_RENEWAL_FAILURES=k`, the fault budget mode with at most `k` renewals failing
/// in a row (one attempt per worker, no crashes), reporting whether a live handler kept its claim.
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
    if let Ok(k) = u8::try_from(var("IDEMPOTENT_MODEL_RENEWAL_FAILURES", -1)) {
        let budget = Protocol::fault_budget(protocol.workers, protocol.timing.drift, k);
        let outcome = find_failure(Protocol { horizon: protocol.horizon, ..budget }, THREADS);
        println!("{}: broken {:?}", outcome.summary(), outcome.broken());
        for property in outcome.broken() {
            println!("  {property}: {:?}", outcome.discoveries[property].clone().into_actions());
        }
        return;
    }
    holds(&check(protocol, THREADS));
}

/// The fault budget: with at most as many renewals failing in a row as the engine's rule allows
/// (`engine::timing::renewal_failures_tolerated`: 2 at the tightest lease), no claim is acquired
/// while a handler runs or stores its outcome. The claim's answer may arrive a store timeout after
/// the store leased it, the keeper counts its periods from that answer, every other request may
/// be lost or late, and storing the outcome is retried.
#[test]
fn a_live_handler_keeps_its_claim_within_the_fault_budget() {
    let budget = Timing::engine(0).renewal_failures_tolerated();
    holds(&check(Protocol::fault_budget(2, 0, budget), THREADS));
}

/// One failure beyond the budget: a claim answered a store timeout after it was applied, then
/// renewals lost until the next one reaches the store as the lease runs out, and another
/// request's claim takes the key over from a handler still running.
#[test]
fn one_renewal_failure_beyond_the_budget_loses_the_claim() {
    let budget = Timing::engine(0).renewal_failures_tolerated();
    fails(&find_failure(Protocol::fault_budget(2, 0, budget + 1), THREADS), "live handler keeps its claim");
}
