//! `Idempotency::builder(..).build()` refuses to start on an invalid registry, listing every
//! problem. The records are submitted by hand (the attribute rejects most of them at compile
//! time), so this test binary has a registry of its own.

use idempotent_axum::core::policy::{ConflictMode, Policy, StoredOutcomes};
use idempotent_axum::core::registry::{Framework, RouteRecord};
use idempotent_axum::core::store::MemoryStore;
use idempotent_axum::{Idempotency, StartupError};
use std::sync::Arc;
use std::time::Duration;

const FILE: &str = "tests/tests/startup_axum.rs";

idempotent_axum::__private::inventory::submit! {
    RouteRecord::protected(Policy::new("orders.create"), "startup::create_order", FILE, 1, Framework::Axum)
        .at("POST", "/orders")
}
idempotent_axum::__private::inventory::submit! {
    RouteRecord::protected(Policy::new("orders.create"), "startup::create_order_v2", FILE, 2, Framework::Axum)
        .at("POST", "/v2/orders")
}
idempotent_axum::__private::inventory::submit! {
    RouteRecord::protected(
        Policy { ttl: Duration::from_secs(5), lease: Duration::from_secs(10), ..Policy::new("quotes.create") },
        "startup::create_quote", FILE, 3, Framework::Axum,
    )
}
idempotent_axum::__private::inventory::submit! {
    RouteRecord::protected(
        Policy { on_conflict: ConflictMode::Wait, wait_timeout: Duration::ZERO, ..Policy::new("refunds.create") },
        "startup::create_refund", FILE, 4, Framework::Axum,
    )
}
idempotent_axum::__private::inventory::submit! {
    RouteRecord::protected(
        Policy { outcomes: StoredOutcomes::All, fail_open: true, ..Policy::new("charges.create") },
        "startup::create_charge", FILE, 5, Framework::Axum,
    )
}
idempotent_axum::__private::inventory::submit! {
    RouteRecord { policy: Some(Policy::new("profiles.put")), ..RouteRecord::exempted("natural key", "startup::put_profile", FILE, 6, Framework::Axum).at("PUT", "/profile") }
}
idempotent_axum::__private::inventory::submit! {
    RouteRecord::exempted("natural key", "startup::put_settings", FILE, 7, Framework::Axum).at("POST", "/orders")
}
// Another framework's records are validated by its own runtime.
idempotent_axum::__private::inventory::submit! {
    RouteRecord::protected(Policy::new("orders.create"), "startup::actix_order", FILE, 8, Framework::Actix)
        .at("POST", "/orders")
}

#[test]
fn build_lists_every_problem() {
    let error = Idempotency::builder(Arc::new(MemoryStore::new()))
        .actor(idempotent_axum::ActorSource::Anonymous)
        .build()
        .unwrap_err();
    let StartupError::Registry(errors) = &error else { panic!("{error}") };
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let at = |line: u32, handler: &str| format!("startup::{handler} at {FILE}:{line}");
    assert_eq!(
        lines,
        [
            format!("scope `orders.create` is declared by more than one handler: {}, {}", at(1, "create_order"), at(2, "create_order_v2")),
            format!("route `POST /orders` is registered by more than one handler: {}, {}", at(1, "create_order"), at(7, "put_settings")),
            format!("scope `charges.create` ({}): store `all` promises the handler never runs twice for one key, but fail_open runs it unprotected when the store is unreachable; drop one", at(5, "create_charge")),
            format!("scope `quotes.create` ({}): lease (10s) is longer than ttl (5s)", at(3, "create_quote")),
            format!("scope `refunds.create` ({}): on_conflict is `wait` with a zero wait_timeout: a duplicate could never wait", at(4, "create_refund")),
            format!("exempt route ({}): the route is exempt and also declares a policy (scope `profiles.put`); keep one", at(6, "put_profile")),
        ]
    );
    let message = error.to_string();
    assert!(message.starts_with("invalid idempotency policies:\n  - scope `orders.create`"), "{message}");
    assert_eq!(message.lines().count(), 1 + lines.len(), "{message}");
}
