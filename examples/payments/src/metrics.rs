//! `GET /metrics`: the idempotency runtime's metrics (see `idempotent_core::telemetry`) in the
//! Prometheus text format, through `metrics-exporter-prometheus`.
//!
//! A binary installs the recorder once at start-up ([`install`]), before it builds its
//! application; the routes of both frameworks only render it ([`exposition`]). A process that
//! installed none (an application built in a test) answers 404.

use crate::api::{DemoProblem, PROBLEM_CONTENT_TYPE};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::sync::OnceLock;
use std::time::Duration;

/// Media type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of the store-operation histogram, in seconds: from the memory store's microseconds to
/// past the demo's 500 ms store timeout, so that p50 and p99 can be read per operation.
pub const STORE_OPERATION_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The demo's Prometheus recorder: histograms of store operations with
/// [`STORE_OPERATION_BUCKETS`] (a histogram a dashboard can aggregate, rather than the exporter's
/// default summary).
fn builder() -> PrometheusBuilder {
    let store_operations = Matcher::Full(idempotent_axum::core::telemetry::STORE_OPERATION_SECONDS.to_owned());
    PrometheusBuilder::new()
        .set_buckets_for_metric(store_operations, STORE_OPERATION_BUCKETS)
        .expect("the buckets are not empty")
}

/// The demo's recorder, not installed, and the handle that renders it: for a benchmark that
/// installs it where it chooses.
pub fn recorder() -> (PrometheusRecorder, PrometheusHandle) {
    let recorder = builder().build_recorder();
    let handle = recorder.handle();
    (recorder, handle)
}

/// Installs the demo's recorder as the process's global recorder, for `GET /metrics` to render,
/// and starts its upkeep (draining histogram samples every few seconds, also when nobody
/// scrapes). Call it once, at the binary's start-up and before the application is built (the
/// runtime describes its metrics to the recorder installed then).
pub fn install() -> Result<(), String> {
    let handle = builder().install_recorder().map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            upkeep.run_upkeep();
        })
        .map_err(|e| format!("cannot start the metrics upkeep thread: {e}"))?;
    HANDLE.set(handle).map_err(|_| "the metrics recorder is already installed".to_owned())
}

/// The answer to `GET /metrics`: status, content type and body.
pub fn exposition() -> (u16, &'static str, String) {
    match HANDLE.get() {
        Some(handle) => (200, CONTENT_TYPE, handle.render()),
        None => {
            let p = DemoProblem::new(
                404,
                "no-metrics",
                "No metrics",
                "This process installed no metrics recorder; the payments binaries do at start-up.",
            );
            (p.status, PROBLEM_CONTENT_TYPE, p.body)
        }
    }
}
