//! `GET /metrics` of both binaries over real HTTP: after a scripted sequence of requests it shows
//! exactly the outcomes they had, and every metric the Grafana dashboard queries is one it exports.

mod common;

use common::{dir, framework, start, BINS};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// One sample of the exposition: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

fn parse(exposition: &str) -> Vec<Sample> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            (name.to_owned(), labels, value.parse().expect("a number"))
        })
        .collect()
}

/// The value of the series `name` with exactly `labels`, 0 if absent.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: BTreeMap<String, String> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    samples.iter().find(|(n, l, _)| n == name && *l == wanted).map_or(0.0, |(_, _, v)| *v)
}

/// Runs the scripted sequence against a fresh demo and returns its `/metrics` exposition.
async fn scripted(bin: &str, name: &str) -> String {
    let d = dir("metrics", &format!("{}-{name}", framework(bin)));
    let instance = start(bin, "memory", &d.join("ledger.jsonl"), 1200);
    let base = format!("http://{}", instance.demo.addr);
    let client = reqwest::Client::new();
    let pay = |key: Option<&str>, amount: i64| {
        let mut r = client.post(format!("{base}/payments")).bearer_auth("acct_metrics");
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        r.json(&json!({"amount": amount, "currency": "EUR", "customer": "cus_1"}))
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(pay(Some("p1"), 100).send().await.unwrap()), 201, "executed");
    assert_eq!(status(pay(Some("p1"), 100).send().await.unwrap()), 201, "replayed");
    assert_eq!(status(pay(Some("p1"), 200).send().await.unwrap()), 422, "mismatch");
    assert_eq!(status(pay(None, 100).send().await.unwrap()), 400, "missing key");
    assert_eq!(status(pay(Some(&"k".repeat(300)), 100).send().await.unwrap()), 400, "invalid key: too long");
    assert_eq!(status(pay(Some("p2"), -5).send().await.unwrap()), 422, "executed: the handler's own 422, stored");

    let transfer = || {
        client
            .post(format!("{base}/transfers"))
            .bearer_auth("acct_metrics")
            .header("Idempotency-Key", "t1")
            .json(&json!({"amount": 5, "from": "a", "to": "b"}))
    };
    let first = tokio::spawn(transfer().send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(transfer().send().await.unwrap()), 409, "in progress");
    assert_eq!(status(first.await.unwrap().unwrap()), 201, "executed, its lease renewed meanwhile");

    // No credentials needed: Prometheus scrapes without them.
    let response = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let text = response.text().await.unwrap();
    let _ = std::fs::remove_dir_all(&d);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_each_outcome_of_a_scripted_sequence() {
    for bin in BINS {
        let name = framework(bin);
        let text = scripted(bin, "counts").await;
        let samples = parse(&text);
        let requests = |scope: &str, outcome: &str| {
            value(
                &samples,
                "idempotent_requests_total",
                &[("scope", scope), ("outcome", outcome), ("transport", "http")],
            )
        };
        let payments: Vec<(&str, f64)> = [
            "executed",
            "replayed",
            "mismatch",
            "missing_key",
            "invalid_key",
            "in_progress",
            "store_unavailable",
            "released",
        ]
        .into_iter()
        .map(|o| (o, requests("payments.create", o)))
        .collect();
        assert_eq!(
            payments,
            [
                ("executed", 2.0),
                ("replayed", 1.0),
                ("mismatch", 1.0),
                ("missing_key", 1.0),
                ("invalid_key", 1.0),
                ("in_progress", 0.0),
                ("store_unavailable", 0.0),
                ("released", 0.0)
            ],
            "{name}:\n{text}"
        );
        assert_eq!(requests("transfers.create", "executed"), 1.0, "{name}");
        assert_eq!(requests("transfers.create", "in_progress"), 1.0, "{name}");

        let operations = |operation: &str| {
            value(
                &samples,
                "idempotent_store_operation_seconds_count",
                &[("store", "memory"), ("operation", operation)],
            )
        };
        // Claims: four payments that reached the store, two transfers; completions: p1, p2, t1.
        assert_eq!((operations("claim"), operations("complete"), operations("release")), (6.0, 3.0, 0.0), "{name}");
        let renewed =
            value(&samples, "idempotent_lease_renewals_total", &[("scope", "transfers.create"), ("result", "ok")]);
        assert!(renewed >= 1.0, "{name}: a 1.2 s transfer under a 3 s lease is renewed every 500 ms:\n{text}");
        assert_eq!(operations("renew"), renewed, "{name}: every renewal is a timed store operation");
        assert!(
            text.contains(
                "idempotent_store_operation_seconds_bucket{store=\"memory\",operation=\"claim\",le=\"0.001\"}"
            ),
            "{name}: a histogram with buckets:\n{text}"
        );
        for scope in ["payments.create", "transfers.create"] {
            assert_eq!(value(&samples, "idempotent_claims_in_flight", &[("scope", scope)]), 0.0, "{name}: {scope}");
        }
    }
}

/// Every `idempotent_*` metric the dashboard queries: in its panels' queries (`expr`) and its
/// variables' (`query`, `definition`), in the form Prometheus stores it (`_bucket`, `_count`,
/// `_sum` of a histogram).
fn dashboard_metrics() -> BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/idempotent.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("the dashboard is JSON");
    fn queries<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
            Value::Object(o) => {
                for (key, v) in o {
                    match (key.as_str(), v) {
                        ("expr" | "query" | "definition", Value::String(q)) => out.push(q),
                        _ => queries(v, out),
                    }
                }
            }
            _ => {}
        }
    }
    let mut all = Vec::new();
    queries(&dashboard, &mut all);
    assert!(all.len() >= 6, "the dashboard's queries are found: {all:?}");
    let mut names = BTreeSet::new();
    for s in all {
        let mut rest = s;
        while let Some(at) = rest.find("idempotent_") {
            let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_one_the_demo_exports() {
    let used = dashboard_metrics();
    for wanted in ["idempotent_requests_total", "idempotent_store_operation_seconds_bucket"] {
        assert!(used.contains(wanted), "the dashboard queries {wanted}: {used:?}");
    }
    for bin in BINS {
        let exported: BTreeSet<String> =
            parse(&scripted(bin, "dashboard").await).into_iter().map(|(n, _, _)| n).collect();
        let missing: Vec<&String> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{}: the dashboard queries metrics the demo does not export: {missing:?}",
            framework(bin)
        );
    }
}
