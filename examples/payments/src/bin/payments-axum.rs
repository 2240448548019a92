//! `payments-axum`: the payments demo on axum.
//!
//! `payments-axum` serves; `payments-axum policies [--format md|json|html]` prints the
//! idempotency policy report and exits.

use idempotent_axum::core::{registry, report};
use payments_demo::axum_app;
use payments_demo::config::Config;
use std::process::ExitCode;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("payments-axum: {msg}");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("policies") {
        let format = match args.get(1).map(String::as_str) {
            None => "md",
            Some("--format") => match args.get(2) {
                Some(f) => f.as_str(),
                None => return fail("--format needs a value: md, json or html"),
            },
            Some(other) => {
                return fail(format!(
                    "unknown argument `{other}`; usage: payments-axum policies [--format md|json|html]"
                ))
            }
        };
        return match format.parse::<report::Format>() {
            Ok(f) => {
                print!("{}", report::render(&registry::routes(), f));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    if let Some(other) = args.first() {
        return fail(format!("unknown command `{other}`; usage: payments-axum [policies [--format md|json|html]]"));
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let (addr, server) = match axum_app::start(&config).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    eprintln!("payments-axum listening on http://{addr} (store: {}, ledger: {})", config.store, config.ledger.display());
    match server.await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => fail(format!("server error: {e}")),
        Err(e) => fail(format!("server task failed: {e}")),
    }
}
