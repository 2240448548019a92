//! Compile-time behaviour of `#[idempotent]`: accepted handlers and the errors of rejected ones.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("ui/pass/*.rs");
    t.compile_fail("ui/fail/*.rs");
    // The actix-web entry point: the same attribute next to actix-web's routing attributes.
    t.pass("ui/actix_pass/*.rs");
    t.compile_fail("ui/actix_fail/*.rs");
    // The NATS entry point: the same attribute on message consumer handlers.
    t.pass("ui/nats_pass/*.rs");
    t.compile_fail("ui/nats_fail/*.rs");
}
