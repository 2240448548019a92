//! Checkout in a real browser: headless Chromium (Debian's `chromium`, driven by its
//! `chromedriver` through fantoccini, see `idempotent_tests::browser`) uses the checkout form of
//! both demo binaries as a user would: a double click on the submit button, a reload of the
//! result, Back and submit again, an edited stale form, and a submit that fails with 500 and
//! succeeds the second time. Each ends with one payment per form in the ledger; a screenshot of
//! each result page is written to `target/browser/` as a test artifact.

mod common;

use common::{executions, BINS};
use fantoccini::actions::{InputSource, MouseActions, PointerAction, MOUSE_BUTTON_LEFT};
use fantoccini::Locator;
use idempotent_tests::browser::Browser;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// One demo binary serving a browser, with its ledger.
struct Checkout {
    base: String,
    ledger: PathBuf,
    account: String,
    name: String,
    browser: Browser,
    _demo: idempotent_tests::process::DemoProcess,
}

impl Checkout {
    /// Starts `bin` with `env` on a SQLite store of its own, and a browser logged in as a fresh
    /// account on its checkout form; `None` when there is no browser (outside CI).
    async fn open(bin: &str, scenario: &str, env: &[(&str, &str)]) -> Option<Self> {
        let browser = Browser::start().await?;
        let framework = common::framework(bin);
        let dir = common::dir("browser", &format!("{framework}-{scenario}"));
        let ledger = dir.join("ledger.jsonl");
        let mut cmd = Command::new(bin);
        cmd.env("PAYMENTS_LEDGER", &ledger)
            .env("IDEMPOTENCY_STORE", format!("sqlite:{}", dir.join("idem.db").display()));
        for (name, value) in env {
            cmd.env(name, value);
        }
        let demo = idempotent_tests::process::DemoProcess::start(cmd);
        let account = format!("shopper_{framework}_{}", scenario.replace('-', "_"));
        let base = format!("http://{}", demo.addr);
        let checkout = Self { base, ledger, account, name: format!("{framework}-{scenario}"), browser, _demo: demo };
        checkout.goto(&format!("/login?account={}", checkout.account)).await;
        checkout.element("pay").await;
        assert!(checkout.url().await.ends_with("/checkout"), "login lands on the form");
        Some(checkout)
    }

    async fn goto(&self, path: &str) {
        self.browser.client.goto(&format!("{}{path}", self.base)).await.expect("navigate");
    }

    async fn url(&self) -> String {
        self.browser.client.current_url().await.expect("url").to_string()
    }

    /// The element with `id`, waited for up to 20 seconds.
    async fn element(&self, id: &str) -> fantoccini::elements::Element {
        let wait = self.browser.client.wait().at_most(Duration::from_secs(20));
        wait.for_element(Locator::Id(id)).await.unwrap_or_else(|e| panic!("{}: no #{id} ({e})", self.name))
    }

    /// The payment id on the receipt page, once it shows.
    async fn receipt(&self) -> String {
        self.element("payment").await.text().await.expect("payment id")
    }

    /// The problem page's status and text, once it shows.
    async fn problem(&self) -> (String, String) {
        let problem = self.element("problem").await;
        (problem.attr("data-status").await.unwrap().unwrap_or_default(), problem.text().await.unwrap())
    }

    async fn pay(&self) {
        self.element("pay").await.click().await.expect("click Pay");
    }

    async fn back(&self) {
        self.browser.client.back().await.expect("Back");
        self.element("pay").await;
    }

    async fn screenshot(&self, what: &str) {
        let path = self.browser.screenshot(&format!("{}-{what}", self.name)).await;
        eprintln!("screenshot: {}", path.display());
    }

    /// The account's payments in the ledger.
    fn payments(&self) -> usize {
        executions(&[&self.ledger], "payment", Some(&self.account))
    }

