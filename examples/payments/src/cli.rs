//! The command line shared by both binaries: `BIN` serves, `BIN policies [--format md|json|html]`
//! prints the idempotency policy report of the binary's framework and exits, and
//! `BIN records inspect|purge --scope SCOPE --key KEY [--actor ACCOUNT]` shows or deletes one
//! idempotency record in the configured store (`IDEMPOTENCY_STORE`) for operators.

use crate::config::Config;
use idempotent_axum::core::key::IdempotencyKey;
use idempotent_axum::core::protocol::status::record_json;
use idempotent_axum::core::registry::{self, Framework};
use idempotent_axum::core::report;
use idempotent_axum::core::store::{self, RecordKey};
use std::process::ExitCode;

/// Prints `BIN: msg` on stderr and returns the failure exit code.
pub fn fail(bin: &str, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("{bin}: {msg}");
    ExitCode::from(2)
}

/// Handles the command line: `Err(code)` when the process must exit now (the `policies` and
/// `records` subcommands, a usage error, bad configuration), else the configuration to serve
/// with. Sets up logging on stderr before returning a configuration.
pub async fn parse(bin: &str, framework: Framework) -> Result<Config, ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("records") {
        return Err(records(bin, &args[1..]).await);
    }
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
        return Err(fail(
            bin,
            format!("unknown command `{other}`; usage: {bin} [policies [--format md|json|html] | {RECORDS_USAGE}]"),
        ));
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Config::from_env().map_err(|e| fail(bin, e))
}

const RECORDS_USAGE: &str = "records inspect|purge --scope SCOPE --key KEY [--actor ACCOUNT]";

/// `records inspect|purge`: shows (as the status endpoint's JSON, on stdout) or deletes one
/// record of the store `IDEMPOTENCY_STORE` names. `--actor` is the account whose request created
/// the record, as the demo resolves it from the bearer token; without it, the anonymous
/// namespace. Exit 0 when the record was there, 1 when it was not, 2 on a usage, configuration or
/// store error.
async fn records(bin: &str, args: &[String]) -> ExitCode {
    let usage = |what: &str| fail(bin, format!("{what}; usage: {bin} {RECORDS_USAGE}"));
    let Some(action) = args.first().map(String::as_str).filter(|a| matches!(*a, "inspect" | "purge")) else {
        return usage("records needs `inspect` or `purge`");
    };
    let (mut scope, mut key, mut actor) = (None, None, None);
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        let slot = match flag.as_str() {
            "--scope" => &mut scope,
            "--key" => &mut key,
            "--actor" => &mut actor,
            other => return usage(&format!("unknown argument `{other}`")),
        };
        match rest.next() {
            Some(value) => *slot = Some(value.clone()),
            None => return usage(&format!("{flag} needs a value")),
        }
    }
    let (Some(scope), Some(key)) = (scope, key) else { return usage("--scope and --key are required") };
    if let Err(e) = IdempotencyKey::parse(key.as_bytes()) {
        return fail(bin, format!("`{key}` is not an idempotency key: {e}"));
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return fail(bin, e),
    };
    let store = match store::connect(&config.store).await {
        Ok(s) => s,
        Err(e) => return fail(bin, format!("idempotency store `{}`: {e}", config.store)),
    };
    let record = RecordKey::of(&scope, actor.as_deref(), &key);
    let whose = actor.as_deref().map_or_else(|| "anonymous callers".to_owned(), |a| format!("account `{a}`"));
    let found = match action {
        "inspect" => store.inspect(&record).await.map(|info| {
            if let Some(info) = &info {
                println!("{}", record_json(&scope, &key, info));
            }
            info.is_some()
        }),
        _ => store.invalidate(&record).await.inspect(|&deleted| {
            if deleted {
                println!("purged the record of key `{key}` on `{scope}` for {whose}");
            }
        }),
    };
    match found {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("{bin}: no record of key `{key}` on `{scope}` for {whose}");
            ExitCode::from(1)
        }
        Err(e) => fail(bin, format!("idempotency store `{}`: {e}", config.store)),
    }
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
