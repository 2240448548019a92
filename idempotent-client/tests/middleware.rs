//! The middleware against a scripted HTTP server on a loopback port (see `common`).

mod common;

use common::{client, created, pay, problem, quick, response, Reply, Server};
use idempotent_client::retry::IN_PROGRESS_PROBLEM;
use idempotent_client::{AttemptError, Error, IdempotencyMiddleware, Outcome};
use reqwest::Method;
use reqwest_middleware::ClientBuilder;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_fresh_uuid_v7_key_is_kept_for_every_attempt_of_one_operation() {
    let busy = problem(503, "about:blank", Some("0"), None);
    let server = Server::start(vec![Reply::Close, Reply::Reset, busy, created(false)]).await;
    let c = client(quick().build());
    let r = pay(&c, &server).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.url().as_str(), server.url("/payments"), "the buffered response keeps its URL");
    assert_eq!(r.headers()["content-type"], "application/json");
    let outcome = Outcome::of(&r).unwrap().clone();
    assert_eq!((outcome.attempts(), outcome.replayed()), (4, false));
    assert_eq!(r.text().await.unwrap(), r#"{"id":"pay_1"}"#);
    let seen = server.seen();
    assert_eq!(seen.len(), 4);
    let key = seen[0].key.clone().expect("a key on the first attempt");
    assert!(seen.iter().all(|s| s.key.as_deref() == Some(key.as_str())), "{seen:?}");
    assert!(seen.iter().all(|s| s.method == "POST" && s.body == br#"{"amount":1000}"#));
    assert_eq!(uuid::Uuid::parse_str(&key).unwrap().get_version_num(), 7);
    assert_eq!(outcome.key(), key);
    assert!(!format!("{outcome:?}").contains(&key), "Debug hides the key: {outcome:?}");

    // The next operation gets a key of its own.
    let server2 = Server::start(vec![created(false)]).await;
    pay(&c, &server2).send().await.unwrap();
    assert_ne!(server2.seen()[0].key.as_deref(), Some(key.as_str()));
}

#[tokio::test]
async fn the_callers_key_is_used_as_it_is() {
    let server = Server::start(vec![Reply::Close, created(true)]).await;
    let c = client(quick().build());
    let r = pay(&c, &server).header("Idempotency-Key", "order-42").send().await.unwrap();
    let outcome = Outcome::of(&r).unwrap();
    assert_eq!((r.status().as_u16(), outcome.attempts(), outcome.replayed()), (201, 2, true));
    assert_eq!(outcome.key(), "order-42");
    let keys: Vec<Option<String>> = server.seen().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, [Some("order-42".to_owned()), Some("order-42".to_owned())]);
}

#[tokio::test]
async fn final_answers_are_returned_after_exactly_one_attempt() {
    let finals = [
        response(400, &[], "bad"),
        problem(422, "urn:idempotent:problem:key-reused", Some("1"), None),
        problem(422, "urn:payments-demo:problem:validation", None, None),
        problem(409, "urn:idempotent:problem:response-not-stored", Some("1"), None),
        response(409, &[("retry-after", "1")], "conflict"),
        response(500, &[], "boom"),
        response(502, &[], "bad gateway"),
        response(404, &[], "nope"),
    ];
    let c = client(quick().build());
    for reply in finals {
        let server = Server::start(vec![reply, created(false)]).await;
        let r = pay(&c, &server).send().await.unwrap();
        let status = r.status();
        assert_ne!(status, 201);
        assert_eq!(Outcome::of(&r).unwrap().attempts(), 1, "{status}");
        assert_eq!(server.seen().len(), 1, "{status} was sent once");
    }
}

#[tokio::test]
async fn in_progress_waits_the_retry_after_of_the_header_or_of_the_problem_body() {
    for (busy, source) in [
        (problem(409, IN_PROGRESS_PROBLEM, Some("1"), None), "header"),
        (problem(409, IN_PROGRESS_PROBLEM, None, Some(1)), "problem body"),
    ] {
        let server = Server::start(vec![busy, created(true)]).await;
        let c = client(quick().build());
        let started = Instant::now();
        let r = pay(&c, &server).send().await.unwrap();
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(1), "{source}: waited only {waited:?}");
        assert!(waited < Duration::from_secs(3), "{source}: {waited:?}");
        let outcome = Outcome::of(&r).unwrap();
        assert_eq!((r.status().as_u16(), outcome.attempts(), outcome.replayed()), (201, 2, true), "{source}");
    }
}

