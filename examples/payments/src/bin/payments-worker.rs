//! `payments-worker`: settles payments from a broker (see `payments_demo::worker`).
//!
//! `payments-worker` consumes until SIGTERM or Ctrl-C; `payments-worker policies [--format
//! md|json|html]` prints the policy report of the API's routes and this consumer, and exits.

use idempotent_nats::core::registry::{self, Framework};
use idempotent_nats::core::report::{self, Format};
use idempotent_nats::CancellationToken;
use payments_demo::worker::{self, WorkerConfig};
use std::process::ExitCode;

const BIN: &str = "payments-worker";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("policies") {
        return policies(&args);
    }
    if let Some(other) = args.first() {
        return payments_demo::cli::fail(
            BIN,
            format!("unknown argument `{other}`; usage: {BIN} [policies [--format md|json|html]]"),
        );
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let config = match WorkerConfig::from_env() {
        Ok(c) => c,
        Err(e) => return payments_demo::cli::fail(BIN, e),
    };
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            payments_demo::cli::shutdown_signal().await;
            stop.cancel();
        }
    });
    let ledger = config.ledger.clone();
    let ready = |what: &str| eprintln!("{BIN}: {what}, ledger {}", ledger.display());
    match worker::run(config, stop, ready).await {
        Ok(()) => {
            eprintln!("{BIN}: stopped");
            ExitCode::SUCCESS
        }
        Err(e) => payments_demo::cli::fail(BIN, e),
    }
}

/// The report of the API's routes (as `payments-axum` serves them) and of this consumer.
fn policies(args: &[String]) -> ExitCode {
    let format = match &args[1..] {
        [] => Ok(Format::Markdown),
        [flag, value] if flag == "--format" => value.parse::<Format>(),
        _ => Err("usage: policies [--format md|json|html]".to_owned()),
    };
    match format {
        Ok(format) => {
            registry::bind_consumer(Framework::Nats, worker::settle.handler, worker::binding());
            let mut routes = registry::routes_of(Framework::Axum);
            routes.extend(registry::routes_of(Framework::Nats));
            routes.extend(registry::routes_of(Framework::RabbitMq));
            print!("{}", report::render(&routes, format));
            ExitCode::SUCCESS
        }
        Err(e) => payments_demo::cli::fail(BIN, e),
    }
}
