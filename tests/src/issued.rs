//! The conformance suite of server-issued form tokens (`key = issued(..)`), written once and run
//! against a fixture app of each framework, on each shared store, over a loopback port.
//!
//! [`issued_conformance_tests!`](crate::issued_conformance_tests) expands to one module per store
//! (SQLite, PostgreSQL, Redis) with one `#[tokio::test]` per case of the protocol's table. Its
//! argument names the framework's `start(opener, flags) -> Server`, which serves these routes,
//! every one authenticated by `Authorization: Bearer <account>`, on its own thread and runtime
//! (so that [`Server::kill`] is a crash: the runtime is dropped with every task on it):
//!
//! | route | policy |
//! |---|---|
//! | `GET /form` | mints a token for [`FORM_SCOPE`] (the `Mint` extractor); answers it as text |
//! | `POST /checkout` (form `amount`, `_idem`) | [`FORM_SCOPE`], `key = issued(ttl = "15m", from = form("_idem"))`, `fields = [amount]`, `on_conflict = "wait"`, lease 3 s: 303 to `/receipt/{run}` |
//! | `POST /checkout-reject` | [`REJECT_SCOPE`], the same but `on_conflict = "reject"` |
//! | `POST /by-header` (form `amount`) | [`HEADER_SCOPE`], `key = issued(from = header("x-form-token"))`: 201 `run {n}` |
//! | `POST /_idempotency/tokens` | the mint endpoint |
//!
//! Every handler counts its runs in [`Flags::runs`], sleeps [`Flags::delay_ms`], and answers 500
//! once when [`Flags::fail_next`] is set, or panics once when [`Flags::panic_next`] is. The
//! runtime has the token secret [`SECRET`], a token quota of [`QUOTA`], a store timeout of
//! 400 ms, and renders the problems of issued routes for browsers with [`problem_page`].

use futures_util::future::BoxFuture;
use idempotent_core::store::Store;
use reqwest::{Client, RequestBuilder};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The token secret of every fixture.
pub const SECRET: &[u8] = b"the issued-token suite's secret, 32 bytes or more";
/// The scope of `POST /checkout`.
pub const FORM_SCOPE: &str = "tokens.checkout";
/// The scope of `POST /checkout-reject`.
pub const REJECT_SCOPE: &str = "tokens.reject";
/// The scope of `POST /by-header`.
pub const HEADER_SCOPE: &str = "tokens.header";
/// Live tokens per caller.
pub const QUOTA: usize = 12;

/// Opens a store on the suite's backend: called on the server's own runtime, so that its
/// connections live there.
pub type Opener = Arc<dyn Fn() -> BoxFuture<'static, Arc<dyn Store>> + Send + Sync>;

/// What the fixture's handlers do, and how often they ran.
#[derive(Debug, Default)]
pub struct Flags {
    /// Handler runs.
    pub runs: AtomicUsize,
    /// Milliseconds each run sleeps before answering.
    pub delay_ms: AtomicU64,
    /// The next run answers 500.
    pub fail_next: AtomicBool,
    /// The next run panics.
    pub panic_next: AtomicBool,
}

impl Flags {
    /// One run: sleeps, then answers `Err(500)` or panics when told to, else `Ok(run number)`.
    pub async fn run(&self) -> Result<usize, u16> {
        let n = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(500);
        }
        assert!(!self.panic_next.swap(false, Ordering::SeqCst), "the handler panics, as told");
        Ok(n)
    }

    /// Runs so far.
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

/// The page the fixtures render for a problem of an issued route (to browsers).
pub fn problem_page(problem: &idempotent_core::problem::Problem) -> String {
    format!(
        "<!doctype html><title>{}</title><p class=\"problem\" data-status=\"{}\">{}</p><a href=\"/form\">Get a fresh form</a>",
        problem.title, problem.status, problem.detail
    )
}

/// A running fixture server.
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its handlers' flags.
    pub flags: Arc<Flags>,
    /// HTTP client (redirects not followed).
    pub client: Client,
    stop: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("base", &self.base).finish()
    }
}

impl Server {
    /// A server at `addr` whose `stop` drops its runtime.
    pub fn new(addr: std::net::SocketAddr, flags: Arc<Flags>, stop: Box<dyn FnOnce() + Send>) -> Self {
        let client = Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
        Self { base: format!("http://{addr}"), flags, client, stop: Some(stop) }
    }

