//! `GET /openapi.json` on both binaries over real HTTP: they serve one and the same document, every
//! operation in it answers as it says, and schemathesis (from PyPI, installed by
//! `scripts/services.sh`) exercises every operation with every check, once with the keys it
//! generates and once without the key header. Its hooks are in `tests/schemathesis/`.

mod common;

use common::{dir, framework, start, BINS};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const HOOKS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis");

/// Test cases per operation and phase. With every check and both key modes this keeps the four
/// runs (two per binary, the binaries in parallel) well under a minute on two cores.
const MAX_EXAMPLES: &str = "15";

fn content_type(response: &reqwest::Response) -> String {
    response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

/// `path` with each `{parameter}` filled in.
fn concrete(path: &str) -> String {
    path.replace("{scope}", "payments.create").replace("{key}", "never-used").replace("{id}", "pay_unknown")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_binaries_serve_the_same_document_and_answer_as_it_says() {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let mut documents = Vec::new();
    for bin in BINS {
        let name = framework(bin);
        let instance = start(bin, "memory", &dir("openapi", name).join("ledger.jsonl"), 0);
        let base = format!("http://{}", instance.demo.addr);
        let response = client.get(format!("{base}/openapi.json")).send().await.unwrap();
        assert_eq!(response.status(), 200, "{name}: no credentials needed");
        assert_eq!(content_type(&response), "application/json", "{name}");
        let document: Value = response.json().await.unwrap();
        assert_eq!(document["openapi"], "3.1.0", "{name}");
        assert_eq!(document["components"]["securitySchemes"]["bearer"]["scheme"], "bearer", "{name}");

        let mut operations = 0;
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                operations += 1;
                let what = format!("{name}: {} {path}", method.to_uppercase());
                let responses = operation["responses"].as_object().unwrap();
                let public = operation["security"] == serde_json::json!([{}]);
                // The webhook is public but authenticated by its signature: it answers 401 too.
                let signed = path == "/webhooks/provider";
                assert_eq!(responses.contains_key("401"), !public || signed, "{what}: 401 unless public");
                if let Some(scope) = operation["x-idempotency-scope"].as_str() {
                    // Where each route's key comes from: the webhook's is the sender's
                    // `webhook-id`, a notification's is the request itself (no header).
                    let key_header = match scope {
                        "webhooks.provider" => Some("webhook-id"),
                        "notifications.send" => None,
                        _ => Some("Idempotency-Key"),
                    };
                    let parameters = operation["parameters"].as_array().cloned().unwrap_or_default();
                    let key = parameters
                        .iter()
                        .find(|p| p["in"] == "header" && Some(p["name"].as_str().unwrap_or_default()) == key_header);
                    match key_header {
                        Some(name) => {
                            let key = key.unwrap_or_else(|| panic!("{what}: the `{name}` header is documented"));
                            assert_eq!(key["required"].as_bool(), Some(true), "{what}");
                        }
                        None => assert!(
                            !parameters.iter().any(|p| p["name"] == "Idempotency-Key"),
                            "{what}: a derived key needs no key header"
                        ),
                    }
                    let success = if scope == "webhooks.provider" { "200" } else { "201" };
                    for status in ["409", "413", "422", "500", "503"] {
                        assert!(
                            responses[status]["content"]["application/problem+json"].is_object(),
                            "{what}: {status}"
                        );
                    }
                    let replayed = &responses[success]["headers"]["Idempotent-Replayed"];
                    assert!(replayed.is_object(), "{what}: a replayed {success} is marked");
                }
                // Every operation answers a status it documents, with a content type it
                // documents: the routers serve what the document describes.
                let url = format!("{base}{}", concrete(path));
                let request = match method.as_str() {
                    "get" => client.get(url),
                    "post" => client.post(url).json(&serde_json::json!({})).header("Idempotency-Key", "probe"),
                    other => panic!("{what}: unexpected method {other}"),
                };
                let response = request.bearer_auth("acct_openapi").send().await.unwrap();
                let status = response.status().as_u16().to_string();
                let documented = &responses.get(&status).unwrap_or_else(|| panic!("{what}: {status} not documented"));
                let media = content_type(&response);
                let media = media.split(';').next().unwrap();
                let contents = documented["content"].as_object().unwrap();
                assert!(contents.keys().any(|c| c.split(';').next() == Some(media)), "{what}: {status} as {media}");
            }
        }
        assert!(operations >= 20, "{name}: {operations} operations");
        documents.push(document);
    }
    assert!(documents[0] == documents[1], "axum and actix-web serve different documents");
}

/// How schemathesis is run: `python3 -m schemathesis.cli` (the interpreter from `PYTHON`, default
/// `python3`), or `None` when it is not installed.
fn schemathesis() -> Option<Command> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let installed = Command::new(&python).args(["-m", "schemathesis.cli", "--version"]).output();
    if !installed.is_ok_and(|o| o.status.success()) {
        return None;
    }
    let mut command = Command::new(python);
    command.args(["-m", "schemathesis.cli"]);
    Some(command)
}

/// What one schemathesis run came to.
struct Run {
    label: String,
    passed: bool,
    output: String,
    /// The failures the hooks dropped (see `payments_hooks.py`), counted by kind.
    dropped: BTreeMap<String, usize>,
    /// The protected requests of the run, by outcome (from the demo's metrics).
    outcomes: BTreeMap<String, u64>,
}

