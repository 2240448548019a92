//! A runtime refuses to start when a route's lease could not survive one failed renewal with the
//! configured store timeout (a lease must be at least six times it), naming each such route.

use idempotent_axum::core::policy::Policy;
use idempotent_axum::core::registry::{Framework, RouteRecord};
use idempotent_axum::core::store::MemoryStore;
use idempotent_axum::{Idempotency, StartupError};
use std::sync::Arc;
use std::time::Duration;

const FILE: &str = "tests/tests/startup_lease.rs";

idempotent_axum::__private::inventory::submit! {
    RouteRecord::protected(
        Policy { lease: Duration::from_secs(3), ..Policy::new("transfers.create") },
        "startup::create_transfer", FILE, 1, Framework::Axum,
    )
    .at("POST", "/transfers")
}
idempotent_axum::__private::inventory::submit! {
    RouteRecord::protected(Policy::new("payments.create"), "startup::create_payment", FILE, 2, Framework::Axum)
        .at("POST", "/payments")
}

#[test]
fn a_lease_shorter_than_six_store_timeouts_refuses_to_start() {
    let error = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .build()
        .unwrap_err();
    let StartupError::LeaseTooShort { timeout, routes } = &error else { panic!("{error}") };
    assert_eq!(*timeout, Duration::from_secs(1));
    let routes: Vec<&String> = routes.iter().map(|(route, _)| route).collect();
    assert_eq!(routes, [&format!("scope `transfers.create` (startup::create_transfer at {FILE}:1): lease 3s")]);
    let message = error.to_string();
    assert!(message.starts_with("leases too short for the store timeout of 1s"), "{message}");
    // The same rule as the attribute's message, with the numbers that fix it.
    assert!(message.contains("at least 6 times the store timeout (6s here"), "{message}");
    assert!(message.contains("`#[idempotent]` itself accepts any lease from 1 s"), "{message}");
    assert!(message.contains("`.store_timeout(..)` to at most a sixth of the shortest lease (500ms)"), "{message}");
    let fixed = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .store_timeout(Duration::from_millis(500))
        .build();
    assert!(fixed.is_ok(), "3s is six times 500ms");
}

/// Every problem at once: a short lease and no actor source chosen are two lines of one error.
#[test]
fn every_problem_is_reported_at_once() {
    let error = Idempotency::builder(Arc::new(MemoryStore::new())).build().unwrap_err();
    let problems = error.problems();
    assert_eq!(problems.len(), 2, "{error}");
    assert!(matches!(problems[0], StartupError::LeaseTooShort { .. }), "{error}");
    let StartupError::ActorSourceNotChosen { routes } = problems[1] else { panic!("{error}") };
    assert_eq!(routes.len(), 2, "both protected routes are named: {routes:?}");
    let message = error.to_string();
    assert!(message.contains("no actor source chosen"), "{message}");
    assert!(message.contains(".actor(ActorSource::Anonymous)` on purpose"), "{message}");
}
