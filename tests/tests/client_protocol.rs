//! `idempotent-client` depends on no part of the server runtime, so it keeps the few names of the
//! protocol it reads as constants of its own: they must be the ones the server uses.

use idempotent_core::problem::ProblemKind;

#[test]
fn the_clients_protocol_names_are_the_servers() {
    assert_eq!(idempotent_client::KEY_HEADER, idempotent_core::engine::DEFAULT_HEADER);
    assert_eq!(idempotent_client::REPLAYED_HEADER, idempotent_core::engine::REPLAYED_HEADER);
    assert_eq!(idempotent_client::PROBLEM_CONTENT_TYPE, idempotent_core::problem::CONTENT_TYPE);
    assert_eq!(idempotent_client::retry::IN_PROGRESS_PROBLEM, ProblemKind::InProgress.type_uri());
    assert_eq!(ProblemKind::InProgress.status(), 409, "the client retries a 409 of this type");
}