/// One schemathesis run against `base`, as `account`, with `keys` (`generated` or `absent`, see the
/// hooks): whether it passed, its output, and the failures its hooks dropped.
fn run(mut command: Command, base: &str, account: &str, keys: &str, workdir: &Path) -> (bool, String, Vec<String>) {
    std::fs::create_dir_all(workdir).unwrap();
    let dropped = workdir.join("dropped.txt");
    command
        .args(["run", &format!("{base}/openapi.json")])
        .args(["--checks", "all", "--max-examples", MAX_EXAMPLES, "--no-color"])
        .args(["--header", &format!("Authorization: Bearer {account}")])
        .args(["--generation-database", "none", "--request-timeout", "10"])
        .env("SCHEMATHESIS_HOOKS", "payments_hooks")
        .env("PYTHONPATH", HOOKS)
        // No __pycache__ in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PAYMENTS_KEYS", keys)
        .env("PAYMENTS_DROPPED", &dropped)
        // Its own configuration file would be read from here: none.
        .current_dir(workdir);
    if let Ok(seed) = std::env::var("PAYMENTS_SCHEMATHESIS_SEED") {
        command.args(["--seed", &seed]);
    }
    let output = command.output().expect("run schemathesis");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let dropped = std::fs::read_to_string(dropped).unwrap_or_default().lines().map(str::to_owned).collect();
    (output.status.success(), text, dropped)
}

/// `idempotent_requests_total` of the demo at `addr`, summed over the scopes whose key a client
/// sends, by outcome (a notification's key is the request itself: it runs without one).
fn outcomes(addr: &str) -> BTreeMap<String, u64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let mut counts = BTreeMap::new();
    let client_keyed =
        |l: &&str| l.starts_with("idempotent_requests_total{") && !l.contains("scope=\"notifications.send\"");
    for line in text.lines().filter(client_keyed) {
        let outcome = line.split("outcome=\"").nth(1).and_then(|o| o.split('"').next()).unwrap_or_default();
        let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *counts.entry(outcome.to_owned()).or_insert(0) += value as u64;
    }
    counts
}

/// The lines of schemathesis's summary: from `SUMMARY` to the end.
fn summary(output: &str) -> String {
    let start = output.find("SUMMARY").map_or(0, |i| output[..i].rfind('\n').map_or(0, |n| n + 1));
    output[start..].trim_end().to_owned()
}

#[test]
fn schemathesis_finds_nothing_on_either_binary() {
    if schemathesis().is_none() {
        let message = "SKIPPED: schemathesis is not installed (`python3 -m pip install schemathesis`, or run \
                       scripts/services.sh); the OpenAPI document was not fuzzed";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message} (a skip is a failure under CI=true)");
        }
        eprintln!("\n==================== {message} ====================\n");
        return;
    }
    let started = Instant::now();
    let threads: Vec<_> = BINS
        .into_iter()
        .map(|bin| {
            std::thread::spawn(move || {
                let name = framework(bin);
                let workdir = dir("schemathesis", name);
                let store = format!("sqlite:{}", workdir.join("idempotency.sqlite").display());
                let instance = start(bin, &store, &workdir.join("ledger.jsonl"), 0);
                let base = format!("http://{}", instance.demo.addr);
                let mut results = Vec::new();
                for keys in ["generated", "absent"] {
                    let command = schemathesis().expect("installed");
                    let account = format!("acct_st_{name}_{keys}");
                    let before = outcomes(&instance.demo.addr);
                    let (passed, output, dropped) = run(command, &base, &account, keys, &workdir.join(keys));
                    let mut after = outcomes(&instance.demo.addr);
                    for (outcome, count) in before {
                        *after.entry(outcome).or_default() -= count;
                    }
                    after.retain(|_, count| *count > 0);
                    let mut counted = BTreeMap::new();
                    for kind in dropped {
                        *counted.entry(kind).or_insert(0) += 1;
                    }
                    let label = format!("{name}, keys {keys}");
                    results.push(Run { label, passed, output, dropped: counted, outcomes: after });
                }
                results
            })
        })
        .collect();
    let results: Vec<Run> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let mut failed = Vec::new();
    for run in &results {
        eprintln!("---- schemathesis on {} ----\n{}", run.label, summary(&run.output));
        for (kind, count) in &run.dropped {
            eprintln!("  dropped by the hooks: {count} x {kind}");
        }
        eprintln!("  protected requests by outcome: {:?}\n", run.outcomes);
        if !run.passed {
            failed.push(run.label.clone());
            eprintln!("---- full output on {} ----\n{}\n", run.label, run.output);
        }
    }
    eprintln!("schemathesis: {} runs in {:.1?}", results.len(), started.elapsed());
    assert!(failed.is_empty(), "schemathesis found failures on {failed:?} (see above)");
    // The runs reached what they are for: operations executed with generated keys, and every
    // protected operation refused for its missing key.
    for run in &results {
        let (outcome, count) = if run.label.ends_with("generated") {
            ("executed", run.outcomes.get("executed"))
        } else {
            ("missing_key", run.outcomes.get("missing_key"))
        };
        assert!(count.is_some_and(|n| *n > 0), "{}: no {outcome} request: {:?}", run.label, run.outcomes);
        if run.label.ends_with("absent") {
            assert_eq!(run.outcomes.get("executed"), None, "{}: nothing runs without a key", run.label);
        }
    }
}
