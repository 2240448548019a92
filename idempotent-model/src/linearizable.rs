//! Whether a concurrent history of one key's operations is linearizable against [`step`]: some
//! order of the operations, consistent with real time (an operation that returned before another
//! was invoked comes first), in which each answer is what [`step`] answers.
//!
//! The search is Wing and Gong's, with Lowe's memo of the configurations already tried (the set
//! of operations placed and the record they left): at each point any operation invoked before the
//! earliest return among those not yet placed may come next. An operation whose answer was lost
//! (the call failed: it may or may not have reached the store) has no return: it may be placed
//! anywhere after its invocation, with any answer, or never; or, when its `returned` is a time
//! (not `u64::MAX`), only before every operation invoked after it failed (a call that failed
//! because its connection was reset took effect before that, if at all).
//!
//! Time stands still in these histories ([`step`] at tick 0, with a lease that never runs out):
//! real stores are driven with leases far longer than the run, so no lease expires during it.
//!
//! ```
//! use idempotent_model::linearizable::{linearizable, Event};
//! use idempotent_model::store::{Answer, Op};
//!
//! let claim = |token| Op::Claim { token, fingerprint: 0 };
//! // Two overlapping claims: either may have come first, but only one acquires.
//! let history = [
//!     Event { op: claim(1), answer: Some(Answer::InProgress), invoked: 0, returned: 10 },
//!     Event { op: claim(2), answer: Some(Answer::Acquired), invoked: 1, returned: 5 },
//! ];
//! assert!(linearizable(&history).is_ok());
//! let both = [
//!     Event { op: claim(1), answer: Some(Answer::Acquired), invoked: 0, returned: 10 },
//!     Event { op: claim(2), answer: Some(Answer::Acquired), invoked: 1, returned: 5 },
//! ];
//! assert!(linearizable(&both).is_err());
//! ```

use crate::store::{step, Answer, Op, Record, Rules, Tick};
use std::collections::HashSet;

/// One operation of a history: what was asked, what was answered (`None`: the call failed, its
/// effect unknown), and when, in any monotonic unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The operation.
    pub op: Op,
    /// Its answer; `None` when the call failed.
    pub answer: Option<Answer>,
    /// When it was invoked.
    pub invoked: u64,
    /// When it returned; for a failed call, when it failed (`u64::MAX`: its effect may come at
    /// any later time).
    pub returned: u64,
}

/// Why a history is not linearizable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotLinearizable {
    /// The longest prefix of operations (indices into the history) that could be ordered.
    pub longest: Vec<usize>,
    /// How many configurations were tried.
    pub explored: usize,
}

/// The lease of every claim and renewal: longer than any history's span.
const FOREVER: Tick = Tick::MAX / 2;

