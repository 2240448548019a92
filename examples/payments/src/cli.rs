//! The command line shared by both binaries: `BIN` serves, `BIN policies [--format md|json|html]`
//! prints the idempotency policy report of the binary's framework and exits, and
//! `BIN records inspect|purge --scope SCOPE --key KEY [--actor ACCOUNT]` shows or deletes one
//! idempotency record in the configured store (`IDEMPOTENCY_STORE`) for operators.

use crate::config::Config;
use idempotent_axum::core::key::IdempotencyKey;
use idempotent_axum::core::protocol::status::record_json;
use idempotent_axum::core::registry::Framework;
use idempotent_axum::core::report;
use idempotent_axum::core::store::{self, Invalidated, Purge, RecordKey};
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
    if let Some(report) = report::command(framework, &args) {
        return Err(match report {
            Ok(text) => {
                print!("{text}");
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

const RECORDS_USAGE: &str = "records inspect|purge --scope SCOPE --key KEY [--actor ACCOUNT] [--force]";

/// `records inspect|purge`: shows (as the status endpoint's JSON, on stdout) or deletes one
/// record of the store `IDEMPOTENCY_STORE` names, opened as an operator's tool (nothing created,
/// migrated or swept: a mistyped SQLite path or the wrong database is an error). `--actor` is
/// the account whose request created the record, as the demo resolves it from the bearer token;
/// without it, the anonymous namespace. The key is read as the key header is (a quoted key is the
/// same key unquoted). `purge` deletes a completed record only; a claim in progress is refused,
/// since deleting it lets a retry run the operation again while the first run may still be going,
/// unless `--force` says that is what is wanted (it says what it did).
///
/// Exit 0 when the record was there (and, for `purge`, deleted), 1 when it was not, 2 on a usage,
/// configuration or store error, 3 when `purge` refused a claim in progress.
async fn records(bin: &str, args: &[String]) -> ExitCode {
    let usage = |what: &str| fail(bin, format!("{what}; usage: {bin} {RECORDS_USAGE}"));
    let Some(action) = args.first().map(String::as_str).filter(|a| matches!(*a, "inspect" | "purge")) else {
        return usage("records needs `inspect` or `purge`");
    };
    let (mut scope, mut key, mut actor, mut force) = (None, None, None, false);
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        let slot = match flag.as_str() {
            "--scope" => &mut scope,
            "--key" => &mut key,
            "--actor" => &mut actor,
            "--force" if action == "purge" => {
                force = true;
                continue;
            }
            other => return usage(&format!("unknown argument `{other}`")),
        };
        match rest.next().filter(|value| !value.starts_with("--")) {
            Some(value) if slot.is_none() => *slot = Some(value.clone()),
            Some(_) => return usage(&format!("{flag} given twice")),
            None => return usage(&format!("{flag} needs a value")),
        }
    }
    let (Some(scope), Some(raw_key)) = (scope, key) else { return usage("--scope and --key are required") };
    if actor.as_deref() == Some("") {
        return usage("--actor needs an account; leave it out for the anonymous namespace");
    }
    let key = match IdempotencyKey::parse(raw_key.as_bytes()) {
        Ok(key) => key,
        Err(e) => return fail(bin, format!("`{raw_key}` is not an idempotency key: {e}")),
    };
    let key = key.as_str();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => return fail(bin, e),
    };
    let store = match store::open(&config.store, store::Purpose::Operate).await {
        Ok(s) => s,
        Err(e) => return fail(bin, format!("idempotency store `{}`: {e}", config.store_shown())),
    };
    let record = RecordKey::keyed(&config.digests(), &scope, actor.as_deref(), key);
    let whose = actor.as_deref().map_or_else(|| "anonymous callers".to_owned(), |a| format!("account `{a}`"));
    let outcome = match action {
        "inspect" => store.inspect(&record).await.map(|info| match info {
            Some(info) => {
                println!("{}", record_json(&scope, key, &info));
                Invalidated::Deleted
            }
            None => Invalidated::Absent,
        }),
        _ => store.invalidate(&record, if force { Purge::Any } else { Purge::Completed }).await,
    };
    match outcome {
        Ok(Invalidated::Deleted) => {
            if action == "purge" {
                println!("purged the record of key `{key}` on `{scope}` for {whose}");
                if force {
                    eprintln!(
                        "{bin}: --force: if the record was a claim in progress and its request is still running, the next request with this key runs the operation again while it runs"
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Ok(Invalidated::Absent) => {
            eprintln!("{bin}: no record of key `{key}` on `{scope}` for {whose}");
            ExitCode::from(1)
        }
        Ok(Invalidated::InProgress) => {
            eprintln!(
                "{bin}: key `{key}` on `{scope}` for {whose} is a claim in progress: its request may still be running, and deleting it would let a retry run the operation a second time. Nothing was deleted. Wait for it to complete (then purge), or pass --force if you know its process is gone."
            );
            ExitCode::from(3)
        }
        Err(e) => fail(bin, format!("idempotency store `{}`: {e}", config.store_shown())),
    }
}

/// The line a binary prints on stderr once it listens.
pub fn listening(bin: &str, addr: std::net::SocketAddr, config: &Config) {
    eprintln!(
        "{bin} listening on http://{addr} (store: {}, ledger: {})",
        config.store_shown(),
        config.ledger.display()
    );
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
