//! The queue of the SQL stores' group commit: writes of concurrent requests wait here for a writer
//! task, which takes them in batches and answers each with its own result (SQLite: one write
//! transaction per batch; PostgreSQL: one statement per kind of write per batch).
//!
//! The rule it keeps, once for both: nothing waits for a batch to fill. The first write queued
//! while fewer than the allowed writer tasks run starts one; a writer takes every write waiting (up
//! to the bound, in the order they came), and goes on while writes are waiting; writes that arrive
//! while a batch runs form the next one. A write alone therefore starts at once, in a batch of its
//! own; a store may also run it in its caller's task ([`Batches::run_alone`]), with no hand-off,
//! and start a writer task only for the writes queued meanwhile.

use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;
use std::mem;
use std::sync::{Mutex, MutexGuard, PoisonError};

struct Queue<W> {
    waiting: Vec<W>,
    /// How many writer tasks are running batches.
    running: usize,
}

/// The writes waiting for a writer task, and how many tasks run them.
pub(super) struct Batches<W> {
    queue: Mutex<Queue<W>>,
}

impl<W> Default for Batches<W> {
    fn default() -> Self {
        Self { queue: Mutex::new(Queue { waiting: Vec::new(), running: 0 }) }
    }
}

impl<W> fmt::Debug for Batches<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queue = self.queue();
        f.debug_struct("Batches").field("waiting", &queue.waiting.len()).field("running", &queue.running).finish()
    }
}

impl<W> Batches<W> {
    fn queue(&self) -> MutexGuard<'_, Queue<W>> {
        // Every method leaves the queue consistent: a panic elsewhere leaves it usable.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `write`; `true` when fewer than `writers` tasks run the batches, and the caller
    /// must start one (it is counted as running from now).
    pub(super) fn push(&self, write: W, writers: usize) -> bool {
        let mut queue = self.queue();
        queue.waiting.push(write);
        if queue.running < writers.max(1) {
            queue.running += 1;
            return true;
        }
        false
    }

