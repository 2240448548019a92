//! Reading a handler's response so it can be stored, without ever sending the client less than
//! the handler produced.

use super::body::ResponseBody;
use super::problem_response;
use crate::engine::Captured;
use crate::problem::{Problem, ProblemKind};
use crate::response::StoredResponse;
use bytes::{Bytes, BytesMut};
use http::Response;
use http_body::Body;
use http_body_util::BodyExt;

/// Reads `response`'s body up to `max` bytes.
///
/// - Under the cap the whole response is stored and sent from memory.
/// - Over the cap (known from the body's exact size, or found while reading) the outcome is
///   recorded without its body, and the client still receives every byte: the part already read
///   followed by the rest of the stream. A retry is told the response was not stored (409); the
///   handler never runs twice.
/// - A body that fails while being read is a final outcome too: the handler ran, so running it
///   again could repeat its effects. The client gets a 500 problem saying so, and exactly that
///   problem is stored and replayed (`failed` is set, so even routes that release 5xx store it).
pub async fn capture<B>(response: Response<B>, max: usize) -> Captured<Response<ResponseBody<B>>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let (parts, mut body) = response.into_parts();
    let headers = parts.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
    let mut record = StoredResponse::new(parts.status.as_u16(), headers, Bytes::new());
    if body.size_hint().exact().is_some_and(|n| n > max as u64) {
        record.body_stored = false;
        return Captured::new(record, Response::from_parts(parts, ResponseBody::Stream { head: None, rest: body }));
    }
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                let Ok(data) = frame.into_data() else { continue };
                buf.extend_from_slice(&data);
                if buf.len() > max {
                    record.body_stored = false;
                    let live = ResponseBody::Stream { head: Some(buf.freeze()), rest: body };
                    return Captured::new(record, Response::from_parts(parts, live));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, status = parts.status.as_u16(), "response body failed after the handler ran");
                return failed(&e);
            }
        }
    }
    record.body = buf.freeze();
    let live = ResponseBody::full(record.body.clone());
    Captured::new(record, Response::from_parts(parts, live))
}

/// The final outcome of a handler whose response could not be produced (its body errored or
/// panicked after the handler ran): the client gets a 500 problem saying so, and exactly that
/// is stored and replayed (`failed` is set, so even routes that release 5xx store it).
pub fn failed<B>(error: &dyn std::fmt::Display) -> Captured<Response<ResponseBody<B>>> {
    tracing::error!(%error, "the handler ran but its response failed; storing that as its outcome");
    let problem = Problem::new(
        ProblemKind::ResponseFailed,
        "The operation ran, but its response failed while being produced. It will not run again for this \
         key: retrying replays this answer. Check the resource's state before starting a new operation.",
    );
    let sent = problem_response(&problem);
    let headers = sent.headers().iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
    let record = StoredResponse::new(sent.status().as_u16(), headers, sent.body().clone());
    Captured { record, live: sent.map(ResponseBody::full), failed: true }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    async fn collect<B: Body<Data = Bytes> + Unpin>(r: Response<ResponseBody<B>>) -> Bytes
    where
        B::Error: std::fmt::Debug,
    {
        r.into_body().collect().await.unwrap().to_bytes()
    }

    #[test]
    fn a_body_under_the_cap_is_stored_and_sent_whole() {
        block_on(async {
            let c = capture(Response::new(Full::new(Bytes::from_static(b"hello"))), 10).await;
            assert!(c.record.body_stored && !c.failed);
            assert_eq!(c.record.body, "hello");
            assert_eq!(collect(c.live).await, "hello");
        });
    }

    #[test]
    fn a_sized_body_over_the_cap_passes_through_unread() {
        block_on(async {
            let c = capture(Response::new(Full::new(Bytes::from(vec![7u8; 100]))), 10).await;
            assert!(!c.record.body_stored);
            assert!(matches!(c.live.body(), ResponseBody::Stream { head: None, .. }), "passed on unread");
            assert_eq!(collect(c.live).await.len(), 100);
        });
    }

    #[test]
    fn a_stream_over_the_cap_is_resent_from_the_part_read() {
        block_on(async {
            let chunks =
                (0..10).map(|i| Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![i; 4]))));
            let body = StreamBody::new(futures_util::stream::iter(chunks));
            let c = capture(Response::new(body), 10).await;
            assert!(!c.record.body_stored);
            let all = collect(c.live).await;
            assert_eq!(all.len(), 40);
            assert_eq!(&all[..8], &[0, 0, 0, 0, 1, 1, 1, 1]);
        });
    }

    #[test]
    fn a_body_that_fails_is_a_stored_final_outcome() {
        block_on(async {
            let chunks: Vec<Result<http_body::Frame<Bytes>, &str>> =
                vec![Ok(http_body::Frame::data(Bytes::from_static(b"part"))), Err("connection to upstream lost")];
            let body = StreamBody::new(futures_util::stream::iter(chunks));
            let c = capture(Response::new(body), 1000).await;
            assert!(c.failed);
            assert_eq!(c.record.status, 500);
            assert!(c.record.body_stored);
            let sent = collect(c.live).await;
            assert_eq!(sent, c.record.body, "what is stored is what the client got");
            assert!(String::from_utf8_lossy(&sent).contains("response-failed"));
        });
    }
}
