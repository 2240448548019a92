//! The store contract against the in-memory store.

use idempotent_core::store::MemoryStore;
use std::sync::Arc;

idempotent_tests::store_contract_tests!(memory, async { Arc::new(MemoryStore::new()) });
