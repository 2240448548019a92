//! One key's record and the store's step: the sequential specification of [`Store`].
//!
//! [`step`] is what every store does to one key's record, atomically, for each operation of the
//! [`Store`] trait, as its docs state it: the claim (a resent claim finds itself, and leases its
//! record anew once the lease has run out; an expired claim of the same request is taken over;
//! another request's record is a mismatch), renewal,
//! completion and release fenced by the token, inspection and invalidation. Time is a number of
//! ticks; a record's deadline is the tick from which a claim may take it over.
//!
//! The model's store ([`crate::protocol`]) applies it to every request it delivers; the tests of
//! the real stores (`tests/tests/model_store_step.rs`) run the same sequences of operations on
//! each store and on `step` and compare the answers, and the linearizability check
//! ([`crate::linearizable`]) uses it as the specification a concurrent history must match.
//!
//! What it leaves out: the time to live of a completed record and the retention of an abandoned
//! claim ([`ABANDONED_CLAIM_RETENTION`](idempotent_core::store::ABANDONED_CLAIM_RETENTION)) are
//! longer than anything the model or the tests run for, so a record is never forgotten here; and
//! one response per token (a completion stores the response of its token).
//!
//! [`Store`]: idempotent_core::store::Store

/// A claim's token, as the model numbers them.
pub type Token = u8;
/// A request's fingerprint, as the model numbers them.
pub type Fingerprint = u8;
/// A time, in ticks.
pub type Tick = i16;

/// What the store holds for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Record {
    /// Nothing: never claimed, released, or invalidated.
    Empty,
    /// In progress, held by `token` until another claim takes it over (from `deadline` on).
    Held {
        /// The holder.
        token: Token,
        /// The request's fingerprint.
        fingerprint: Fingerprint,
        /// The first tick at which the lease has run out.
        deadline: Tick,
    },
    /// Completed: the outcome stored by `token`.
    Done {
        /// The token that stored the outcome.
        token: Token,
        /// The request's fingerprint.
        fingerprint: Fingerprint,
    },
}

/// What [`step`]'s invalidation may delete (`Purge` of the store trait).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Purge {
    /// A completed record only.
    Completed,
    /// Any record.
    Any,
}

/// One operation of the store trait on one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// `claim_as(key, fingerprint, lease, token)`.
    Claim {
        /// The claim's token.
        token: Token,
        /// The request's fingerprint.
        fingerprint: Fingerprint,
    },
    /// `renew(key, token, lease)`.
    Renew {
        /// The claim's token.
        token: Token,
    },
    /// `complete(key, token, response of token, ttl)`.
    Complete {
        /// The claim's token.
        token: Token,
    },
    /// `release(key, token)`.
    Release {
        /// The claim's token.
        token: Token,
    },
    /// `inspect(key)`.
    Inspect,
    /// `invalidate(key, purge)`.
    Invalidate(Purge),
}

/// A store's answer, with what the model can compare of it (not the time left on a lease, nor
/// times reported by `inspect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Answer {
    /// `Claim::Acquired`.
    Acquired,
    /// `Claim::Completed` with the response that `by`'s completion stored.
    Completed {
        /// Whose outcome it is.
        by: Token,
    },
    /// `Claim::InProgress`.
    InProgress,
    /// `Claim::Mismatch`.
    Mismatch,
    /// `Ok(())` of renew, complete or release.
    Done,
    /// `StoreError::Fenced`.
    Fenced,
    /// `inspect`: nothing.
    Absent,
    /// `inspect`: an in-progress record, its lease running (`true`) or run out (`false`).
    InspectedInProgress {
        /// Whether the lease still runs.
        live: bool,
    },
    /// `inspect`: a completed record.
    InspectedCompleted,
    /// `invalidate`: `Invalidated::Deleted`.
    Deleted,
    /// `invalidate`: `Invalidated::InProgress`.
    LeftInProgress,
    /// `invalidate`: `Invalidated::Absent`.
    NothingToDelete,
}

/// How a store checks its operations: what every store does, or a variant the model shows to be
/// wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rules {
    /// A completion writes only while its token holds the claim (the store trait's rule). Without
    /// it, a completion writes whenever the record is in progress or completed: the compare of
    /// the compare-and-set left out.
    pub fenced_completion: bool,
}

impl Rules {
    /// The rules of the [`Store`](idempotent_core::store::Store) trait.
    pub const STORE: Rules = Rules { fenced_completion: true };
}

