//! The command line shared by both binaries: `BIN` serves, `BIN policies [--format md|json|html]`
//! prints the idempotency policy report of the binary's framework and exits.

use crate::config::Config;
use idempotent_axum::core::registry::{self, Framework};
use idempotent_axum::core::report;
use std::process::ExitCode;

/// Prints `BIN: msg` on stderr and returns the failure exit code.
pub fn fail(bin: &str, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("{bin}: {msg}");
    ExitCode::from(2)
}

/// Handles the command line: `Err(code)` when the process must exit now (the `policies`
/// subcommand, a usage error, bad configuration), else the configuration to serve with. Sets up
/// logging on stderr before returning a configuration.
pub fn parse(bin: &str, framework: Framework) -> Result<Config, ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("policies") {
        let format = match args.get(1).map(String::as_str) {
            None => "md",
            Some("--format") => match args.get(2) {
                Some(f) => f.as_str(),
                None => return Err(fail(bin, "--format needs a value: md, json or html")),
            },
            Some(other) => {
                return Err(fail(
                    bin,
                    format!("unknown argument `{other}`; usage: {bin} policies [--format md|json|html]"),
                ))
            }
        };
        return Err(match format.parse::<report::Format>() {
            Ok(f) => {
                print!("{}", report::render(&registry::routes_of(framework), f));
                ExitCode::SUCCESS
            }
            Err(e) => fail(bin, e),
        });
    }
    if let Some(other) = args.first() {
        return Err(fail(bin, format!("unknown command `{other}`; usage: {bin} [policies [--format md|json|html]]")));
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Config::from_env().map_err(|e| fail(bin, e))
}

/// The line a binary prints on stderr once it listens.
pub fn listening(bin: &str, addr: std::net::SocketAddr, config: &Config) {
    eprintln!("{bin} listening on http://{addr} (store: {}, ledger: {})", config.store, config.ledger.display());
}

/// How long a binary that was asked to stop waits for in-flight requests (their handlers and the
/// storing of their outcomes) before it exits anyway.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Resolves on SIGTERM or Ctrl-C (SIGINT): the binaries then stop accepting connections, drain
/// in-flight requests for up to [`SHUTDOWN_GRACE`] and exit 0.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                eprintln!("cannot listen for SIGTERM ({e}); stop with Ctrl-C");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
