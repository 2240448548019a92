//! `payments-axum`: the payments demo on axum.
//!
//! `payments-axum` serves; `payments-axum policies [--format md|json|html]` prints the
//! idempotency policy report and exits;
//! `payments-axum records inspect|purge --scope SCOPE --key KEY [--actor ACCOUNT]` shows or deletes one
//! idempotency record.

use idempotent_axum::core::registry::Framework;
use payments_demo::{axum_app, cli};
use std::process::ExitCode;

const BIN: &str = "payments-axum";

#[tokio::main]
async fn main() -> ExitCode {
    let config = match cli::parse(BIN, Framework::Axum).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Before the application is built: its runtime describes its metrics to this recorder.
    if let Err(e) = payments_demo::metrics::install() {
        return cli::fail(BIN, e);
    }
    let (addr, server) = match axum_app::start_until(&config, cli::shutdown_signal()).await {
        Ok(s) => s,
        Err(e) => return cli::fail(BIN, e),
    };
    cli::listening(BIN, addr, &config);
    match server.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => cli::fail(BIN, format!("server error: {e}")),
        Err(e) => cli::fail(BIN, format!("server task failed: {e}")),
    }
}
