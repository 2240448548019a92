//! A broker's bound on one unacknowledged delivery (RabbitMQ's consumer timeout) against a
//! handler's longest run and its lease.

use idempotent_core::policy::Policy;
use idempotent_core::protocol::consume::check_deadline;
use std::time::Duration;

#[test]
fn start_up_refuses_a_handler_that_cannot_finish_within_the_brokers_deadline() {
    let policy = Policy { lease: Duration::from_secs(10), ..Policy::new("settlements.create") };
    let secs = Duration::from_secs;
    assert_eq!(check_deadline(&policy, "payments.settle", secs(1800), secs(300)), Ok(()));
    assert_eq!(check_deadline(&policy, "payments.settle", secs(40), secs(30)), Ok(()), "exactly fits");
    let error = check_deadline(&policy, "payments.settle", secs(15), secs(30)).unwrap_err();
    assert_eq!(
        error.0,
        ["consumer `payments.settle` (scope `settlements.create`): a delivery may stay unacknowledged for max processing 30s + lease 10s = 40s, longer than the broker's deadline of 15s (RabbitMQ's consumer timeout), which would deliver it again while it runs; raise the deadline or lower the max processing"]
    );
    assert!(error.to_string().starts_with("the consumer cannot keep its promise of running each message once:\n  - "));
}
