//! `payments-client`: the demo's command-line client, built on `idempotent-client`.
//!
//! ```text
//! payments-client [--url URL] [--account ACCT] pay --amount N --currency EUR --customer C [--key K]
//! ```
//!
//! sends one logical payment (`POST /payments` with `Authorization: Bearer ACCT`) under one
//! `Idempotency-Key` (`K`, or a fresh UUIDv7), retrying lost connections, timeouts, 409
//! in-progress, 429 and 503 (honouring `Retry-After`, else backoff with jitter; 5 attempts within
//! 30 seconds at most). It prints the final response body on stdout and `replayed: true|false` on
//! stderr, and exits 0 on a 2xx answer, 1 on any other answer or when no answer came, 2 on a usage
//! error. Defaults: `--url http://127.0.0.1:3000`, `--account acct_demo`. Retries are logged on
//! stderr (`RUST_LOG` overrides the `idempotent_client=info` default).

use idempotent_client::{IdempotencyMiddleware, Outcome};
use payments_demo::cli;
use std::io::Write;
use std::process::ExitCode;

const BIN: &str = "payments-client";
const USAGE: &str =
    "usage: payments-client [--url URL] [--account ACCT] pay --amount N --currency EUR --customer C [--key K]";

/// The command line, parsed.
#[derive(Debug)]
struct Pay {
    url: String,
    account: String,
    amount: i64,
    currency: String,
    customer: String,
    key: Option<String>,
}

fn parse(args: &[String]) -> Result<Pay, String> {
    let mut url = "http://127.0.0.1:3000".to_owned();
    let mut account = "acct_demo".to_owned();
    let (mut amount, mut currency, mut customer, mut key) = (None, None, None, None);
    let mut command = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        if !name.starts_with("--") {
            if command.is_some() {
                return Err(format!("unexpected argument `{arg}`"));
            }
            command = Some(name.to_owned());
            continue;
        }
        let mut value = || inline.clone().or_else(|| it.next().cloned()).ok_or(format!("{name} needs a value"));
        match name {
            "--url" => url = value()?,
            "--account" => account = value()?,
            "--amount" => {
                let v = value()?;
                amount = Some(v.parse::<i64>().map_err(|_| format!("--amount must be a whole number, not `{v}`"))?);
            }
            "--currency" => currency = Some(value()?),
            "--customer" => customer = Some(value()?),
            "--key" => key = Some(value()?),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    match command.as_deref() {
        Some("pay") => {}
        Some(other) => return Err(format!("unknown command `{other}`")),
        None => return Err("missing the command `pay`".to_owned()),
    }
    Ok(Pay {
        url: url.trim_end_matches('/').to_owned(),
        account,
        amount: amount.ok_or("pay needs --amount")?,
        currency: currency.ok_or("pay needs --currency")?,
        customer: customer.ok_or("pay needs --customer")?,
        key,
    })
}

/// An error and its causes on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let pay = match parse(&args) {
        Ok(p) => p,
        Err(e) => return cli::fail(BIN, format!("{e}\n{USAGE}")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "idempotent_client=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let client =
        reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).with(IdempotencyMiddleware::new()).build();
    let mut request = client
        .post(format!("{}/payments", pay.url))
        .bearer_auth(&pay.account)
        .json(&serde_json::json!({"amount": pay.amount, "currency": pay.currency, "customer": pay.customer}));
    if let Some(key) = &pay.key {
        request = request.header("Idempotency-Key", key);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{BIN}: no answer: {}", chain(&e));
            return ExitCode::from(1);
        }
    };
    let status = response.status();
    let replayed = Outcome::of(&response).is_some_and(Outcome::replayed);
    let body = match response.bytes().await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{BIN}: reading the answer: {}", chain(&e));
            return ExitCode::from(1);
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(&body);
    if !body.ends_with(b"\n") {
        let _ = stdout.write_all(b"\n");
    }
    let _ = stdout.flush();
    eprintln!("replayed: {replayed}");
    if status.is_success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("{BIN}: {status}");
        ExitCode::from(1)
    }
}
