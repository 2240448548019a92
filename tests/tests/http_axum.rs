//! The HTTP conformance suite against the axum demo on a loopback port.

use idempotent_tests::http::temp_ledger;
use payments_demo::config::Config;

async fn start_axum() -> Demo {
    let ledger = temp_ledger();
    let delay = Duration::from_millis(1200);
    let config = Config::new("memory", ledger.clone(), delay);
    let (addr, _server) = payments_demo::axum_app::start(&config).await.expect("demo starts");
    Demo::new(addr, ledger, delay)
}

idempotent_tests::http_conformance_tests!(start_axum());
