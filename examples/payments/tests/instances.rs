//! Several demo processes behind one shared store, as instances behind a load balancer: clients
//! racing one key across processes, and a process killed in the middle of a transfer.

mod common;

use common::{dir, framework, ledger_count, start, Instance, BINS};
use std::time::{Duration, Instant};

/// Every (binary, shared store) pair, named for messages and temporary files.
async fn setups() -> Vec<(String, &'static str, String)> {
    let mut stores = Vec::new();
    if let Some(url) = idempotent_tests::postgres::database_url().await {
        stores.push(("postgres", url));
    }
    if let Some(url) = idempotent_tests::redis_server::redis_url().await {
        stores.push(("redis", url));
    }
    let mut out = Vec::new();
    for bin in BINS {
        for (store, url) in &stores {
            out.push((format!("{}-{store}", framework(bin)), bin, url.clone()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_racing_one_key_across_three_instances_execute_once() {
    for (name, bin, store) in setups().await {
        let d = dir("instances", &format!("race-{name}"));
        let instances: Vec<Instance> = (0..3).map(|i| start(bin, &store, &d.join(format!("l{i}.jsonl")), 0)).collect();
        let key = format!("race-{name}-{}", std::process::id());
        let client = reqwest::Client::new();
        let mut tasks = Vec::new();
        for i in 0..60 {
            let url = format!("http://{}/payments", instances[i % 3].demo.addr);
            let (client, key) = (client.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth("acct_lb")
                    .header("Idempotency-Key", key)
                    .json(&serde_json::json!({"amount": 500, "currency": "EUR", "customer": "c"}))
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.bytes().await.unwrap())
            }));
        }
        let mut bodies = Vec::new();
        for t in tasks {
            let (status, body) = t.await.unwrap();
            match status {
                201 => bodies.push(body),
                409 => {}
                other => panic!("{name}: unexpected status {other}: {}", String::from_utf8_lossy(&body)),
            }
        }
        assert!(!bodies.is_empty(), "{name}");
        assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{name}: every 201 is the same payment");
        let refs: Vec<&Instance> = instances.iter().collect();
        assert_eq!(ledger_count(&refs, "payment"), 1, "{name}: exactly one execution across instances");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_transfer_is_retried_once_elsewhere() {
    for (name, bin, store) in setups().await {
        let d = dir("instances", &format!("kill-{name}"));
        let mut a = start(bin, &store, &d.join("a.jsonl"), 2_000);
        let b = start(bin, &store, &d.join("b.jsonl"), 200);
        let key = format!("kill-{name}-{}", std::process::id());
        let body = serde_json::json!({"amount": 70, "from": "x", "to": "y"});
        let client = reqwest::Client::new();
        let send = |addr: String| {
            client
                .post(format!("http://{addr}/transfers"))
                .bearer_auth("acct_kill")
                .header("Idempotency-Key", &key)
                .json(&body)
                .send()
        };
        let doomed = tokio::spawn(send(a.demo.addr.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.demo.kill(); // SIGKILL: no release, no completion.
        assert!(doomed.await.unwrap().is_err(), "{name}: the client lost its connection");
        // The claim outlives the process until its lease (3s) runs out: retries see 409 first.
        let first_retry = send(b.demo.addr.clone()).await.unwrap();
        assert_eq!(first_retry.status(), 409, "{name}");
        assert!(first_retry.headers().contains_key("retry-after"));
        let deadline = Instant::now() + Duration::from_secs(15);
        let done = loop {
            let r = send(b.demo.addr.clone()).await.unwrap();
            if r.status() == 201 {
                break r;
            }
            assert_eq!(r.status(), 409, "{name}");
            assert!(Instant::now() < deadline, "{name}: the lease never expired");
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        assert!(done.headers().get("idempotent-replayed").is_none(), "{name}: the retry ran the transfer");
        let again = send(b.demo.addr.clone()).await.unwrap();
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(ledger_count(&[&a, &b], "transfer"), 1, "{name}: the killed attempt never executed, the retry once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_run_fails_closed_and_the_service_recovers_by_itself() {
    use idempotent_tests::redis_server::{free_port, RedisProcess};
    let port = free_port(false).expect("a free port");
    let Some(mut redis) = RedisProcess::start(port, &[]).await else {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("redis-server is needed (CI=true forbids skipping)");
        }
        eprintln!("SKIPPED: no redis-server on PATH for the outage test");
        return;
    };
    for bin in BINS {
        let d = dir("instances", &format!("outage-{}", framework(bin)));
        let demo = start(bin, &redis.url(), &d.join("l.jsonl"), 0);
        let client = reqwest::Client::new();
        let pay = |key: &'static str| {
            client
                .post(format!("http://{}/payments", demo.demo.addr))
                .bearer_auth("acct_outage")
                .header("Idempotency-Key", key)
                .json(&serde_json::json!({"amount": 42, "currency": "EUR", "customer": "c"}))
                .send()
        };
        assert_eq!(pay("before").await.unwrap().status(), 201);

        redis.kill();
        let down = pay("during").await.unwrap();
        assert_eq!(down.status(), 503, "{bin}");
        assert_eq!(down.headers()["content-type"], "application/problem+json");
        assert!(down.headers().contains_key("retry-after"));
        let problem: serde_json::Value = down.json().await.unwrap();
        assert_eq!(problem["type"], "urn:idempotent:problem:store-unavailable");
        assert_eq!(ledger_count(&[&demo], "payment"), 1, "{bin}: nothing executed while the store was down");

        redis = RedisProcess::start(port, &[]).await.expect("redis restarts on the same port");
        let deadline = Instant::now() + Duration::from_secs(10);
        let back = loop {
            let r = pay("during").await.unwrap();
            if r.status() != 503 || Instant::now() > deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(back.status(), 201, "{bin}: the same process serves again without a restart");
        assert_eq!(pay("during").await.unwrap().headers()["idempotent-replayed"], "true");
        assert_eq!(ledger_count(&[&demo], "payment"), 2, "{bin}");
    }
}
