//! A model of the `idempotent` claim protocol, checked exhaustively with
//! [stateright](https://docs.rs/stateright), and the sequential specification of its stores.
//!
//! ```
//! use idempotent_model::{check, Protocol};
//!
//! // One worker with an exact clock and one client attempt (the suite checks larger ones).
//! let outcome = check(Protocol::engine(1, 1, 0), 1);
//! assert!(outcome.broken().is_empty(), "{:?}", outcome.discoveries);
//! assert!(outcome.states > 1000);
//! ```
//!
//! - [`store`]: one key's record and what each store operation does to it;
//! - [`protocol`]: workers, their clocks, the network and the store, as a stateright model, with
//!   the properties the engine promises and the variants that break them;
//! - [`timing`]: the model's durations, from the engine's own lease arithmetic;
//! - [`linearizable`]: a checker of concurrent histories of real stores against [`store::step`].
//!
//! # Why a crate of its own
//! The model depends on `idempotent-core` without any store backend, so checking it builds only
//! the core and the checker, not the servers' clients and frameworks the `tests` crate links; and
//! the store tests in `tests/` (`model_store_step.rs`, `store_linearizable.rs`) use its
//! specification as a library. It is not published: it is part of the test suite.
//!
//! The checks themselves are this crate's tests (`cargo test -p idempotent-model`); a longer run
//! is `IDEMPOTENT_MODEL_LONG=1 cargo test -p idempotent-model --release -- --ignored --nocapture`
//! (see `docs/verification.md`).

pub mod check;
pub mod linearizable;
pub mod protocol;
pub mod store;
pub mod timing;

pub use check::{check, find_failure, Outcome};
pub use protocol::{Protocol, Variant};
