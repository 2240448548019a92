//! Helpers of the consumer protocol for brokers without progress acknowledgements (RabbitMQ):
//! the deadline of one unacknowledged delivery, a reply's headers, a broker's header pairs.

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

#[test]
fn a_replys_headers_say_why_and_whether_it_was_replayed() {
    use bytes::Bytes;
    use idempotent_core::protocol::consume::Reply;
    let first = Reply { body: Bytes::from("ok"), error: None, replayed: false };
    assert!(first.headers().is_empty());
    let again = Reply { error: Some("no such account".into()), replayed: true, ..first };
    assert_eq!(
        again.headers(),
        [("Idempotent-Reason", "no such account".to_owned()), ("Idempotent-Replayed", "true".to_owned())]
    );
}

#[test]
fn a_brokers_header_pairs_become_headers_and_invalid_ones_are_left_out() {
    use idempotent_core::protocol::consume::headers;
    let map = headers([
        ("message-id", "m-1".to_owned()),
        ("x-delivery-count", "2".to_owned()),
        ("bad name", "x".to_owned()),
        ("x-bad-value", "line\nbreak".to_owned()),
        ("message-id", "m-2".to_owned()),
    ]);
    assert_eq!(map.len(), 2);
    assert_eq!(map["message-id"], "m-2", "a later pair replaces an earlier one");
    assert_eq!(map["x-delivery-count"], "2");
}
