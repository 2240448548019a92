//! Running the checker on a configuration, and what it found.

use crate::protocol::{Action, Protocol, State};
use stateright::{Checker, Model, Path};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What one exhaustive check found.
#[derive(Debug)]
pub struct Outcome {
    /// The configuration checked.
    pub protocol: Protocol,
    /// Distinct states reached.
    pub states: usize,
    /// Longest path explored.
    pub depth: usize,
    /// How long the check took.
    pub took: Duration,
    /// For each `always` property, the run that breaks it; for each `sometimes` property, a run
    /// where it happens.
    pub discoveries: BTreeMap<&'static str, Path<State, Action>>,
}

impl Outcome {
    /// The names of the `always` properties some run breaks.
    pub fn broken(&self) -> Vec<&'static str> {
        let always: Vec<&'static str> = self
            .protocol
            .properties()
            .into_iter()
            .filter(|p| p.expectation == stateright::Expectation::Always)
            .map(|p| p.name)
            .collect();
        self.discoveries.keys().copied().filter(|name| always.contains(name)).collect()
    }

    /// The names of the `sometimes` properties no run shows.
    pub fn never_seen(&self) -> Vec<&'static str> {
        self.protocol
            .properties()
            .into_iter()
            .filter(|p| p.expectation == stateright::Expectation::Sometimes)
            .map(|p| p.name)
            .filter(|name| !self.discoveries.contains_key(name))
            .collect()
    }

    /// One line: the configuration, states, depth and time.
    pub fn summary(&self) -> String {
        let p = &self.protocol;
        format!(
            "{:?}: {} workers x {} attempts, drift {} (margin {}), crashes {}, horizon {:?}{}: {} states, depth {}, {:.2} s",
            p.variant,
            p.workers,
            p.attempts,
            p.timing.drift,
            p.timing.margin,
            p.crashes,
            p.horizon,
            p.renewal_failures.map(|k| format!(", at most {k} renewals failing in a row")).unwrap_or_default(),
            self.states,
            self.depth,
            self.took.as_secs_f64()
        )
    }
}

/// Explores every state of `protocol` breadth first on `threads` threads.
pub fn check(protocol: Protocol, threads: usize) -> Outcome {
    run(protocol, threads, false)
}

/// Explores `protocol` breadth first until some run breaks an `always` property (the shortest
/// such run), or every state was seen: for variants that must fail.
pub fn find_failure(protocol: Protocol, threads: usize) -> Outcome {
    run(protocol, threads, true)
}

fn run(protocol: Protocol, threads: usize, first_failure: bool) -> Outcome {
    let started = Instant::now();
    let mut builder = protocol.checker().threads(threads);
    if first_failure {
        builder = builder.finish_when(stateright::HasDiscoveries::AnyFailures);
    }
    let checker = builder.spawn_bfs().join();
    let took = started.elapsed();
    Outcome {
        protocol,
        states: checker.unique_state_count(),
        depth: checker.max_depth(),
        took,
        discoveries: checker.discoveries().into_iter().collect(),
    }
}
