//! The HTTP conformance suite of the payments demo, written once and run against every adapter.
//!
//! [`http_conformance_tests!`](crate::http_conformance_tests) expands to one `#[tokio::test]` per
//! behaviour; its argument starts a demo server on a loopback port and returns a [`Demo`].

use reqwest::{Client, Method, RequestBuilder, Response};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

/// A running demo server.
#[derive(Debug)]
pub struct Demo {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its ledger file.
    pub ledger: PathBuf,
    /// Its transfer processing time.
    pub transfer_delay: Duration,
    /// HTTP client.
    pub client: Client,
}

/// A fresh temporary path for a ledger.
pub fn temp_ledger() -> PathBuf {
    std::env::temp_dir().join(format!("payments-ledger-{}.jsonl", uuid_like()))
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{}-{t}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A fresh idempotency key.
pub fn new_key() -> String {
    format!("key-{}", uuid_like())
}

impl Demo {
    /// A demo handle for a server at `addr`.
    pub fn new(addr: std::net::SocketAddr, ledger: PathBuf, transfer_delay: Duration) -> Self {
        Self { base: format!("http://{addr}"), ledger, transfer_delay, client: Client::new() }
    }

    /// A request as `account`.
    pub fn req(&self, method: Method, path: &str, account: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base)).bearer_auth(account)
    }

    /// `POST path` with a JSON body and an idempotency key.
    pub fn post(&self, path: &str, account: &str, key: &str, body: &Value) -> RequestBuilder {
        self.req(Method::POST, path, account).header("Idempotency-Key", key).json(body)
    }

    /// Number of ledger entries of `kind`.
    pub fn ledger_count(&self, kind: &str) -> usize {
        let text = std::fs::read_to_string(&self.ledger).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|e| e["kind"] == kind).count()
    }
}

