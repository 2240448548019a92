//! What the binaries did against their OpenAPI document (found by schemathesis, see
//! `tests/openapi.rs`), each reproduced over real HTTP on both binaries, which must agree.

mod common;

use common::{dir, framework, start, Instance, BINS};
use serde_json::{json, Value};
use std::time::Duration;

/// Both binaries on the memory store, for one test.
struct Demos {
    instances: Vec<(&'static str, Instance)>,
    client: reqwest::Client,
}

/// An answer: status, content type (without parameters), body, and the `Allow` and
/// `Idempotent-Replayed` headers.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    content_type: String,
    body: Value,
    allow: Option<String>,
    replayed: bool,
}

impl Demos {
    fn start(test: &str) -> Self {
        let instances = BINS
            .into_iter()
            .map(|bin| {
                let name = framework(bin);
                (name, start(bin, "memory", &dir("conformance", &format!("{test}-{name}")).join("ledger.jsonl"), 0))
            })
            .collect();
        Self { instances, client: reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap() }
    }

    /// The answer of each binary to the request `build` makes from its base URL.
    async fn each(&self, build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder) -> Vec<(&str, Answer)> {
        let mut answers = Vec::new();
        for (name, instance) in &self.instances {
            let response = build(&self.client, &format!("http://{}", instance.demo.addr)).send().await.unwrap();
            let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
            let content_type = header("content-type").unwrap_or_default().split(';').next().unwrap().trim().to_owned();
            let allow = header("allow");
            let replayed = header("idempotent-replayed").as_deref() == Some("true");
            let status = response.status().as_u16();
            let text = response.text().await.unwrap();
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            answers.push((*name, Answer { status, content_type, body, allow, replayed }));
        }
        answers
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_report_needs_credentials_like_every_route_but_the_public_ones() {
    let demos = Demos::start("policies");
    for (name, answer) in demos.each(|c, base| c.get(format!("{base}/_idempotency/policies"))).await {
        assert_eq!((answer.status, answer.content_type.as_str()), (401, "application/problem+json"), "{name}");
    }
    for (name, answer) in
        demos.each(|c, base| c.get(format!("{base}/_idempotency/policies?format=md")).bearer_auth("acct_1")).await
    {
        assert_eq!((answer.status, answer.content_type.as_str()), (200, "text/markdown"), "{name}");
    }
    for path in ["/healthz", "/metrics", "/openapi.json"] {
        for (name, answer) in demos.each(|c, base| c.get(format!("{base}{path}"))).await {
            assert_eq!(answer.status, 200, "{name}: {path} needs no credentials");
        }
    }
}

/// A body the JSON extractor refuses: axum answered text/plain, and the two binaries disagreed on
/// the statuses (actix-web answered 400 to all of them). Nothing runs in any of these.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_json_body_is_the_same_problem_on_both_binaries() {
    let demos = Demos::start("json");
    let cases: [(&str, Option<&str>, &str, u16); 5] = [
        ("no content type", None, r#"{"amount": 1, "currency": "EUR", "customer": "c"}"#, 415),
        ("another content type", Some("text/plain"), r#"{"amount": 1, "currency": "EUR", "customer": "c"}"#, 415),
        ("not JSON", Some("application/json"), "{nope", 400),
        ("a field missing", Some("application/json"), r#"{"amount": 1, "currency": "EUR"}"#, 422),
        (
            "a field of another type",
            Some("application/json"),
            r#"{"amount": "1", "currency": "EUR", "customer": "c"}"#,
            422,
        ),
    ];
    for (what, content_type, body, status) in cases {
        let answers = demos
            .each(|c, base| {
                let request =
                    c.post(format!("{base}/payments")).bearer_auth("acct_json").header("Idempotency-Key", what);
                let request = match content_type {
                    Some(content_type) => request.header("content-type", content_type),
                    None => request,
                };
                request.body(body)
            })
            .await;
        for (name, answer) in answers {
            assert_eq!(
                (answer.status, answer.content_type.as_str()),
                (status, "application/problem+json"),
                "{name}: {what}"
            );
            assert_eq!(answer.body["type"], "urn:payments-demo:problem:bad-body", "{name}: {what}");
        }
    }
    for (name, answer) in demos.each(|c, base| c.get(format!("{base}/payments")).bearer_auth("acct_json")).await {
        assert_eq!(answer.body, json!([]), "{name}: nothing was executed");
    }
}

/// `1000.0` and `1e3` are the integer 1000 to JSON Schema and to the request's fingerprint, but
/// the binaries refused them (422: "expected i64"). They are one amount, so one payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amount_written_1e3_or_1000_0_is_the_amount_1000() {
    let demos = Demos::start("amounts");
    let pay = |amount: &'static str, key: &'static str| {
        move |c: &reqwest::Client, base: &str| {
            let body = format!(r#"{{"amount": {amount}, "currency": "EUR", "customer": "cus_1"}}"#);
            c.post(format!("{base}/payments"))
                .bearer_auth("acct_amounts")
                .header("Idempotency-Key", key)
                .header("content-type", "application/json")
                .body(body)
        }
    };
    for (name, answer) in demos.each(pay("1e3", "one")).await {
        assert_eq!((answer.status, &answer.body["amount"], answer.replayed), (201, &json!(1000), false), "{name}");
    }
    for amount in ["1000", "1000.0", "10e2"] {
        for (name, answer) in demos.each(pay(amount, "one")).await {
            assert_eq!((answer.status, answer.replayed), (201, true), "{name}: {amount} is the same request");
        }
    }
    for (name, answer) in demos.each(pay("1000.5", "two")).await {
        assert_eq!(
            (answer.status, &answer.body["type"]),
            (422, &json!("urn:payments-demo:problem:bad-body")),
            "{name}"
        );
    }
    for (name, answer) in demos.each(pay("1e13", "three")).await {
        assert_eq!(
            (answer.status, &answer.body["type"]),
            (422, &json!("urn:payments-demo:problem:validation")),
            "{name}"
        );
        assert!(answer.body["detail"].as_str().unwrap().contains("from 1 to 1000000000000"), "{name}: {}", answer.body);
    }
}

/// A refund of more than what is left was the same problem as an amount out of range, though it
/// depends on the refunds made before and not on the request: a client could not tell them apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_beyond_the_payment_has_a_problem_type_of_its_own() {
    let demos = Demos::start("refunds");
    let paid = demos
        .each(|c, base| {
            let body = json!({"amount": 1000, "currency": "EUR", "customer": "cus_1"});
            c.post(format!("{base}/payments")).bearer_auth("acct_refunds").header("Idempotency-Key", "pay").json(&body)
        })
        .await;
    let ids: Vec<String> = paid.iter().map(|(_, a)| a.body["id"].as_str().unwrap().to_owned()).collect();
    for (index, (name, instance)) in demos.instances.iter().enumerate() {
        let base = format!("http://{}", instance.demo.addr);
        let url = format!("{base}/payments/{}/refunds", ids[index]);
        let send = |amount: i64, key: &str| {
            demos
                .client
                .post(&url)
                .bearer_auth("acct_refunds")
                .header("Idempotency-Key", key)
                .json(&json!({"amount": amount}))
                .send()
        };
        assert_eq!(send(600, "r1").await.unwrap().status(), 201, "{name}");
        for (amount, key, problem) in
            [(401, "r2", "refund-exceeds-payment"), (0, "r3", "validation"), (401, "r2", "refund-exceeds-payment")]
        {
            let response = send(amount, key).await.unwrap();
            assert_eq!(response.status(), 422, "{name}: {amount}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["type"], format!("urn:payments-demo:problem:{problem}"), "{name}: {amount}");
        }
        assert_eq!(send(400, "r4").await.unwrap().status(), 201, "{name}: what is left");
    }
}

/// actix-web answered 404 without a body to a method a path does not take (`TRACE /payments`),
/// where HTTP says 405 with `Allow`; and the routers' own 404 and 405 were not problems.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_a_path_does_not_take_is_405_with_allow_and_no_route_is_404() {
    let demos = Demos::start("methods");
    for (path, allow) in [("/payments", "GET, POST"), ("/v1/payments/pay_1/refunds", "GET, POST"), ("/healthz", "GET")]
    {
        for method in ["PUT", "DELETE", "PATCH", "TRACE"] {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            for (name, answer) in demos.each(|c, base| c.request(method.clone(), format!("{base}{path}"))).await {
                let what = format!("{name}: {method} {path}");
                assert_eq!((answer.status, answer.content_type.as_str()), (405, "application/problem+json"), "{what}");
                assert_eq!(answer.body["type"], "urn:payments-demo:problem:method-not-allowed", "{what}");
                let listed = answer.allow.unwrap_or_else(|| panic!("{what}: no Allow"));
                let mut listed: Vec<&str> = listed.split(',').map(str::trim).filter(|m| *m != "HEAD").collect();
                listed.sort_unstable();
                assert_eq!(listed.join(", "), allow, "{what}");
            }
        }
    }
    for path in ["/nothing", "/payments/pay_1/refunds/re_1", "/v1/transfers"] {
        for (name, answer) in demos.each(|c, base| c.get(format!("{base}{path}")).bearer_auth("acct_1")).await {
            assert_eq!(
                (answer.status, answer.content_type.as_str()),
                (404, "application/problem+json"),
                "{name}: {path}"
            );
            assert_eq!(answer.body["type"], "urn:payments-demo:problem:no-route", "{name}: {path}");
        }
    }
}
