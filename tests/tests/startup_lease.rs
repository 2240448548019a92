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
    let error = Idempotency::builder(Arc::new(MemoryStore::new())).build().unwrap_err();
    let StartupError::LeaseTooShort { timeout, routes } = &error else { panic!("{error}") };
    assert_eq!(*timeout, Duration::from_secs(1));
    assert_eq!(routes, &[format!("scope `transfers.create` (startup::create_transfer at {FILE}:1): lease 3s")]);
    let message = error.to_string();
    assert!(message.starts_with("leases too short for the store timeout of 1s"), "{message}");
    assert!(message.contains("store_timeout"), "{message}");
    let fixed = Idempotency::builder(Arc::new(MemoryStore::new())).store_timeout(Duration::from_millis(500)).build();
    assert!(fixed.is_ok(), "3s is six times 500ms");
}