    /// How many checkout submits the server answered, by outcome, from `/metrics`.
    async fn submits(&self) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.base)).await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with("idempotent_requests_total{") && l.contains("scope=\"checkout.create\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

/// A double click on Pay: two submits of one form while the first is being processed; the second
/// waits for the first and the browser shows its receipt. One payment.
#[tokio::test]
async fn a_double_click_pays_once() {
    for bin in BINS {
        let Some(c) = Checkout::open(bin, "double-click", &[("PAYMENTS_CHECKOUT_DELAY_MS", "800")]).await else {
            return;
        };
        let pay = c.element("pay").await;
        let double_click = MouseActions::new("mouse".into())
            .then(PointerAction::MoveToElement { element: pay, duration: None, x: 0.0, y: 0.0 })
            .then(PointerAction::Down { button: MOUSE_BUTTON_LEFT })
            .then(PointerAction::Up { button: MOUSE_BUTTON_LEFT })
            .then(PointerAction::Pause { duration: Duration::from_millis(60) })
            .then(PointerAction::Down { button: MOUSE_BUTTON_LEFT })
            .then(PointerAction::Up { button: MOUSE_BUTTON_LEFT });
        c.browser.client.perform_actions(double_click).await.expect("double click");
        let payment = c.receipt().await;
        c.screenshot("receipt").await;
        assert!(payment.starts_with("pay_"), "{payment}");
        assert_eq!(c.submits().await, 2, "{}: both clicks reached the server", c.name);
        assert_eq!(c.payments(), 1, "{}: one payment for one form", c.name);
        c.browser.close().await;
    }
}

/// Pay, then reload the result: the receipt again (the 303 made it a page of its own), one
/// payment.
#[tokio::test]
async fn a_reload_after_paying_pays_once() {
    for bin in BINS {
        let Some(c) = Checkout::open(bin, "reload", &[]).await else { return };
        c.pay().await;
        let payment = c.receipt().await;
        c.browser.client.refresh().await.expect("reload");
        assert_eq!(c.receipt().await, payment);
        c.screenshot("receipt-reloaded").await;
        assert_eq!(c.payments(), 1, "{}", c.name);
        c.browser.close().await;
    }
}

/// Pay, go Back to the form (the same token in it) and pay again: the first payment's receipt,
/// replayed. One payment.
#[tokio::test]
async fn back_and_pay_again_shows_the_first_payment() {
    for bin in BINS {
        let Some(c) = Checkout::open(bin, "back", &[]).await else { return };
        c.pay().await;
        let payment = c.receipt().await;
        c.back().await;
        c.pay().await;
        assert_eq!(c.receipt().await, payment, "{}: the same payment, not a second one", c.name);
        c.screenshot("receipt-after-back").await;
        assert_eq!(c.payments(), 1, "{}", c.name);
        c.browser.close().await;
    }
}

/// Pay, go Back, change the amount on the stale form and pay: a 422 page that says so (never the
/// old receipt), with a link to a fresh form, whose payment is a new one.
#[tokio::test]
async fn an_edited_stale_form_is_refused_with_a_page() {
    for bin in BINS {
        let Some(c) = Checkout::open(bin, "edited", &[]).await else { return };
        c.pay().await;
        let first = c.receipt().await;
        c.back().await;
        let amount = c.element("amount").await;
        amount.clear().await.unwrap();
        amount.send_keys("2500").await.unwrap();
        c.pay().await;
        let (status, text) = c.problem().await;
        c.screenshot("edited-stale-form").await;
        assert_eq!(status, "422", "{}: {text}", c.name);
        assert!(text.contains("already submitted with other values"), "{text}");
        assert_eq!(c.payments(), 1, "{}: nothing created by the edited form", c.name);
        // The page's way out: a fresh form, a new payment.
        c.element("fresh").await.click().await.unwrap();
        c.pay().await;
        let second = c.receipt().await;
        assert_ne!(second, first);
        assert_eq!(c.payments(), 2, "{}: one payment per form", c.name);
        c.browser.close().await;
    }
}

/// The provider fails the first submit (500): the browser shows the failure, and the same form,
/// submitted again, pays. One payment.
#[tokio::test]
async fn a_checkout_that_failed_with_500_succeeds_when_submitted_again() {
    for bin in BINS {
        let Some(c) = Checkout::open(bin, "after-500", &[("PAYMENTS_CHECKOUT_FAILURES", "1")]).await else {
            return;
        };
        c.pay().await;
        let (status, text) = c.problem().await;
        c.screenshot("failed-500").await;
        assert_eq!(status, "500", "{}: {text}", c.name);
        assert_eq!(c.payments(), 0);
        c.back().await;
        c.pay().await;
        let payment = c.receipt().await;
        c.screenshot("receipt-after-500").await;
        assert!(payment.starts_with("pay_"));
        assert_eq!(c.payments(), 1, "{}", c.name);
        c.browser.close().await;
    }
}
