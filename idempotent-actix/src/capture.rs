//! Capturing a handler's response so it can be stored, and rebuilding stored ones.

use actix_web::body::{BodySize, BodyStream, BoxBody, MessageBody};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use idempotent_core::engine::{Captured, REPLAYED_HEADER};
use idempotent_core::problem::{Problem, ProblemKind, CONTENT_TYPE};
use idempotent_core::response::StoredResponse;
use std::pin::Pin;

/// Reads `response`'s body up to `max` bytes. Under the cap the whole response is stored; over it
/// the outcome is recorded without its body and the client still receives every byte: a body of
/// known size over the cap is passed through untouched, a stream is re-sent as the part already
/// read followed by the rest of the stream.
pub(crate) async fn capture(response: HttpResponse, max: usize) -> Captured<HttpResponse> {
    let status = response.status().as_u16();
    let headers = response.headers().iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
    let mut record = StoredResponse::new(status, headers, Bytes::new());
    let (head, mut body) = response.into_parts();
    if matches!(body.size(), BodySize::Sized(n) if n > max as u64) {
        record.body_stored = false;
        return Captured { record, live: head.set_body(body) };
    }
    let mut buf = BytesMut::new();
    loop {
        match futures_util::future::poll_fn(|cx| Pin::new(&mut body).poll_next(cx)).await {
            None => break,
            Some(Ok(chunk)) => {
                buf.extend_from_slice(&chunk);
                if buf.len() > max {
                    record.body_stored = false;
                    let prefix = futures_util::stream::once(std::future::ready(Ok(buf.freeze())));
                    let rest = futures_util::stream::poll_fn(move |cx| Pin::new(&mut body).poll_next(cx));
                    let live = head.set_body(BoxBody::new(BodyStream::new(prefix.chain(rest))));
                    return Captured { record, live };
                }
            }
            Some(Err(e)) => {
                // The body failed half-way: the client cannot have received a complete response,
                // so this is not a final outcome; a 500 releases the claim.
                tracing::error!(error = %e, "response body failed while being captured");
                let problem = Problem::new(
                    ProblemKind::HandlerPanicked,
                    "The response could not be produced; nothing was stored. Retry with the same key.",
                );
                let live = problem_response(&problem);
                return Captured { record: StoredResponse::new(500, Vec::<(&str, &str)>::new(), Bytes::new()), live };
            }
        }
    }
    record.body = buf.freeze();
    let live = head.set_body(BoxBody::new(record.body.clone()));
    Captured { record, live }
}

/// Rebuilds a stored response for a retry, marked `Idempotent-Replayed: true`.
pub(crate) fn replay_response(stored: StoredResponse) -> HttpResponse {
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status).body(stored.body);
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(&value)) {
            headers.append(n, v);
        }
    }
    headers.insert(HeaderName::from_static(REPLAYED_HEADER), HeaderValue::from_static("true"));
    response
}

/// An `application/problem+json` response, with `Retry-After` when the problem has one.
pub(crate) fn problem_response(problem: &Problem) -> HttpResponse {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status).body(problem.to_json());
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    if let Some(secs) = problem.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
