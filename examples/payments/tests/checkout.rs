//! The demo's checkout over HTTP, on both binaries, as the contract states it: the login cookie,
//! the form and its token, one payment per token (the same 303 however often it is submitted),
//! 422 for the same token with another amount, 400 for a missing, unknown or expired token and
//! 403 for another account's, each an HTML page with a link to `/checkout` that creates nothing,
//! and the mint endpoint for JSON clients.

mod common;

use common::{executions, BINS};
use reqwest::{redirect, Client, StatusCode};
use std::process::Command;

/// `name="_idem" value="TOKEN"` of a form page.
fn token_of(page: &str) -> String {
    let at = page.find("name=\"_idem\" value=\"").expect("a token field") + "name=\"_idem\" value=\"".len();
    page[at..].split('"').next().unwrap().to_owned()
}

struct Shop {
    base: String,
    client: Client,
    ledger: std::path::PathBuf,
    _demo: idempotent_tests::process::DemoProcess,
}

impl Shop {
    fn start(bin: &str) -> Self {
        let dir = common::dir("checkout", common::framework(bin));
        let ledger = dir.join("ledger.jsonl");
        let mut cmd = Command::new(bin);
        cmd.env("PAYMENTS_LEDGER", &ledger)
            .env("IDEMPOTENCY_STORE", format!("sqlite:{}", dir.join("idem.db").display()));
        let demo = idempotent_tests::process::DemoProcess::start(cmd);
        let client = Client::builder().redirect(redirect::Policy::none()).build().unwrap();
        Self { base: format!("http://{}", demo.addr), client, ledger, _demo: demo }
    }

    /// The cookie `/login?account=` sets, checked to redirect to the form.
    async fn login(&self, account: &str) -> String {
        let r = self.client.get(format!("{}/login?account={account}", self.base)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()["location"], "/checkout");
        let cookie = r.headers()["set-cookie"].to_str().unwrap();
        assert!(cookie.contains("SameSite=Lax") && cookie.contains("HttpOnly"), "{cookie}");
        cookie.split(';').next().unwrap().to_owned()
    }

    async fn form(&self, cookie: &str) -> String {
        let r = self.client.get(format!("{}/checkout", self.base)).header("cookie", cookie).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
        let page = r.text().await.unwrap();
        assert!(page.contains("<form method=\"post\" action=\"/checkout\">"), "{page}");
        for field in ["amount", "currency", "customer"] {
            assert!(page.contains(&format!("name=\"{field}\"")), "{field}");
        }
        token_of(&page)
    }

    async fn pay(&self, cookie: &str, amount: i64, token: Option<&str>) -> (StatusCode, Option<String>, String) {
        let mut body = format!("amount={amount}&currency=EUR&customer=cus_1");
        if let Some(token) = token {
            body.push_str(&format!("&_idem={token}"));
        }
        let r = self
            .client
            .post(format!("{}/checkout", self.base))
            .header("cookie", cookie)
            .header("accept", "text/html,application/xhtml+xml,*/*;q=0.8")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        let location = r.headers().get("location").map(|l| l.to_str().unwrap().to_owned());
        (r.status(), location, r.text().await.unwrap())
    }

    fn payments(&self, account: &str) -> usize {
        executions(&[&self.ledger], "payment", Some(account))
    }
}

/// The refused submits' page: the status, HTML, and the way to a fresh form.
fn assert_page(answer: &(StatusCode, Option<String>, String), status: u16, what: &str) {
    assert_eq!(answer.0.as_u16(), status, "{what}: {}", answer.2);
    assert!(answer.2.contains("href=\"/checkout\""), "{what}: {}", answer.2);
}

#[tokio::test]
async fn one_payment_per_form_and_html_pages_for_refused_submits() {
    for bin in BINS {
        let shop = Shop::start(bin);
        let (alice, bob) = (shop.login("alice").await, shop.login("bob").await);
        let token = shop.form(&alice).await;
        let first = shop.pay(&alice, 1200, Some(&token)).await;
        assert_eq!(first.0, StatusCode::SEE_OTHER, "{}", first.2);
        let receipt = first.1.clone().expect("a receipt");
        assert!(receipt.starts_with("/checkout/receipt/pay_"), "{receipt}");
        for _ in 0..2 {
            let again = shop.pay(&alice, 1200, Some(&token)).await;
            assert_eq!((again.0, again.1.as_deref()), (StatusCode::SEE_OTHER, Some(receipt.as_str())));
        }
        let page = shop.client.get(format!("{}{receipt}", shop.base)).header("cookie", &alice).send().await.unwrap();
        assert_eq!(page.status(), 200);
        assert!(page.text().await.unwrap().contains(receipt.trim_start_matches("/checkout/receipt/")));
        assert_page(&shop.pay(&alice, 1300, Some(&token)).await, 422, "another amount");
        assert_page(&shop.pay(&alice, 1200, None).await, 400, "missing");
        assert_page(&shop.pay(&alice, 1200, Some(&"ab".repeat(40))).await, 403, "forged");
        assert_page(&shop.pay(&alice, 1200, Some("not-a-token")).await, 400, "malformed");
        let bobs = shop.form(&bob).await;
        assert_page(&shop.pay(&alice, 1200, Some(&bobs)).await, 403, "another account's");
        // A token of this secret the store never issued (its MAC holds): unknown.
        let digest = idempotent_axum::core::digest::DigestKey::default().actor("alice");
        let key = idempotent_axum::core::issued::TokenKey::new(payments_demo::config::DEFAULT_TOKEN_SECRET);
        let now = std::time::SystemTime::now();
        let unknown = key.mint(&digest, "checkout.create", std::time::Duration::from_secs(900), now);
        assert_page(&shop.pay(&alice, 1200, Some(&unknown.token)).await, 400, "unknown");
        let expired = key.mint(
            &digest,
            "checkout.create",
            std::time::Duration::from_secs(60),
            now - std::time::Duration::from_secs(3600),
        );
        assert_page(&shop.pay(&alice, 1200, Some(&expired.token)).await, 400, "expired");
        assert_eq!((shop.payments("alice"), shop.payments("bob")), (1, 0), "{bin}");

        // JSON clients: a token from the mint endpoint (cookie or bearer) works as `_idem`.
        let minted = shop
            .client
            .post(format!("{}/_idempotency/tokens", shop.base))
            .header("cookie", &alice)
            .json(&serde_json::json!({"scope": "checkout.create"}))
            .send()
            .await
            .unwrap();
        assert_eq!(minted.status(), 201);
        assert_eq!(minted.headers()["cache-control"], "no-store");
        let minted: serde_json::Value = minted.json().await.unwrap();
        let second = shop.pay(&alice, 1200, minted["token"].as_str()).await;
        assert_eq!(second.0, StatusCode::SEE_OTHER);
        assert_ne!(second.1.as_deref(), Some(receipt.as_str()), "a new form is a new payment");
        assert_eq!(shop.payments("alice"), 2);
        let anonymous = shop.client.get(format!("{}/checkout", shop.base)).send().await.unwrap();
        assert_eq!(anonymous.status(), 401);
    }
}
