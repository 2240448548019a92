//! Capturing a handler's response so it can be stored, and rebuilding stored ones.

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderName, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use idempotent_core::engine::{Captured, REPLAYED_HEADER};
use idempotent_core::problem::{Problem, CONTENT_TYPE};
use idempotent_core::response::StoredResponse;

/// Reads `response`'s body up to `max` bytes. Under the cap the whole response is stored; over it
/// the outcome is recorded without its body and the client still receives every byte (the part
/// already read followed by the rest of the stream).
pub(crate) async fn capture(response: Response, max: usize) -> Captured<Response> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status.as_u16();
    let headers: Vec<(&str, &[u8])> = parts.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
    let mut record = StoredResponse::new(status, headers, Bytes::new());
    let mut buf = BytesMut::new();
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() > max {
                        record.body_stored = false;
                        let head = futures_util::stream::once(async move { Ok::<Bytes, axum::Error>(buf.freeze()) });
                        let live = Response::from_parts(parts, Body::from_stream(head.chain(body.into_data_stream())));
                        return Captured { record, live };
                    }
                }
            }
            Some(Err(e)) => {
                // The body failed half-way: the client cannot have received a complete response,
                // so this is not a final outcome; a 500 releases the claim.
                tracing::error!(error = %e, "response body failed while being captured");
                let problem = Problem::new(
                    idempotent_core::problem::ProblemKind::HandlerPanicked,
                    "The response could not be produced; nothing was stored. Retry with the same key.",
                );
                let live = problem_response(&problem);
                return Captured { record: StoredResponse::new(500, Vec::<(&str, &str)>::new(), Bytes::new()), live };
            }
        }
    }
    record.body = buf.freeze();
    let live = Response::from_parts(parts, Body::from(record.body.clone()));
    Captured { record, live }
}

/// Rebuilds a stored response for a retry, marked `Idempotent-Replayed: true`.
pub(crate) fn replay_response(stored: StoredResponse) -> Response {
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
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
pub(crate) fn problem_response(problem: &Problem) -> Response {
    let mut response = Response::new(Body::from(problem.to_json()));
    *response.status_mut() = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    if let Some(secs) = problem.retry_after {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