    /// Takes the writers' turn for a write that finds no writer running and none waiting: `true`
    /// when the caller is to run it itself, at once, with no hand-off, counted as a running writer
    /// until it calls [`hand_over`](Self::hand_over); `false` when it must be queued
    /// ([`push`](Self::push)).
    // SQLite's lone write runs in its caller's task; PostgreSQL sends lone writes by its own rule.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(super) fn run_alone(&self) -> bool {
        let mut queue = self.queue();
        if queue.running == 0 && queue.waiting.is_empty() {
            queue.running = 1;
            return true;
        }
        false
    }

    /// A write run by its caller ([`run_alone`](Self::run_alone)) ended, however: `true` when
    /// writes were queued meanwhile, and the caller must start a task to run them (counted as
    /// running from now); otherwise it no longer counts as running.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(super) fn hand_over(&self) -> bool {
        let mut queue = self.queue();
        if queue.waiting.is_empty() {
            queue.running -= 1;
            return false;
        }
        true
    }

    /// The next batch, at most `max` writes in the order they came; `None` when none is waiting,
    /// and the task that asked stops (a later write starts another).
    // SQLite's writer runs every write of a batch in order; PostgreSQL's needs distinct keys.
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    pub(super) fn next(&self, max: usize) -> Option<Vec<W>> {
        let mut queue = self.queue();
        if queue.waiting.is_empty() {
            queue.running -= 1;
            return None;
        }
        if queue.waiting.len() <= max {
            return Some(mem::take(&mut queue.waiting));
        }
        let rest = queue.waiting.split_off(max);
        Some(mem::replace(&mut queue.waiting, rest))
    }

    /// Like [`next`](Self::next), but no two writes of the batch have the same `key`: a write
    /// whose key is already in the batch stays queued, in its place, for a later one.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(super) fn next_distinct<K: Eq + Hash>(&self, max: usize, key: impl Fn(&W) -> K) -> Option<Vec<W>> {
        let mut queue = self.queue();
        if queue.waiting.is_empty() {
            queue.running -= 1;
            return None;
        }
        let mut seen = HashSet::new();
        let (mut batch, mut rest) = (Vec::with_capacity(queue.waiting.len().min(max)), Vec::new());
        for write in queue.waiting.drain(..) {
            if batch.len() < max && seen.insert(key(&write)) {
                batch.push(write);
            } else {
                rest.push(write);
            }
        }
        queue.waiting = rest;
        Some(batch)
    }

    /// A writer task stopped before the queue was empty (its runtime shut down): it no longer
    /// counts as running, and when no other runs, the writes left are handed back to be answered
    /// as unavailable (the next write starts another task).
    pub(super) fn stopped(&self) -> Vec<W> {
        let mut queue = self.queue();
        queue.running = queue.running.saturating_sub(1);
        match queue.running {
            0 => mem::take(&mut queue.waiting),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_write_starts_a_writer_and_batches_keep_their_order() {
        let batches = Batches::default();
        assert!(batches.push(1, 1));
        assert!(!batches.push(2, 1));
        assert!(!batches.push(3, 1));
        assert_eq!(batches.next(2), Some(vec![1, 2]));
        assert_eq!(batches.next(2), Some(vec![3]));
        assert_eq!(batches.next(2), None);
        // The writer stopped: the next write starts another.
        assert!(batches.push(4, 1));
    }

    #[test]
    fn a_write_alone_runs_in_its_caller_and_hands_over_what_queued_meanwhile() {
        let batches = Batches::default();
        assert!(batches.run_alone());
        assert!(!batches.run_alone(), "one write runs alone at a time");
        assert!(!batches.push(1, 1), "the caller running alone counts as the writer");
        assert!(batches.hand_over(), "a write queued meanwhile: a task must run it");
        assert!(!batches.run_alone(), "that task runs");
        assert_eq!(batches.next(8), Some(vec![1]));
        assert_eq!(batches.next(8), None);
        assert!(batches.run_alone());
        assert!(!batches.hand_over(), "nothing queued: nothing to hand over");
        assert!(batches.push(2, 1), "no writer runs: the queued write starts one");
        assert!(!batches.run_alone(), "a write waits: the next queues behind it");
    }

    #[test]
    fn writers_are_bounded() {
        let batches = Batches::default();
        assert!(batches.push(1, 2));
        assert!(batches.push(2, 2));
        assert!(!batches.push(3, 2));
        assert_eq!(batches.next(8), Some(vec![1, 2, 3]));
        // One writer found the queue empty and stopped; the other still runs.
        assert_eq!(batches.next(8), None);
        assert!(batches.push(4, 2), "one writer runs: room for another");
        assert!(!batches.push(5, 2));
        assert_eq!(batches.next(8), Some(vec![4, 5]));
        assert_eq!(batches.next(8), None);
        assert_eq!(batches.next(8), None);
        assert!(batches.push(6, 2));
    }

    #[test]
    fn distinct_batches_leave_repeated_keys_for_the_next() {
        let batches = Batches::default();
        for write in [(1, 'a'), (1, 'b'), (2, 'c'), (3, 'd'), (2, 'e')] {
            batches.push(write, 1);
        }
        assert_eq!(batches.next_distinct(8, |w| w.0), Some(vec![(1, 'a'), (2, 'c'), (3, 'd')]));
        assert_eq!(batches.next_distinct(8, |w| w.0), Some(vec![(1, 'b'), (2, 'e')]));
        assert_eq!(batches.next_distinct(8, |w| w.0), None);
        for write in [(1, 'a'), (2, 'b'), (3, 'c')] {
            batches.push(write, 1);
        }
        assert_eq!(batches.next_distinct(2, |w| w.0), Some(vec![(1, 'a'), (2, 'b')]));
    }

    #[test]
    fn a_stopped_writer_hands_back_what_no_other_will_run() {
        let batches = Batches::default();
        assert!(batches.push(1, 2));
        assert!(batches.push(2, 2));
        assert_eq!(batches.stopped(), Vec::<i32>::new(), "another writer runs them");
        assert_eq!(batches.stopped(), vec![1, 2]);
        assert!(batches.push(3, 2));
    }
}