/// A linearization of `history` (the indices of its operations in order, those with a lost answer
/// that took no effect left out), or why there is none.
///
/// Failed calls make the search branch: each may be placed anywhere it is allowed, or never. Three
/// things keep that small:
/// - a failed call is placed only where it changes the record: one that would leave it as it is
///   is the same as one never placed, and placing it would only narrow where other failed calls
///   may go;
/// - a failed call that can no longer be placed (an operation invoked after it failed is placed)
///   counts in the memo as if placed: whether it took effect early or never, what is left to
///   order is the same, so the two configurations are one;
/// - operations with an answer are tried before failed calls, so that a history explained
///   without most failed calls' effects is found first.
pub fn linearizable(history: &[Event]) -> Result<Vec<usize>, NotLinearizable> {
    let n = history.len();
    let returned = |e: &Event| if e.answer.is_some() { e.returned } else { u64::MAX };
    let words = n.div_ceil(64);
    let mut seen: HashSet<(Vec<u64>, Record)> = HashSet::new();
    // Operations with an answer first, failed calls last, each in the order they were invoked.
    let mut candidates: Vec<usize> = (0..n).collect();
    candidates.sort_by_key(|&i| (history[i].answer.is_none(), history[i].invoked));
    // Depth-first: each frame is a configuration and the candidates still to try from it.
    let mut placed = vec![0u64; words];
    let mut order: Vec<usize> = Vec::new();
    let mut records = vec![Record::Empty];
    let mut latests = vec![0u64];
    let mut next_candidate = vec![0usize];
    let mut longest = Vec::new();
    let is_placed = |placed: &[u64], i: usize| placed[i / 64] & (1 << (i % 64)) != 0;
    // A failed call is placed before any operation invoked after it failed, or never.
    let too_late = |e: &Event, latest: u64| e.answer.is_none() && latest > e.returned;
    loop {
        let depth = order.len();
        let (record, latest) = (records[depth], latests[depth]);
        let known_left = (0..n).any(|i| !is_placed(&placed, i) && history[i].answer.is_some());
        if !known_left {
            return Ok(order);
        }
        let horizon =
            (0..n).filter(|&i| !is_placed(&placed, i)).map(|i| returned(&history[i])).min().unwrap_or(u64::MAX);
        let mut advanced = false;
        while next_candidate[depth] < n {
            let i = candidates[next_candidate[depth]];
            next_candidate[depth] += 1;
            let e = &history[i];
            if is_placed(&placed, i) || e.invoked >= horizon || too_late(e, latest) {
                continue;
            }
            let (after, answer) = step(record, e.op, 0, FOREVER, Rules::STORE);
            if e.answer.is_some_and(|a| a != answer) || (e.answer.is_none() && after == record) {
                continue;
            }
            placed[i / 64] |= 1 << (i % 64);
            let latest = latest.max(e.invoked);
            // The memo's key: what is placed, failed calls that can no longer be, and the record.
            let mut key = placed.clone();
            for (j, f) in history.iter().enumerate() {
                if too_late(f, latest) {
                    key[j / 64] |= 1 << (j % 64);
                }
            }
            if !seen.insert((key, after)) {
                placed[i / 64] &= !(1 << (i % 64));
                continue;
            }
            order.push(i);
            records.push(after);
            latests.push(latest);
            next_candidate.push(0);
            if order.len() > longest.len() {
                longest.clone_from(&order);
            }
            advanced = true;
            break;
        }
        if advanced {
            continue;
        }
        // Nothing more from here: back up one operation.
        let Some(i) = order.pop() else {
            return Err(NotLinearizable { longest, explored: seen.len() });
        };
        records.pop();
        latests.pop();
        next_candidate.pop();
        placed[i / 64] &= !(1 << (i % 64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(op: Op, answer: Option<Answer>, invoked: u64, returned: u64) -> Event {
        Event { op, answer, invoked, returned }
    }

    #[test]
    fn real_time_order_is_kept() {
        let claim = |token| Op::Claim { token, fingerprint: 0 };
        // Claim 2 returned before claim 1 was invoked: it came first, so claim 1 cannot acquire.
        let history = [ev(claim(2), Some(Answer::InProgress), 0, 1), ev(claim(1), Some(Answer::Acquired), 2, 3)];
        assert!(linearizable(&history).is_err());
        // Overlapping, the same answers are fine.
        let history = [ev(claim(2), Some(Answer::InProgress), 0, 3), ev(claim(1), Some(Answer::Acquired), 1, 2)];
        assert_eq!(linearizable(&history), Ok(vec![1, 0]));
    }

    #[test]
    fn a_lost_answer_may_or_may_not_have_taken_effect() {
        let claim = |token| Op::Claim { token, fingerprint: 0 };
        let took = [
            ev(claim(1), None, 0, 0),
            ev(Op::Complete { token: 1 }, Some(Answer::Done), 5, 6),
            ev(claim(2), Some(Answer::Completed { by: 1 }), 7, 8),
        ];
        assert!(linearizable(&took).is_ok());
        let did_not = [ev(claim(1), None, 0, 0), ev(claim(2), Some(Answer::Acquired), 5, 6)];
        assert_eq!(linearizable(&did_not), Ok(vec![1]));
        let impossible =
            [ev(Op::Complete { token: 1 }, None, 0, 0), ev(claim(2), Some(Answer::Completed { by: 1 }), 5, 6)];
        assert!(linearizable(&impossible).is_err(), "nothing to complete");
        // A call that failed at 1 cannot take effect after an operation invoked at 5.
        let mut late = [
            ev(claim(1), Some(Answer::Acquired), 0, 1),
            ev(Op::Complete { token: 1 }, None, 0, 1),
            ev(claim(2), Some(Answer::InProgress), 5, 6),
            ev(claim(3), Some(Answer::Completed { by: 1 }), 7, 8),
        ];
        assert!(linearizable(&late).is_err());
        late[1].returned = u64::MAX;
        assert_eq!(linearizable(&late), Ok(vec![0, 2, 1, 3]), "unless it may arrive any time");
    }

    #[test]
    fn failed_calls_that_change_nothing_are_left_out() {
        let claim = |token| Op::Claim { token, fingerprint: 0 };
        let history = [
            ev(claim(1), Some(Answer::Acquired), 0, 1),
            ev(Op::Inspect, None, 2, 3),
            ev(claim(2), None, 2, 3),
            ev(Op::Renew { token: 1 }, None, 2, u64::MAX),
            ev(Op::Complete { token: 1 }, Some(Answer::Done), 4, 5),
        ];
        assert_eq!(linearizable(&history), Ok(vec![0, 4]));
    }

    /// Histories of a sequential store seen through calls that overlap and often fail (each
    /// failed call taking effect or not, by a coin): many failed calls, each placeable in many
    /// places, are searched through at once.
    #[test]
    fn histories_with_many_failed_calls_are_searched_through() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut below = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..20 {
            let (mut history, mut record, mut failed) = (Vec::new(), Record::Empty, 0);
            for k in 0..160u64 {
                let token = below(8) as u8;
                let op = match below(20) {
                    0..=6 => Op::Claim { token, fingerprint: u8::from(below(8) == 0) },
                    7..=8 => Op::Renew { token },
                    9..=12 => Op::Complete { token },
                    13..=14 => Op::Release { token },
                    15..=16 => Op::Inspect,
                    17..=18 => Op::Invalidate(crate::store::Purge::Any),
                    _ => Op::Invalidate(crate::store::Purge::Completed),
                };
                // Takes effect at 100 k, within a call that overlaps its neighbours.
                let at = 100 * k + 1000;
                let (invoked, returned) = (at - below(300), at + below(300));
                let fails = below(3) == 0;
                let answer = if fails && below(2) == 0 {
                    None
                } else {
                    let (after, answer) = step(record, op, 0, FOREVER, Rules::STORE);
                    record = after;
                    Some(answer).filter(|_| !fails)
                };
                failed += usize::from(fails);
                let returned = if fails && below(8) == 0 { u64::MAX } else { returned };
                history.push(ev(op, answer, invoked, returned));
            }
            assert!(failed > 30, "{failed} failed calls");
            assert!(linearizable(&history).is_ok(), "{history:#?}");
        }
    }

    #[test]
    fn long_histories_with_little_overlap_are_quick() {
        // 3 clients, 300 operations, each overlapping its neighbours.
        let mut history = Vec::new();
        let mut record = Record::Empty;
        for i in 0..300u64 {
            let token = (i % 3) as u8;
            let op = match i % 4 {
                0 => Op::Claim { token, fingerprint: 0 },
                1 => Op::Renew { token },
                2 => Op::Complete { token },
                _ => Op::Invalidate(crate::store::Purge::Any),
            };
            let (after, answer) = step(record, op, 0, FOREVER, Rules::STORE);
            record = after;
            history.push(ev(op, Some(answer), i * 10, i * 10 + 15));
        }
        assert_eq!(linearizable(&history).map(|o| o.len()), Ok(300));
    }
}