    /// Stops the server as a crash would: its runtime is dropped with every task on it, the
    /// handlers and their lease renewals included; nothing is stored or released.
    pub fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
    }

    /// A fresh form token for `account` from `GET /form`.
    pub async fn form(&self, account: &str) -> String {
        let response = self.client.get(format!("{}/form", self.base)).bearer_auth(account).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    /// `POST path` of a form with `amount` and the token field `_idem` (each of `tokens`), as
    /// `account`, accepting `accept`.
    pub fn submit(&self, path: &str, account: &str, amount: i64, tokens: &[&str], accept: &str) -> RequestBuilder {
        let mut form = format!("amount={amount}");
        for token in tokens {
            form.push_str(&format!("&_idem={token}"));
        }
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(account)
            .header("accept", accept)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What browsers send as `Accept` for a form submit.
pub const HTML: &str = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
/// What a JSON client sends.
pub const JSON: &str = "application/json";

/// A fresh account name.
pub fn account() -> String {
    format!("acct-{}", uuid::Uuid::new_v4().simple())
}

/// The suite's stores.
pub mod stores {
    use super::Opener;
    use idempotent_core::store::{RedisStore, SqliteStore, Store};
    use std::sync::Arc;

    /// A fresh SQLite file.
    pub async fn sqlite() -> Option<Opener> {
        let path = std::env::temp_dir().join(format!("issued-{}.db", uuid::Uuid::new_v4().simple()));
        let spec = format!("sqlite:{}", path.display());
        Some(Arc::new(move || {
            let spec = spec.clone();
            Box::pin(async move {
                let store: Arc<dyn Store> = Arc::new(SqliteStore::connect(&spec).await.expect("open sqlite"));
                store
            })
        }))
    }

    /// A fresh schema of the test PostgreSQL database (`None`, loudly, when there is none).
    pub async fn postgres() -> Option<Opener> {
        let schema = crate::postgres::TestSchema::new().await?;
        Some(Arc::new(move || {
            let schema = schema.clone();
            Box::pin(async move {
                let store: Arc<dyn Store> = schema.store().await;
                store
            })
        }))
    }

    /// A fresh key prefix on the test Redis (`None`, loudly, when there is none).
    pub async fn redis() -> Option<Opener> {
        let url = crate::redis_server::redis_url().await?;
        let prefix = crate::redis_server::test_prefix();
        Some(Arc::new(move || {
            let (url, prefix) = (url.clone(), prefix.clone());
            Box::pin(async move {
                let store: Arc<dyn Store> =
                    Arc::new(RedisStore::builder(&url).prefix(prefix).build().await.expect("connect to redis"));
                store
            })
        }))
    }
}

/// Expands to one module per store (`sqlite`, `postgres`, `redis`), each with one test per case of
/// the issued-token table; `$start` is the framework's `start(Opener, Arc<Flags>) -> Server`.
#[macro_export]
macro_rules! issued_conformance_tests {
    ($start:path) => {
        $crate::issued_conformance_tests!(@store sqlite, $start);
        $crate::issued_conformance_tests!(@store postgres, $start);
        $crate::issued_conformance_tests!(@store redis, $start);
    };
    (@store $store:ident, $start:path) => {
        mod $store {
            #[allow(unused_imports)]
            use super::*;
            use $crate::http::{send, Captured};
            use $crate::issued::{account, stores, Flags, Opener, Server, FORM_SCOPE, HTML, JSON, QUOTA, SECRET};
            use std::sync::atomic::Ordering;
            use std::sync::Arc;
            use std::time::Duration;

            async fn opener() -> Option<Opener> {
                stores::$store().await
            }

            async fn server() -> Option<Server> {
                Some($start(opener().await?, Arc::new(Flags::default())).await)
            }

            fn assert_see_other(c: &Captured) -> String {
                assert_eq!(c.status, 303, "{}", String::from_utf8_lossy(&c.body));
                c.header("location").expect("a Location").to_owned()
            }

            const KEY_REUSED: &str = "urn:idempotent:problem:key-reused";
            const IN_PROGRESS: &str = "urn:idempotent:problem:in-progress";
            const TOKEN_INVALID: &str = "urn:idempotent:problem:token-invalid";
            const TOKEN_FORBIDDEN: &str = "urn:idempotent:problem:token-forbidden";
            const KEY_MISSING: &str = "urn:idempotent:problem:key-missing";
            const KEY_INVALID: &str = "urn:idempotent:problem:key-invalid";

            /// A double click: the second submit arrives while the first runs, waits for it, and
            /// gets its 303; the handler ran once.
            #[tokio::test]
            async fn a_double_click_waits_for_the_first_submit_and_gets_its_303() {
                let Some(s) = server().await else { return };
                let who = account();
                let token = s.form(&who).await;
                s.flags.delay_ms.store(600, Ordering::SeqCst);
                let (a, b) = tokio::join!(
                    send(s.submit("/checkout", &who, 10, &[&token], HTML)),
                    async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        send(s.submit("/checkout", &who, 10, &[&token], HTML)).await
                    }
                );
                assert_eq!(assert_see_other(&a), assert_see_other(&b));
                // Whichever claimed first ran; the other waited and got its answer.
                assert!(a.replayed() != b.replayed(), "one ran, the other is its answer");
                assert_eq!(s.flags.runs(), 1);
            }

            /// Two tabs of one form on a route that rejects concurrent duplicates: 409 with
            /// `Retry-After`, then the first's 303 once it finished.
            #[tokio::test]
            async fn a_second_tab_on_a_rejecting_route_gets_409_then_the_result() {
                let Some(s) = server().await else { return };
                let who = account();
                let token = s.mint(&who, $crate::issued::REJECT_SCOPE).await;
                s.flags.delay_ms.store(600, Ordering::SeqCst);
                let (a, b) = tokio::join!(send(s.submit("/checkout-reject", &who, 10, &[&token], JSON)), async {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    send(s.submit("/checkout-reject", &who, 10, &[&token], JSON)).await
                });
                assert_see_other(&a);
                b.assert_problem(409, IN_PROGRESS);
                assert!(b.header("retry-after").is_some());
                let later = send(s.submit("/checkout-reject", &who, 10, &[&token], JSON)).await;
                assert_eq!(assert_see_other(&later), assert_see_other(&a));
                assert_eq!(s.flags.runs(), 1);
            }

            /// A reload or a Back-and-submit after success: the stored 303, replayed.
            #[tokio::test]
            async fn a_resubmit_after_success_replays_the_303() {
                let Some(s) = server().await else { return };
                let who = account();
                let token = s.form(&who).await;
                let first = send(s.submit("/checkout", &who, 10, &[&token], HTML)).await;
                let location = assert_see_other(&first);
                for _ in 0..2 {
                    let again = send(s.submit("/checkout", &who, 10, &[&token], HTML)).await;
                    assert_eq!(assert_see_other(&again), location);
                    assert!(again.replayed());
                }
                assert_eq!(s.flags.runs(), 1);
                // A new form is a new payment.
                let fresh = s.form(&who).await;
                let other = send(s.submit("/checkout", &who, 10, &[&fresh], HTML)).await;
                assert_ne!(assert_see_other(&other), location);
                assert_eq!(s.flags.runs(), 2);
            }

            /// A stale form edited and submitted with its old token: 422, never the old result;
            /// for a browser, the application's page.
            #[tokio::test]
            async fn an_edited_stale_form_is_422_never_the_old_result() {
                let Some(s) = server().await else { return };
                let who = account();
                let token = s.form(&who).await;
                assert_see_other(&send(s.submit("/checkout", &who, 10, &[&token], HTML)).await);
                let edited = send(s.submit("/checkout", &who, 11, &[&token], JSON)).await;
                edited.assert_problem(422, KEY_REUSED);
                let page = send(s.submit("/checkout", &who, 11, &[&token], HTML)).await;
                assert_eq!(page.status, 422);
                assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
                assert!(String::from_utf8_lossy(&page.body).contains("href=\"/form\""));
                assert!(!page.replayed());
                assert_eq!(s.flags.runs(), 1);
            }

            /// Tokens that were not issued to this caller for this form, or no longer hold: 400
            /// or 403 problems (the application's page for a browser, with a link to a fresh
            /// form), checked before anything runs; never a replay.
            #[tokio::test]
            async fn unknown_forged_expired_foreign_and_missing_tokens_are_refused() {
                let Some(s) = server().await else { return };
                let (who, other) = (account(), account());
                // Completed by `other`: a replay would be the worst answer to `who`.
                let theirs = s.form(&other).await;
                assert_see_other(&send(s.submit("/checkout", &other, 10, &[&theirs], HTML)).await);
                let key = idempotent_core::issued::TokenKey::new(SECRET);
                let digest = idempotent_core::digest::DigestKey::default().actor(&who);
                let now = std::time::SystemTime::now();
                // MAC-valid but never recorded as issued: unknown to the store.
                let unknown = key.mint(&digest, FORM_SCOPE, Duration::from_secs(900), now).token;
                let expired = key.mint(&digest, FORM_SCOPE, Duration::from_secs(60), now - Duration::from_secs(120)).token;
                let other_scope = s.mint(&who, $crate::issued::REJECT_SCOPE).await;
                let forged = "0123456789abcdef".repeat(5);
                let foreign_secret = idempotent_core::issued::TokenKey::new(b"another secret")
                    .mint(&digest, FORM_SCOPE, Duration::from_secs(900), now)
                    .token;
                let mine = s.form(&who).await;
                let cases: [(&str, Vec<&str>, u16, &str); 9] = [
                    ("unknown", vec![&unknown], 400, TOKEN_INVALID),
                    ("expired", vec![&expired], 400, TOKEN_INVALID),
                    ("malformed", vec!["not-a-token"], 400, TOKEN_INVALID),
                    ("forged", vec![&forged], 403, TOKEN_FORBIDDEN),
                    ("another secret's", vec![&foreign_secret], 403, TOKEN_FORBIDDEN),
                    ("another user's", vec![&theirs], 403, TOKEN_FORBIDDEN),
                    ("another form's", vec![&other_scope], 403, TOKEN_FORBIDDEN),
                    ("missing", vec![], 400, KEY_MISSING),
                    ("sent twice", vec![&mine, &mine], 400, KEY_INVALID),
                ];
                for (what, tokens, status, type_uri) in cases {
                    let json = send(s.submit("/checkout", &who, 10, &tokens, JSON)).await;
                    json.assert_problem(status, type_uri);
                    assert!(!json.replayed(), "{what}");
                    let page = send(s.submit("/checkout", &who, 10, &tokens, HTML)).await;
                    assert_eq!(page.status, status, "{what}");
                    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"), "{what}");
                    assert_eq!(page.header("cache-control"), Some("no-store"), "{what}");
                    assert!(String::from_utf8_lossy(&page.body).contains("href=\"/form\""), "{what}");
                }
                assert_eq!(s.flags.runs(), 1, "only `other`'s own submit ran");
                // The caller's own fresh form still works after all that.
                assert_see_other(&send(s.submit("/checkout", &who, 10, &[&mine], HTML)).await);
                assert_eq!(s.flags.runs(), 2);
            }

            /// A handler's 500: the token is issued again, and the same form succeeds.
            #[tokio::test]
            async fn after_a_500_the_same_form_can_be_submitted_again() {
                let Some(s) = server().await else { return };
                let who = account();
                let token = s.form(&who).await;
                s.flags.fail_next.store(true, Ordering::SeqCst);
                let failed = send(s.submit("/checkout", &who, 10, &[&token], HTML)).await;
                assert_eq!(failed.status, 500);
                let second = send(s.submit("/checkout", &who, 10, &[&token], HTML)).await;
                let location = assert_see_other(&second);
                assert!(!second.replayed());
                let third = send(s.submit("/checkout", &who, 10, &[&token], HTML)).await;
                assert_eq!(assert_see_other(&third), location);
                assert!(third.replayed());
                assert_eq!(s.flags.runs(), 2, "the failed run and the successful one");
            }

            /// A handler's panic: the same.
            #[tokio::test]
            async fn after_a_panic_the_same_form_can_be_submitted_again() {
                let Some(s) = server().await else { return };
                let who = account();
                let token = s.form(&who).await;
                s.flags.panic_next.store(true, Ordering::SeqCst);
                let failed = send(s.submit("/checkout", &who, 10, &[&token], JSON)).await;
                failed.assert_problem(500, "urn:idempotent:problem:handler-panicked");
                assert_see_other(&send(s.submit("/checkout", &who, 10, &[&token], HTML)).await);
                assert_eq!(s.flags.runs(), 2);
            }

            /// A crash while the handler runs: once the dead claim's lease ran out, the same form
            /// submitted to another instance runs there, once.
            #[tokio::test]
            async fn after_a_crash_the_same_form_runs_on_another_instance() {
                let Some(open) = opener().await else { return };
                let mut crashing = $start(open.clone(), Arc::new(Flags::default())).await;
                let survivor = $start(open, Arc::new(Flags::default())).await;
                let who = account();
                let token = crashing.form(&who).await;
                crashing.flags.delay_ms.store(60_000, Ordering::SeqCst);
                let lost = tokio::spawn(crashing.submit("/checkout", &who, 10, &[&token], HTML).send());
                while crashing.flags.runs() == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                crashing.kill();
                // Nothing, or the 500 of a task cancelled while its runtime was torn down; never
                // an outcome, and nothing stored.
                if let Ok(answer) = lost.await.unwrap() {
                    assert_eq!(answer.status(), 500, "the crashed instance answered no outcome");
                }
                // Waits (on_conflict = "wait") until the lease of the dead claim runs out.
                let retried = send(survivor.submit("/checkout", &who, 10, &[&token], HTML)).await;
                let location = assert_see_other(&retried);
                assert!(!retried.replayed());
                let again = send(survivor.submit("/checkout", &who, 10, &[&token], HTML)).await;
                assert_eq!(assert_see_other(&again), location);
                assert_eq!(survivor.flags.runs(), 1);
            }

            /// A token sent in a header (a script's submit), from the mint endpoint.
            #[tokio::test]
            async fn a_token_from_the_mint_endpoint_works_in_a_header() {
                let Some(s) = server().await else { return };
                let who = account();
                let token = s.mint(&who, $crate::issued::HEADER_SCOPE).await;
                let submit = || {
                    s.client
                        .post(format!("{}/by-header", s.base))
                        .bearer_auth(&who)
                        .header("x-form-token", token.as_str())
                        .header("content-type", "application/x-www-form-urlencoded")
                        .body("amount=5")
                };
                let first = send(submit()).await;
                assert_eq!(first.status, 201, "{}", String::from_utf8_lossy(&first.body));
                let again = send(submit()).await;
                assert_eq!((again.status, again.replayed(), &again.body), (201, true, &first.body));
                let none = send(s.submit("/by-header", &who, 5, &[], JSON)).await;
                none.assert_problem(400, KEY_MISSING);
                assert_eq!(s.flags.runs(), 1);
            }

            /// The mint endpoint: 201 and `no-store` for a declared scope; 404 for another scope,
            /// 400 for a body without a scope, 401 without a caller, 429 past the quota.
            #[tokio::test]
            async fn the_mint_endpoint_answers_and_refuses() {
                let Some(s) = server().await else { return };
                let who = account();
                let mint = |body: &str| {
                    s.client
                        .post(format!("{}/_idempotency/tokens", s.base))
                        .bearer_auth(&who)
                        .header("content-type", "application/json")
                        .body(body.to_owned())
                };
                let ok = send(mint(&format!("{{\"scope\": \"{FORM_SCOPE}\"}}"))).await;
                assert_eq!(ok.status, 201);
                assert_eq!(ok.header("cache-control"), Some("no-store"));
                let v = ok.json();
                assert_eq!(v["token"].as_str().map(str::len), Some(idempotent_core::issued::TOKEN_LEN));
                assert!(v["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')));
                send(mint("{\"scope\": \"payments.create\"}")).await.assert_problem(404, "urn:idempotent:problem:scope-not-issued");
                send(mint("{}")).await.assert_problem(400, "urn:idempotent:problem:body-unreadable");
                let anonymous = send(
                    s.client.post(format!("{}/_idempotency/tokens", s.base)).body(format!("{{\"scope\": \"{FORM_SCOPE}\"}}")),
                )
                .await;
                anonymous.assert_problem(401, "urn:idempotent:problem:actor-missing");
                // The one above and QUOTA - 1 more fill the caller's share.
                for _ in 1..QUOTA {
                    assert_eq!(send(mint(&format!("{{\"scope\": \"{FORM_SCOPE}\"}}"))).await.status, 201);
                }
                let over = send(mint(&format!("{{\"scope\": \"{FORM_SCOPE}\"}}"))).await;
                over.assert_problem(429, "urn:idempotent:problem:quota-exceeded");
                assert!(over.header("retry-after").is_some());
                // Another caller has its own share.
                assert_eq!(s.form(&account()).await.len(), idempotent_core::issued::TOKEN_LEN);
            }
        }
    };
}

impl Server {
    /// A token for `account` on `scope` from the mint endpoint.
    pub async fn mint(&self, account: &str, scope: &str) -> String {
        let response = self
            .client
            .post(format!("{}/_idempotency/tokens", self.base))
            .bearer_auth(account)
            .json(&serde_json::json!({ "scope": scope }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: serde_json::Value = response.json().await.unwrap();
        body["token"].as_str().expect("a token").to_owned()
    }
}