/// A response taken apart: status, headers and body bytes.
#[derive(Debug, Clone)]
pub struct Captured {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Captured {
    /// Reads a whole response.
    pub async fn from(r: Response) -> Self {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes().await.expect("body").to_vec();
        Self { status, headers, body }
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Whether this is a replay.
    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// Asserts a problem+json of `status` and `type`.
    pub fn assert_problem(&self, status: u16, type_uri: &str) {
        assert_eq!(self.status, status, "body: {}", String::from_utf8_lossy(&self.body));
        assert_eq!(self.header("content-type"), Some("application/problem+json"));
        let v = self.json();
        assert_eq!(v["type"], type_uri, "{v}");
        assert_eq!(v["status"], status);
        assert!(v["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(v["detail"].as_str().is_some_and(|t| !t.is_empty()));
    }
}

/// Sends and captures.
pub async fn send(r: RequestBuilder) -> Captured {
    Captured::from(r.send().await.expect("request")).await
}

/// A valid payment body.
pub fn payment(amount: i64) -> Value {
    serde_json::json!({"amount": amount, "currency": "EUR", "customer": "cus_1", "description": "first"})
}

/// A valid refund body.
pub fn refund(amount: i64) -> Value {
    serde_json::json!({"amount": amount, "reason": "requested_by_customer"})
}

/// Creates a payment of `amount` for `account` (under a fresh key) and returns it.
pub async fn paid(demo: &Demo, account: &str, amount: i64) -> Value {
    let created = send(demo.post("/payments", account, &new_key(), &payment(amount))).await;
    assert_eq!(created.status, 201, "{}", String::from_utf8_lossy(&created.body));
    created.json()
}

/// Expands to the conformance tests; `$start` is an async expression returning a [`Demo`] whose
/// transfer delay is about one second.
#[macro_export]
macro_rules! http_conformance_tests {
    ($start:expr) => {
        use $crate::http::{new_key, paid, payment, refund, send, Demo};
        use reqwest::Method;
        use serde_json::json;
        use std::time::Duration;

        async fn demo() -> Demo {
            $start.await
        }

        #[tokio::test]
        async fn payment_created_then_replayed_byte_for_byte() {
            let d = demo().await;
            let key = new_key();
            let first = send(d.post("/payments", "acct_a", &key, &payment(1000))).await;
            assert_eq!(first.status, 201, "{}", String::from_utf8_lossy(&first.body));
            let p = first.json();
            for f in ["id", "amount", "currency", "customer", "description", "created_at"] {
                assert!(p.get(f).is_some(), "missing {f} in {p}");
            }
            assert_eq!(p["amount"], 1000);
            let id = p["id"].as_str().unwrap();
            assert_eq!(first.header("location"), Some(format!("/payments/{id}").as_str()));
            assert!(!first.replayed());
            for _ in 0..3 {
                let again = send(d.post("/payments", "acct_a", &key, &payment(1000))).await;
                assert_eq!(again.status, 201);
                assert_eq!(again.body, first.body, "replay must be byte-identical");
                assert_eq!(again.header("location"), first.header("location"));
                assert_eq!(again.header("content-type"), first.header("content-type"));
                assert!(again.replayed());
            }
            assert_eq!(d.ledger_count("payment"), 1);
        }

        #[tokio::test]
        async fn changed_declared_field_is_422_and_undeclared_field_replays() {
            let d = demo().await;
            let key = new_key();
            let first = send(d.post("/payments", "acct_a", &key, &payment(1000))).await;
            assert_eq!(first.status, 201);
            let changed = send(d.post("/payments", "acct_a", &key, &payment(1001))).await;
            changed.assert_problem(422, "urn:idempotent:problem:key-reused");
            let mut other_desc = payment(1000);
            other_desc["description"] = json!("something else");
            let replay = send(d.post("/payments", "acct_a", &key, &other_desc)).await;
            assert_eq!(replay.status, 201);
            assert!(replay.replayed());
            assert_eq!(replay.body, first.body);
            assert_eq!(d.ledger_count("payment"), 1);
        }

        #[tokio::test]
        async fn missing_key_is_400() {
            let d = demo().await;
            let r = send(d.req(Method::POST, "/payments", "acct_a").json(&payment(5))).await;
            r.assert_problem(400, "urn:idempotent:problem:key-missing");
            assert!(r.json()["detail"].as_str().unwrap().contains("idempotency-key"));
            assert_eq!(d.ledger_count("payment"), 0);
        }

        #[tokio::test]
        async fn malformed_keys_are_400() {
            let d = demo().await;
            let long = "k".repeat(256);
            let bad: Vec<reqwest::header::HeaderValue> = vec![
                reqwest::header::HeaderValue::from_static(""),
                reqwest::header::HeaderValue::from_str(&long).unwrap(),
                reqwest::header::HeaderValue::from_bytes(b"cl\xc3\xa9").unwrap(),
                reqwest::header::HeaderValue::from_static("\"unterminated"),
                reqwest::header::HeaderValue::from_static("a b"),
            ];
            for value in bad {
                let r = send(d.req(Method::POST, "/payments", "acct_a").header("Idempotency-Key", value.clone()).json(&payment(5))).await;
                r.assert_problem(400, "urn:idempotent:problem:key-invalid");
            }
            let repeated = send(
                d.req(Method::POST, "/payments", "acct_a")
                    .header("Idempotency-Key", "one")
                    .header("Idempotency-Key", "two")
                    .json(&payment(5)),
            )
            .await;
            repeated.assert_problem(400, "urn:idempotent:problem:key-invalid");
            assert_eq!(d.ledger_count("payment"), 0);
        }

        #[tokio::test]
        async fn sf_string_and_bare_token_are_the_same_key() {
            let d = demo().await;
            let key = new_key();
            let first = send(d.post("/payments", "acct_a", &format!("\"{key}\""), &payment(7))).await;
            assert_eq!(first.status, 201);
            let bare = send(d.post("/payments", "acct_a", &key, &payment(7))).await;
            assert!(bare.replayed());
            assert_eq!(bare.body, first.body);
        }

        #[tokio::test]
        async fn authentication_is_required() {
            let d = demo().await;
            let r = send(d.client.post(format!("{}/payments", d.base)).header("Idempotency-Key", new_key()).json(&payment(5))).await;
            assert_eq!(r.status, 401);
            assert_eq!(r.header("content-type"), Some("application/problem+json"));
            let r = send(d.client.get(format!("{}/payments", d.base)).header("Authorization", "Bearer ")).await;
            assert_eq!(r.status, 401);
            let r = send(d.client.get(format!("{}/payments", d.base)).header("Authorization", "Basic abc")).await;
            assert_eq!(r.status, 401);
        }

        #[tokio::test]
        async fn keys_are_namespaced_by_caller() {
            let d = demo().await;
            let key = new_key();
            let a = send(d.post("/payments", "acct_a", &key, &payment(10))).await;
            let b = send(d.post("/payments", "acct_b", &key, &payment(10))).await;
            assert_eq!((a.status, b.status), (201, 201));
            assert!(!b.replayed());
            assert_ne!(a.json()["id"], b.json()["id"]);
            assert_eq!(d.ledger_count("payment"), 2);
        }

        #[tokio::test]
        async fn domain_validation_422_is_stored_and_replayed() {
            let d = demo().await;
            let key = new_key();
            let first = send(d.post("/payments", "acct_a", &key, &payment(0))).await;
            assert_eq!(first.status, 422);
            assert_eq!(first.header("content-type"), Some("application/problem+json"));
            assert_eq!(first.json()["type"], "urn:payments-demo:problem:validation");
            let again = send(d.post("/payments", "acct_a", &key, &payment(0))).await;
            assert_eq!(again.status, 422);
            assert!(again.replayed());
            assert_eq!(again.body, first.body);
            let mut bad_currency = payment(5);
            bad_currency["currency"] = json!("eur");
            let r = send(d.post("/payments", "acct_a", &new_key(), &bad_currency)).await;
            assert_eq!(r.status, 422);
            assert_eq!(d.ledger_count("payment"), 0);
        }

        #[tokio::test]
        async fn extractor_rejections_store_nothing() {
            let d = demo().await;
            let key = new_key();
            let not_json = send(
                d.req(Method::POST, "/payments", "acct_a")
                    .header("Idempotency-Key", &key)
                    .header("content-type", "application/json")
                    .body("{not json"),
            )
            .await;
            assert_eq!(not_json.status, 400);
            let missing = send(d.post("/payments", "acct_a", &key, &json!({"amount": 5, "currency": "EUR"}))).await;
            assert!(missing.status == 400 || missing.status == 422, "{}", missing.status);
            // Nothing was stored under the key: a valid request now runs.
            let ok = send(d.post("/payments", "acct_a", &key, &payment(5))).await;
            assert_eq!(ok.status, 201);
            assert!(!ok.replayed());
        }

        #[tokio::test]
        async fn oversized_body_is_413_and_stores_nothing() {
            let d = demo().await;
            let key = new_key();
            let mut big = payment(5);
            big["description"] = json!("x".repeat(200 * 1024));
            let r = send(d.post("/payments", "acct_a", &key, &big)).await;
            assert_eq!(r.status, 413);
            let ok = send(d.post("/payments", "acct_a", &key, &payment(5))).await;
            assert_eq!(ok.status, 201);
            assert!(!ok.replayed());
        }

        #[tokio::test]
        async fn concurrent_duplicate_is_409_with_retry_after_then_replays() {
            let d = demo().await;
            let key = new_key();
            let body = json!({"amount": 50, "from": "acc_1", "to": "acc_2"});
            let first = tokio::spawn(d.post("/transfers", "acct_a", &key, &body).send());
            tokio::time::sleep(d.transfer_delay / 3).await;
            let dup = send(d.post("/transfers", "acct_a", &key, &body)).await;
            dup.assert_problem(409, "urn:idempotent:problem:in-progress");
            let retry_after: u64 = dup.header("retry-after").expect("Retry-After").parse().unwrap();
            assert!(retry_after >= 1);
            let first = $crate::http::Captured::from(first.await.unwrap().unwrap()).await;
            assert_eq!(first.status, 201);
            let t = first.json();
            for f in ["id", "amount", "from", "to", "created_at"] {
                assert!(t.get(f).is_some(), "missing {f} in {t}");
            }
            let replay = send(d.post("/transfers", "acct_a", &key, &body)).await;
            assert!(replay.replayed());
            assert_eq!(replay.body, first.body);
            assert_eq!(d.ledger_count("transfer"), 1);
        }

        #[tokio::test]
        async fn many_clients_racing_one_key_execute_once() {
            let d = demo().await;
            let key = new_key();
            let mut tasks = Vec::new();
            for _ in 0..50 {
                tasks.push(tokio::spawn(d.post("/payments", "acct_race", &key, &payment(99)).send()));
            }
            let mut bodies = Vec::new();
            for t in tasks {
                let r = $crate::http::Captured::from(t.await.unwrap().unwrap()).await;
                match r.status {
                    201 => bodies.push(r.body),
                    409 => r.assert_problem(409, "urn:idempotent:problem:in-progress"),
                    other => panic!("unexpected status {other}"),
                }
            }
            assert!(!bodies.is_empty());
            assert!(bodies.windows(2).all(|w| w[0] == w[1]), "every 201 carries the same payment");
            assert_eq!(d.ledger_count("payment"), 1);
            let list = send(d.req(Method::GET, "/payments", "acct_race")).await.json();
            assert_eq!(list.as_array().unwrap().len(), 1);
        }

        #[tokio::test]
        async fn quotes_fingerprint_the_whole_body_and_expire() {
            let d = demo().await;
            let key = new_key();
            let first = send(
                d.req(Method::POST, "/quotes", "acct_q")
                    .header("Idempotency-Key", &key)
                    .header("content-type", "application/json")
                    .body(r#"{"sku":"a","qty":2,"opts":{"x":1,"y":[1,2]}}"#),
            )
            .await;
            assert_eq!(first.status, 201);
            let q = first.json();
            assert_eq!(q["request"]["sku"], "a");
            assert!(q["price"].is_number() && q["id"].is_string());
            let reordered = send(
                d.req(Method::POST, "/quotes", "acct_q")
                    .header("Idempotency-Key", &key)
                    .header("content-type", "application/json")
                    .body("{ \"opts\": {\"y\": [1, 2], \"x\": 1},\n \"qty\": 2, \"sku\": \"a\" }"),
            )
            .await;
            assert!(reordered.replayed(), "key order and whitespace must not change the fingerprint");
            assert_eq!(reordered.body, first.body);
            let changed = send(d.post("/quotes", "acct_q", &key, &json!({"sku": "a", "qty": 3, "opts": {"x": 1, "y": [1, 2]}}))).await;
            changed.assert_problem(422, "urn:idempotent:problem:key-reused");
            tokio::time::sleep(Duration::from_millis(3500)).await;
            let after_ttl = send(d.post("/quotes", "acct_q", &key, &json!({"sku": "a", "qty": 2, "opts": {"x": 1, "y": [1, 2]}}))).await;
            assert_eq!(after_ttl.status, 201);
            assert!(!after_ttl.replayed(), "the record expired after its 3s ttl");
            assert_ne!(after_ttl.json()["id"], q["id"]);
            assert_eq!(d.ledger_count("quote"), 2);
        }

        #[tokio::test]
        async fn reads_list_the_callers_operations_oldest_first() {
            let d = demo().await;
            let p1 = send(d.post("/payments", "acct_r", &new_key(), &payment(1))).await.json();
            let p2 = send(d.post("/payments", "acct_r", &new_key(), &payment(2))).await.json();
            send(d.post("/payments", "acct_other", &new_key(), &payment(3))).await;
            let list = send(d.req(Method::GET, "/payments", "acct_r")).await;
            assert_eq!(list.status, 200);
            assert_eq!(list.json(), json!([p1.clone(), p2]));
            let one = send(d.req(Method::GET, &format!("/payments/{}", p1["id"].as_str().unwrap()), "acct_r")).await;
            assert_eq!((one.status, one.json()), (200, p1.clone()));
            let foreign = send(d.req(Method::GET, &format!("/payments/{}", p1["id"].as_str().unwrap()), "acct_other")).await;
            assert_eq!(foreign.status, 404);
            let missing = send(d.req(Method::GET, "/payments/pay_nope", "acct_r")).await;
            assert_eq!(missing.status, 404);
            let transfers = send(d.req(Method::GET, "/transfers", "acct_r")).await;
            assert_eq!((transfers.status, transfers.json()), (200, json!([])));
        }

        #[tokio::test]
        async fn refund_created_then_replayed_byte_for_byte() {
            let d = demo().await;
            let p = paid(&d, "acct_a", 1000).await;
            let id = p["id"].as_str().unwrap();
            let path = format!("/payments/{id}/refunds");
            let key = new_key();
            let first = send(d.post(&path, "acct_a", &key, &refund(300))).await;
            assert_eq!(first.status, 201, "{}", String::from_utf8_lossy(&first.body));
            assert!(!first.replayed());
            let r = first.json();
            let mut fields: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
            fields.sort_unstable();
            assert_eq!(fields, ["amount", "created_at", "id", "payment", "reason"]);
            assert!(r["id"].as_str().unwrap().starts_with("re_"), "{r}");
            assert_eq!((&r["payment"], &r["amount"], &r["reason"]), (&json!(id), &json!(300), &json!("requested_by_customer")));
            for _ in 0..3 {
                let again = send(d.post(&path, "acct_a", &key, &refund(300))).await;
                assert_eq!(again.status, 201);
                assert_eq!(again.body, first.body, "replay must be byte-identical");
                assert_eq!(again.header("content-type"), first.header("content-type"));
                assert!(again.replayed());
            }
            // The reason is not part of the fingerprint.
            let other_reason = send(d.post(&path, "acct_a", &key, &json!({"amount": 300}))).await;
            assert!(other_reason.replayed());
            assert_eq!(other_reason.body, first.body);
            let changed = send(d.post(&path, "acct_a", &key, &refund(301))).await;
            changed.assert_problem(422, "urn:idempotent:problem:key-reused");
            assert_eq!(d.ledger_count("refund"), 1);
        }

        #[tokio::test]
        async fn refund_key_reused_on_another_payment_is_422_and_executes_nothing() {
            let d = demo().await;
            let p1 = paid(&d, "acct_a", 1000).await;
            let p2 = paid(&d, "acct_a", 1000).await;
            let (id1, id2) = (p1["id"].as_str().unwrap(), p2["id"].as_str().unwrap());
            let key = new_key();
            let first = send(d.post(&format!("/payments/{id1}/refunds"), "acct_a", &key, &refund(100))).await;
            assert_eq!(first.status, 201, "{}", String::from_utf8_lossy(&first.body));
            let other = send(d.post(&format!("/payments/{id2}/refunds"), "acct_a", &key, &refund(100))).await;
            other.assert_problem(422, "urn:idempotent:problem:key-reused");
            assert!(!other.replayed());
            assert_eq!(d.ledger_count("refund"), 1);
            let listed = send(d.req(Method::GET, &format!("/payments/{id2}/refunds"), "acct_a")).await;
            assert_eq!((listed.status, listed.json()), (200, json!([])));
            // The key still replays the refund it was first used for.
            let again = send(d.post(&format!("/payments/{id1}/refunds"), "acct_a", &key, &refund(100))).await;
            assert!(again.replayed());
            assert_eq!(again.body, first.body);
        }

        #[tokio::test]
        async fn refund_of_an_unknown_payment_is_404_stored_and_replayed() {
            let d = demo().await;
            let key = new_key();
            let first = send(d.post("/payments/pay_nope/refunds", "acct_a", &key, &refund(100))).await;
            first.assert_problem(404, "urn:payments-demo:problem:not-found");
            assert!(!first.replayed());
            let again = send(d.post("/payments/pay_nope/refunds", "acct_a", &key, &refund(100))).await;
            assert_eq!(again.status, 404);
            assert!(again.replayed());
            assert_eq!(again.body, first.body);
            assert_eq!(again.header("content-type"), Some("application/problem+json"));
            // Another account's payment is unknown to this caller.
            let foreign = paid(&d, "acct_b", 1000).await;
            let path = format!("/payments/{}/refunds", foreign["id"].as_str().unwrap());
            let r = send(d.post(&path, "acct_a", &new_key(), &refund(100))).await;
            r.assert_problem(404, "urn:payments-demo:problem:not-found");
            let listed = send(d.req(Method::GET, &path, "acct_a")).await;
            listed.assert_problem(404, "urn:payments-demo:problem:not-found");
            assert_eq!(d.ledger_count("refund"), 0);
        }

        #[tokio::test]
        async fn over_refund_is_422_stored_and_replayed() {
            let d = demo().await;
            let p = paid(&d, "acct_a", 1000).await;
            let path = format!("/payments/{}/refunds", p["id"].as_str().unwrap());
            let r = send(d.post(&path, "acct_a", &new_key(), &refund(600))).await;
            assert_eq!(r.status, 201);
            let key = new_key();
            let over = send(d.post(&path, "acct_a", &key, &refund(401))).await;
            over.assert_problem(422, "urn:payments-demo:problem:refund-exceeds-payment");
            assert!(!over.replayed());
            let again = send(d.post(&path, "acct_a", &key, &refund(401))).await;
            assert_eq!(again.status, 422);
            assert!(again.replayed());
            assert_eq!(again.body, over.body);
            for amount in [0, -5] {
                let k = new_key();
                let bad = send(d.post(&path, "acct_a", &k, &refund(amount))).await;
                bad.assert_problem(422, "urn:payments-demo:problem:validation");
                let replay = send(d.post(&path, "acct_a", &k, &refund(amount))).await;
                assert!(replay.replayed());
                assert_eq!((replay.status, &replay.body), (422, &bad.body));
            }
            // Exactly what is left can still be refunded, and then nothing more.
            let rest = send(d.post(&path, "acct_a", &new_key(), &refund(400))).await;
            assert_eq!(rest.status, 201, "{}", String::from_utf8_lossy(&rest.body));
            let more = send(d.post(&path, "acct_a", &new_key(), &refund(1))).await;
            more.assert_problem(422, "urn:payments-demo:problem:refund-exceeds-payment");
            assert_eq!(d.ledger_count("refund"), 2);
        }

        #[tokio::test]
        async fn refunds_are_listed_oldest_first() {
            let d = demo().await;
            let p = paid(&d, "acct_l", 1000).await;
            let other = paid(&d, "acct_l", 1000).await;
            let path = format!("/payments/{}/refunds", p["id"].as_str().unwrap());
            let r1 = send(d.post(&path, "acct_l", &new_key(), &refund(100))).await.json();
            let r2 = send(d.post(&path, "acct_l", &new_key(), &json!({"amount": 200}))).await.json();
            assert_eq!(r2["reason"], json!(null));
            let other_path = format!("/payments/{}/refunds", other["id"].as_str().unwrap());
            let r3 = send(d.post(&other_path, "acct_l", &new_key(), &refund(300))).await.json();
            let list = send(d.req(Method::GET, &path, "acct_l")).await;
            assert_eq!(list.status, 200);
            assert_eq!(list.json(), json!([r1, r2]));
            let list = send(d.req(Method::GET, &other_path, "acct_l")).await;
            assert_eq!((list.status, list.json()), (200, json!([r3])));
            let missing = send(d.req(Method::GET, "/payments/pay_nope/refunds", "acct_l")).await;
            missing.assert_problem(404, "urn:payments-demo:problem:not-found");
            assert_eq!(d.ledger_count("refund"), 3);
        }

        #[tokio::test]
        async fn v1_payment_routes_behave_like_the_unprefixed_ones() {
            let d = demo().await;
            let key = new_key();
            let first = send(d.post("/v1/payments", "acct_v", &key, &payment(1000))).await;
            assert_eq!(first.status, 201, "{}", String::from_utf8_lossy(&first.body));
            assert!(!first.replayed());
            let p = first.json();
            let id = p["id"].as_str().unwrap();
            // The same handler answers, so the same Location: a replay must not depend on the prefix.
            assert_eq!(first.header("location"), Some(format!("/payments/{id}").as_str()));
            let again = send(d.post("/v1/payments", "acct_v", &key, &payment(1000))).await;
            assert_eq!(again.status, 201);
            assert!(again.replayed());
            assert_eq!(again.body, first.body);
            assert_eq!(again.header("location"), first.header("location"));
            let changed = send(d.post("/v1/payments", "acct_v", &key, &payment(1001))).await;
            changed.assert_problem(422, "urn:idempotent:problem:key-reused");
            let no_key = send(d.req(Method::POST, "/v1/payments", "acct_v").json(&payment(5))).await;
            no_key.assert_problem(400, "urn:idempotent:problem:key-missing");
            for prefix in ["/v1", ""] {
                let one = send(d.req(Method::GET, &format!("{prefix}/payments/{id}"), "acct_v")).await;
                assert_eq!((one.status, one.json()), (200, p.clone()), "{prefix}");
                let list = send(d.req(Method::GET, &format!("{prefix}/payments"), "acct_v")).await;
                assert_eq!((list.status, list.json()), (200, json!([p.clone()])), "{prefix}");
            }
            let missing = send(d.req(Method::GET, "/v1/payments/pay_nope", "acct_v")).await;
            missing.assert_problem(404, "urn:payments-demo:problem:not-found");

            let refunds = format!("/v1/payments/{id}/refunds");
            let rkey = new_key();
            let r = send(d.post(&refunds, "acct_v", &rkey, &refund(250))).await;
            assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
            assert_eq!(r.json()["payment"], json!(id));
            let replay = send(d.post(&refunds, "acct_v", &rkey, &refund(250))).await;
            assert!(replay.replayed());
            assert_eq!((replay.status, &replay.body), (201, &r.body));
            let over = send(d.post(&refunds, "acct_v", &new_key(), &refund(751))).await;
            over.assert_problem(422, "urn:payments-demo:problem:refund-exceeds-payment");
            let unknown = send(d.post("/v1/payments/pay_nope/refunds", "acct_v", &new_key(), &refund(1))).await;
            unknown.assert_problem(404, "urn:payments-demo:problem:not-found");
            for path in [refunds.clone(), format!("/payments/{id}/refunds")] {
                let list = send(d.req(Method::GET, &path, "acct_v")).await;
                assert_eq!((list.status, list.json()), (200, json!([r.json()])), "{path}");
            }
            assert_eq!(d.ledger_count("payment"), 1);
            assert_eq!(d.ledger_count("refund"), 1);
        }

        #[tokio::test]
        async fn key_used_on_payments_replays_on_v1_payments() {
            let d = demo().await;
            let key = new_key();
            let first = send(d.post("/payments", "acct_w", &key, &payment(1000))).await;
            assert_eq!(first.status, 201);
            let v1 = send(d.post("/v1/payments", "acct_w", &key, &payment(1000))).await;
            assert_eq!(v1.status, 201, "{}", String::from_utf8_lossy(&v1.body));
            assert!(v1.replayed(), "the prefix does not make it another operation");
            assert_eq!(v1.body, first.body);
            assert_eq!(v1.header("location"), first.header("location"));
            assert_eq!(d.ledger_count("payment"), 1);

            let id = first.json()["id"].as_str().unwrap().to_owned();
            let rkey = new_key();
            let r = send(d.post(&format!("/payments/{id}/refunds"), "acct_w", &rkey, &refund(10))).await;
            assert_eq!(r.status, 201);
            let v1 = send(d.post(&format!("/v1/payments/{id}/refunds"), "acct_w", &rkey, &refund(10))).await;
            assert_eq!(v1.status, 201, "{}", String::from_utf8_lossy(&v1.body));
            assert!(v1.replayed());
            assert_eq!(v1.body, r.body);
            assert_eq!(d.ledger_count("refund"), 1);
        }

        #[tokio::test]
        async fn policy_report_lists_refunds() {
            let d = demo().await;
            // The report shows the full paths each handler has served, `/v1` mounts included.
            let created = send(d.post("/v1/payments", "acct_a", &new_key(), &payment(100))).await;
            let id = created.json()["id"].as_str().unwrap().to_owned();
            for path in [format!("/payments/{id}/refunds"), format!("/v1/payments/{id}/refunds")] {
                let refund = send(d.post(&path, "acct_a", &new_key(), &json!({"amount": 1}))).await;
                assert_eq!(refund.status, 201);
            }
            let report = send(d.req(Method::GET, "/_idempotency/policies?format=json", "acct_a")).await;
            assert_eq!(report.status, 200);
            let v = report.json();
            let routes = v["routes"].as_array().unwrap();
            let refunds = routes
                .iter()
                .find(|r| r["scope"] == "refunds.create")
                .unwrap_or_else(|| panic!("no refunds.create route in {v}"));
            assert_eq!(refunds["fields"], json!(["amount"]));
            assert_eq!(refunds["identity"]["path"], "all");
            let served = refunds["served_at"].as_array().unwrap();
            for route in ["POST /payments/{id}/refunds", "POST /v1/payments/{id}/refunds"] {
                assert!(served.contains(&json!(route)), "{route} not in {served:?}");
            }
            let pay = routes.iter().find(|r| r["scope"] == "payments.create").unwrap();
            assert!(pay["served_at"].as_array().unwrap().contains(&json!("POST /v1/payments")), "{pay}");
            let md = send(d.req(Method::GET, "/_idempotency/policies?format=md", "acct_a")).await;
            assert!(String::from_utf8_lossy(&md.body).contains("`refunds.create`"));
        }

        #[tokio::test]
        async fn every_mutating_route_is_recognised_as_protected_under_refuse_mode() {
            // The demo runs enforcement in refuse mode: a route it did not recognise as protected
            // would answer 500 `misconfigured` instead of executing, and a second request would
            // not replay.
            let d = demo().await;
            let created = send(d.post("/payments", "acct_a", &new_key(), &payment(500))).await;
            let id = created.json()["id"].as_str().unwrap().to_owned();
            let routes = [
                ("/payments".to_owned(), payment(100)),
                ("/v1/payments".to_owned(), payment(100)),
                ("/transfers".to_owned(), json!({"amount": 1, "from": "a", "to": "b"})),
                ("/quotes".to_owned(), json!({"any": "thing"})),
                (format!("/payments/{id}/refunds"), json!({"amount": 1})),
                (format!("/v1/payments/{id}/refunds"), json!({"amount": 1})),
            ];
            for (path, body) in routes {
                let key = new_key();
                let first = send(d.post(&path, "acct_a", &key, &body)).await;
                assert_eq!(first.status, 201, "POST {path}: {}", String::from_utf8_lossy(&first.body));
                let again = send(d.post(&path, "acct_a", &key, &body)).await;
                assert!(again.replayed(), "POST {path} replays");
            }
        }

        #[tokio::test]
        async fn policy_report_is_served_in_every_format() {
            let d = demo().await;
            let json = send(d.req(Method::GET, "/_idempotency/policies?format=json", "acct_a")).await;
            assert_eq!(json.status, 200);
            let v = json.json();
            let scopes: Vec<&str> = v["routes"].as_array().unwrap().iter().map(|r| r["scope"].as_str().unwrap()).collect();
            for s in ["payments.create", "transfers.create", "quotes.create", "refunds.create"] {
                assert!(scopes.contains(&s), "{scopes:?}");
            }
            let pay = v["routes"].as_array().unwrap().iter().find(|r| r["scope"] == "payments.create").unwrap();
            assert_eq!(pay["fields"], json!(["amount", "currency", "customer"]));
            assert_eq!(pay["identity"], json!({"path": "all", "query": "all", "body": ["amount", "currency", "customer"]}));
            assert_eq!(pay["ttl_seconds"], 86400.0);
            let md = send(d.req(Method::GET, "/_idempotency/policies?format=md", "acct_a")).await;
            assert!(String::from_utf8_lossy(&md.body).contains("`payments.create`"));
            let html = send(d.req(Method::GET, "/_idempotency/policies?format=html", "acct_a")).await;
            assert!(html.header("content-type").unwrap().starts_with("text/html"));
            assert!(String::from_utf8_lossy(&html.body).contains("<table"));
            let bad = send(d.req(Method::GET, "/_idempotency/policies?format=pdf", "acct_a")).await;
            assert_eq!(bad.status, 400);
        }
    };
}
