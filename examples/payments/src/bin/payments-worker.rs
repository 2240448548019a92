//! `payments-worker`: the settlement worker of the payments demo.
//!
//! `payments-worker` consumes settlements from the broker `PAYMENTS_BROKER` names (this build:
//! `amqp://USER:PASS@HOST:PORT/VHOST`, RabbitMQ) until SIGTERM, then finishes the settlements in
//! flight, acknowledges them and exits 0; `payments-worker policies [--format md|json|html]`
//! prints the idempotency policy report, the consumer beside the API's routes, and exits.

use idempotent_axum::core::registry::{self, Framework};
use idempotent_axum::core::report;
use payments_demo::cli;
use std::process::ExitCode;
use std::time::Duration;

const BIN: &str = "payments-worker";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("policies") {
        // The API's routes (one framework's: both serve the same) and the consumers.
        let records: Vec<_> = registry::routes()
            .into_iter()
            .filter(|r| r.framework == Framework::Axum || r.framework.is_consumer())
            .collect();
        let format = match &args[1..] {
            [] => Ok(report::Format::Markdown),
            [flag, value] if flag == "--format" => value.parse(),
            _ => Err(format!("usage: {BIN} policies [--format md|json|html]")),
        };
        return match format {
            Ok(format) => {
                print!("{}", report::render(&records, format));
                ExitCode::SUCCESS
            }
            Err(e) => cli::fail(BIN, e),
        };
    }
    let config = match cli::parse(BIN, Framework::RabbitMq).await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let broker = std::env::var("PAYMENTS_BROKER").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let delay = std::env::var("PAYMENTS_SETTLE_DELAY_MS").unwrap_or_else(|_| "200".into());
    let delay = match delay.parse::<u64>() {
        Ok(ms) => Duration::from_millis(ms),
        Err(e) => return cli::fail(BIN, format!("PAYMENTS_SETTLE_DELAY_MS `{delay}` is not a number of ms: {e}")),
    };
    let run = match broker.split_once("://").map(|(scheme, _)| scheme) {
        Some("amqp") => payments_demo::worker_amqp::run_amqp(&config, &broker, delay, cli::shutdown_signal()).await,
        _ => Err(format!("PAYMENTS_BROKER `{broker}`: this build consumes from amqp://USER:PASS@HOST:PORT/VHOST")),
    };
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::fail(BIN, e),
    }
}