/// What the store does with `op` on `record` at `now`, with claims and renewals leasing for
/// `lease` ticks: the record after it, and the answer.
pub fn step(record: Record, op: Op, now: Tick, lease: Tick, rules: Rules) -> (Record, Answer) {
    use Record::*;
    let holds = |token: Token| matches!(record, Held { token: held, .. } if held == token);
    match op {
        Op::Claim { token, fingerprint } => match record {
            // Its own claim, sent again: held as it is while the lease runs, leased anew once it
            // has run out (the sender vouches for the lease from when it sent the claim).
            Held { token: held, deadline, .. } if held == token && deadline > now => (record, Answer::Acquired),
            Held { token: held, .. } if held == token => {
                (Held { token, fingerprint, deadline: now + lease }, Answer::Acquired)
            }
            Empty => (Held { token, fingerprint, deadline: now + lease }, Answer::Acquired),
            Held { fingerprint: f, .. } | Done { fingerprint: f, .. } if f != fingerprint => (record, Answer::Mismatch),
            Held { deadline, .. } if deadline <= now => {
                (Held { token, fingerprint, deadline: now + lease }, Answer::Acquired)
            }
            Held { .. } => (record, Answer::InProgress),
            Done { token: by, .. } => (record, Answer::Completed { by }),
        },
        Op::Renew { token } => match record {
            Held { fingerprint, .. } if holds(token) => {
                (Held { token, fingerprint, deadline: now + lease }, Answer::Done)
            }
            _ => (record, Answer::Fenced),
        },
        Op::Complete { token } => match record {
            Held { fingerprint, .. } if holds(token) => (Done { token, fingerprint }, Answer::Done),
            Done { token: by, .. } if by == token => (record, Answer::Done),
            Held { fingerprint, .. } | Done { fingerprint, .. } if !rules.fenced_completion => {
                (Done { token, fingerprint }, Answer::Done)
            }
            _ => (record, Answer::Fenced),
        },
        Op::Release { token } => match record {
            Held { .. } if holds(token) => (Empty, Answer::Done),
            _ => (record, Answer::Fenced),
        },
        Op::Inspect => match record {
            Empty => (record, Answer::Absent),
            Held { deadline, .. } => (record, Answer::InspectedInProgress { live: deadline > now }),
            Done { .. } => (record, Answer::InspectedCompleted),
        },
        Op::Invalidate(purge) => match (record, purge) {
            (Empty, _) => (record, Answer::NothingToDelete),
            (Held { .. }, Purge::Completed) => (record, Answer::LeftInProgress),
            _ => (Empty, Answer::Deleted),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Tick = 6;

    fn run(ops: &[(Tick, Op)]) -> Vec<Answer> {
        let mut record = Record::Empty;
        ops.iter()
            .map(|&(now, op)| {
                let (next, answer) = step(record, op, now, L, Rules::STORE);
                record = next;
                answer
            })
            .collect()
    }

    #[test]
    fn the_contract_in_ticks() {
        let claim = |token, fingerprint| Op::Claim { token, fingerprint };
        let answers = run(&[
            (0, claim(1, 0)),
            (0, claim(1, 0)),
            (1, claim(2, 0)),
            (1, claim(3, 1)),
            (6, Op::Inspect),
            (6, claim(3, 1)),
            (6, claim(2, 0)),
            (6, Op::Renew { token: 1 }),
            (6, Op::Complete { token: 1 }),
            (7, Op::Complete { token: 2 }),
            (7, Op::Complete { token: 2 }),
            (8, claim(4, 0)),
            (8, Op::Release { token: 2 }),
        ]);
        use Answer::*;
        assert_eq!(
            answers,
            [
                Acquired,
                Acquired,
                InProgress,
                Mismatch,
                InspectedInProgress { live: false },
                Mismatch,
                Acquired,
                Fenced,
                Fenced,
                Done,
                Done,
                Completed { by: 2 },
                Fenced
            ]
        );
    }

    #[test]
    fn a_claim_sent_again_after_its_lease_ran_out_leases_anew() {
        let claim = |fingerprint| Op::Claim { token: 1, fingerprint };
        let (r, _) = step(Record::Empty, claim(0), 0, L, Rules::STORE);
        assert_eq!(step(r, claim(0), 3, L, Rules::STORE), (r, Answer::Acquired), "live: as it is");
        let anew = Record::Held { token: 1, fingerprint: 0, deadline: 6 + L };
        assert_eq!(step(r, claim(0), 6, L, Rules::STORE), (anew, Answer::Acquired));
        let (_, other) = step(anew, Op::Claim { token: 2, fingerprint: 0 }, 7, L, Rules::STORE);
        assert_eq!(other, Answer::InProgress, "nobody takes the lease it was given again");
        let (taken, _) = step(r, claim(1), 6, L, Rules::STORE);
        assert_eq!(taken, Record::Held { token: 1, fingerprint: 1, deadline: 6 + L }, "taken anew, as claimed");
    }

    #[test]
    fn an_unfenced_completion_overwrites() {
        let unfenced = Rules { fenced_completion: false };
        let (r, _) = step(Record::Empty, Op::Claim { token: 1, fingerprint: 0 }, 0, L, unfenced);
        let (r, _) = step(r, Op::Claim { token: 2, fingerprint: 0 }, 6, L, unfenced);
        let (r, a) = step(r, Op::Complete { token: 1 }, 7, L, unfenced);
        assert_eq!((r, a), (Record::Done { token: 1, fingerprint: 0 }, Answer::Done));
        assert_eq!(step(r, Op::Complete { token: 1 }, 7, L, Rules::STORE).1, Answer::Done, "its own, again");
    }
}
