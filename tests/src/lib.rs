//! Support for the cross-crate tests: the HTTP conformance suite of the payments demo, run
//! unchanged against each framework's binary, and the harness that finds or starts real servers.

pub mod contract;
pub mod fault_proxy;
pub mod http;
pub mod identity;
pub mod postgres;
pub mod process;
pub mod redis_server;
