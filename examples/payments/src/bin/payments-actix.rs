//! `payments-actix`: the payments demo on actix-web.
//!
//! `payments-actix` serves; `payments-actix policies [--format md|json|html]` prints the
//! idempotency policy report and exits;
//! `payments-actix records inspect|purge --scope SCOPE --key KEY [--actor ACCOUNT]` shows or deletes one
//! idempotency record.

use idempotent_actix::core::registry::Framework;
use payments_demo::{actix_app, cli};
use std::process::ExitCode;

const BIN: &str = "payments-actix";

#[actix_web::main]
async fn main() -> ExitCode {
    let config = match cli::parse(BIN, Framework::Actix).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    // Before the application is built: its runtime describes its metrics to this recorder.
    if let Err(e) = payments_demo::metrics::install() {
        return cli::fail(BIN, e);
    }
    let (addr, server) = match actix_app::start_until(&config, cli::shutdown_signal()).await {
        Ok(s) => s,
        Err(e) => return cli::fail(BIN, e),
    };
    cli::listening(BIN, addr, &config);
    match server.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::fail(BIN, format!("server error: {e}")),
    }
}
