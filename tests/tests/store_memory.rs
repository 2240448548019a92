//! The store contract against the in-memory store: with its default bound, and with a bound on
//! records and a quota per actor, which the contract's few records stay well under.

use idempotent_core::store::MemoryStore;
use std::sync::Arc;

idempotent_tests::store_contract_tests!(memory, async { Arc::new(MemoryStore::new()) });

idempotent_tests::store_contract_tests!(memory_bounded_with_actor_quota, async {
    Arc::new(MemoryStore::with_limits(1000, 1 << 20).with_actor_quota(200))
});