#[tokio::test]
async fn throttling_and_unavailability_are_retried_until_the_attempts_run_out() {
    for status in [429, 503] {
        let server = Server::start(vec![response(status, &[], "later")]).await;
        let c = client(quick().max_attempts(3).build());
        let r = pay(&c, &server).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "the last answer is returned as it is");
        assert_eq!(Outcome::of(&r).unwrap().attempts(), 3);
        assert_eq!(r.text().await.unwrap(), "later");
        assert_eq!(server.seen().len(), 3);
    }
}

#[tokio::test]
async fn a_wait_beyond_the_time_budget_gives_up_at_once() {
    let server = Server::start(vec![problem(503, "about:blank", Some("5"), None), created(false)]).await;
    let c = client(quick().max_elapsed(Duration::from_secs(2)).build());
    let started = Instant::now();
    let r = pay(&c, &server).send().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!((r.status().as_u16(), Outcome::of(&r).unwrap().attempts()), (503, 1));
}

#[tokio::test]
async fn a_response_body_cut_mid_flight_is_retried() {
    let head = "HTTP/1.1 201 Created\r\ncontent-length: 100\r\ncontent-type: application/json\r\n\r\n".to_owned();
    let server = Server::start(vec![Reply::Cut(head), created(true)]).await;
    let c = client(quick().build());
    let r = pay(&c, &server).send().await.unwrap();
    let outcome = Outcome::of(&r).unwrap();
    assert_eq!((outcome.attempts(), outcome.replayed()), (2, true));
    assert_eq!(r.text().await.unwrap(), r#"{"id":"pay_1"}"#);
}

#[tokio::test]
async fn a_silent_attempt_times_out_and_is_retried() {
    let server = Server::start(vec![Reply::Hang, created(true)]).await;
    let c = client(quick().attempt_timeout(Some(Duration::from_millis(300))).build());
    let r = pay(&c, &server).send().await.unwrap();
    assert_eq!(Outcome::of(&r).unwrap().attempts(), 2);
    // The reqwest client's own timeout counts the same.
    let server = Server::start(vec![Reply::Hang, created(true)]).await;
    let inner = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let c = ClientBuilder::new(inner).with(quick().attempt_timeout(None).build()).build();
    let r = pay(&c, &server).send().await.unwrap();
    assert_eq!(Outcome::of(&r).unwrap().attempts(), 2);
}

#[tokio::test]
async fn no_response_at_all_gives_up_with_the_attempt_count_and_the_cause() {
    let server = Server::start(vec![Reply::Close]).await;
    let c = client(quick().max_attempts(3).build());
    let err = pay(&c, &server).send().await.unwrap_err();
    match Error::of(&err) {
        Some(Error::GaveUp { attempts: 3, source: AttemptError::Transport(e), .. }) => {
            assert!(e.is_request(), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("gave up after 3 attempt(s)"), "{err}");
    assert_eq!(server.seen().len(), 3);

    // A port nobody listens on: connection refused each time.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let err = c.post(format!("http://{closed}/payments")).body("{}").send().await.unwrap_err();
    assert!(matches!(Error::of(&err), Some(Error::GaveUp { attempts: 3, .. })), "{err:?}");

    let server = Server::start(vec![Reply::Hang]).await;
    let c = client(quick().max_attempts(2).attempt_timeout(Some(Duration::from_millis(100))).build());
    let err = pay(&c, &server).send().await.unwrap_err();
    assert!(matches!(Error::of(&err), Some(Error::GaveUp { attempts: 2, source: AttemptError::TimedOut(_), .. })));
}

#[tokio::test]
async fn a_streaming_body_is_refused_before_anything_is_sent() {
    let server = Server::start(vec![created(false)]).await;
    let c = client(quick().build());
    let err = c.post(server.url("/uploads")).body(reqwest::Body::wrap(String::from("chunk"))).send().await.unwrap_err();
    match Error::of(&err) {
        Some(e @ Error::NonReplayableBody { method, url }) => {
            assert_eq!((method, url.as_str()), (&Method::POST, server.url("/uploads").as_str()));
            assert!(e.to_string().contains("stream"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn unprotected_methods_pass_through_and_put_delete_can_be_protected() {
    let server = Server::start(vec![response(503, &[], "later")]).await;
    let c = client(quick().build());
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let r = c.request(method.clone(), server.url("/things/1")).send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert!(Outcome::of(&r).is_none(), "{method}");
    }
    assert_eq!(server.seen().len(), 3, "one try each");
    assert!(server.seen().iter().all(|s| s.key.is_none()));

    let server = Server::start(vec![Reply::Close, created(false)]).await;
    let c = client(quick().protect(Method::PUT).protect(Method::DELETE).build());
    let r = c.put(server.url("/things/1")).body("{}").send().await.unwrap();
    assert_eq!(Outcome::of(&r).unwrap().attempts(), 2);
    let seen = server.seen();
    assert!(seen[0].key.is_some() && seen[0].key == seen[1].key);
    // PATCH is protected by default.
    let server = Server::start(vec![created(false)]).await;
    let r = client(quick().build()).patch(server.url("/things/1")).body("{}").send().await.unwrap();
    assert!(Outcome::of(&r).is_some());
    assert!(server.seen()[0].key.is_some());
}

#[tokio::test]
async fn another_header_name_can_carry_the_key() {
    let server = Server::start(vec![created(false)]).await;
    let name = reqwest::header::HeaderName::from_static("x-request-key");
    let r = client(quick().header_name(name).build()).post(server.url("/p")).body("{}").send().await.unwrap();
    assert!(Outcome::of(&r).is_some());
    assert_eq!(server.seen()[0].key, None, "not under Idempotency-Key");
}

/// `error`, its causes and its `Debug`, all of what a log could show of it.
fn everything_shown(error: &reqwest_middleware::Error) -> String {
    let mut shown = format!("{error} {error:?}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        shown.push_str(&format!(" | {cause} {cause:?}"));
        source = cause.source();
    }
    shown
}

/// The give-up error's cause (reqwest's error) displayed the request's whole URL: credentials and
/// query included.
#[tokio::test]
async fn errors_show_the_url_without_credentials_query_or_fragment() {
    let secrets = ["alice", "s3cr3t", "t0ken", "fr4g"];
    let c = client(quick().max_attempts(2).build());

    // Given up: nobody listens on the port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let err =
        c.post(format!("http://alice:s3cr3t@{closed}/payments?token=t0ken#fr4g")).body("{}").send().await.unwrap_err();
    let Some(Error::GaveUp { method, url, attempts: 2, .. }) = Error::of(&err) else { panic!("{err:?}") };
    assert_eq!((method, url.as_str()), (&Method::POST, format!("http://{closed}/payments").as_str()));
    let shown = everything_shown(&err);
    assert!(shown.contains(&format!("POST http://{closed}/payments: gave up after 2 attempt(s)")), "{shown}");
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }

    // Returned as it is: a redirect loop, which sending again cannot fix.
    let server = Server::start(vec![response(302, &[("location", "/payments?token=t0ken#fr4g")], "")]).await;
    let url = format!("http://alice:s3cr3t@{}/payments?token=t0ken#fr4g", server.addr);
    let err = c.post(url).body("{}").send().await.unwrap_err();
    assert!(matches!(&err, reqwest_middleware::Error::Reqwest(e) if e.is_redirect()), "{err:?}");
    let shown = everything_shown(&err);
    assert!(shown.contains(&server.url("/payments")), "{shown}");
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
}

/// The whole body was buffered whatever its size: a server could make each operation allocate
/// as much as it sent.
#[tokio::test]
async fn a_response_body_over_the_limit_is_refused_and_not_sent_again() {
    assert_eq!(IdempotencyMiddleware::new().max_response_body(), 16 * 1024 * 1024);
    assert_eq!(idempotent_client::DEFAULT_MAX_RESPONSE_BODY, 16 * 1024 * 1024);
    let c = client(quick().max_response_body(1024).build());

    // Exactly the limit is read.
    let server = Server::start(vec![response(201, &[], &"x".repeat(1024))]).await;
    let r = pay(&c, &server).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 1024);

    // Longer, by its Content-Length, or while reading a chunked body that has none.
    let chunk = "x".repeat(1000);
    let chunked = format!(
        "HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         3e8\r\n{chunk}\r\n3e8\r\n{chunk}\r\n0\r\n\r\n"
    );
    for (what, reply) in [("content-length", response(201, &[], &"x".repeat(1025))), ("chunked", Reply::Send(chunked))]
    {
        let server = Server::start(vec![reply, created(false)]).await;
        let err = c.post(server.url("/payments?token=t0ken")).json(&serde_json::json!({})).send().await.unwrap_err();
        match Error::of(&err) {
            Some(Error::ResponseTooLarge { method, url, status, limit: 1024 }) => {
                assert_eq!(
                    (method, url.as_str(), status.as_u16()),
                    (&Method::POST, server.url("/payments").as_str(), 201)
                );
            }
            other => panic!("{what}: {other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains("longer than 1024 bytes") && message.contains("max_response_body"), "{message}");
        assert!(!message.contains("t0ken"), "{message}");
        assert_eq!(server.seen().len(), 1, "{what}: the operation was answered; it is not sent again");
    }
}
