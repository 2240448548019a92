//! Captured responses: what is stored and replayed.
//!
//! Headers are filtered on capture:
//! - hop-by-hop headers (`Connection`, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`,
//!   `Transfer-Encoding`, `Upgrade`) describe one connection, not the response, and are dropped;
//! - `Content-Length` is dropped and recomputed from the stored body on replay;
//! - `Date` is dropped so the server stamps the replay with the time it is sent;
//! - `Set-Cookie` is dropped: a cookie minted for one response (a session, a CSRF token) must not
//!   be handed out again to whoever retries with the key.
//!
//! Everything else (content type, `Location`, custom headers) is replayed byte for byte, in order.

use bytes::Bytes;

/// Headers never stored (compared in lowercase).
pub const DROPPED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "date",
    "set-cookie",
];

/// Whether a header (name in any case) is stored.
pub fn is_stored_header(name: &str) -> bool {
    !DROPPED_HEADERS.iter().any(|d| d.eq_ignore_ascii_case(name))
}

/// A response as stored by a [`Store`](crate::store::Store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Stored headers, names in lowercase, in their original order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body; empty when [`body_stored`](Self::body_stored) is false.
    pub body: Bytes,
    /// False when the body was over the size cap: the outcome is recorded (the handler never runs
    /// again for this key) but cannot be replayed.
    pub body_stored: bool,
}

impl StoredResponse {
    /// A response from status, headers and body; drops the headers that are never stored.
    pub fn new<N: AsRef<str>, V: AsRef<[u8]>>(
        status: u16,
        headers: impl IntoIterator<Item = (N, V)>,
        body: Bytes,
    ) -> Self {
        let headers = headers
            .into_iter()
            .filter(|(n, _)| is_stored_header(n.as_ref()))
            .map(|(n, v)| (n.as_ref().to_ascii_lowercase(), v.as_ref().to_vec()))
            .collect();
        Self { status, headers, body, body_stored: true }
    }

    /// Approximate size in bytes, used for memory bounds and size caps.
    pub fn size(&self) -> usize {
        self.body.len() + self.headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>() + 16
    }

    /// Encodes the response in the compact, versioned binary form stores keep.
    ///
    /// Layout: `b'R'`, version `1`, flags (bit 0: body stored), status (u16 BE), header count
    /// (u16 BE), each header as name length (u16 BE), name, value length (u32 BE), value, then the
    /// body length (u32 BE) and the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size() + 16);
        out.extend_from_slice(&[b'R', 1, u8::from(self.body_stored)]);
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&(self.headers.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for (n, v) in self.headers.iter().take(u16::MAX as usize) {
            out.extend_from_slice(&(n.len() as u16).to_be_bytes());
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
        out.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes [`encode`](Self::encode)'s output; any other bytes are a [`DecodeError`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        if r.take(2)? != [b'R', 1] {
            return Err(DecodeError("unknown record tag or version"));
        }
        let flags = r.take(1)?[0];
        let status = r.u16()?;
        if !(100..=999).contains(&status) {
            return Err(DecodeError("status out of range"));
        }
        let count = r.u16()?;
        let mut headers = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let n = r.u16()? as usize;
            let name = std::str::from_utf8(r.take(n)?).map_err(|_| DecodeError("header name is not UTF-8"))?.to_owned();
            let v = r.u32()? as usize;
            headers.push((name, r.take(v)?.to_vec()));
        }
        let len = r.u32()? as usize;
        let body = Bytes::copy_from_slice(r.take(len)?);
        if !r.0.is_empty() {
            return Err(DecodeError("trailing bytes after the body"));
        }
        Ok(Self { status, headers, body, body_stored: flags & 1 == 1 })
    }
}

/// Bytes that are not a stored response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt stored response: {0}")]
pub struct DecodeError(pub &'static str);

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_headers_on_capture() {
        let r = StoredResponse::new(
            201,
            [
                ("Content-Type", "application/json"),
                ("Set-Cookie", "s=1"),
                ("Date", "x"),
                ("Location", "/p/1"),
                ("Transfer-Encoding", "chunked"),
            ],
            Bytes::from_static(b"{}"),
        );
        let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "location"]);
    }

    #[test]
    fn encoding_round_trips() {
        let r =
            StoredResponse::new(201, [("x-a", &b"\x00\xff"[..]), ("location", b"/p/1")], Bytes::from_static(b"hello"));
        assert_eq!(StoredResponse::decode(&r.encode()).unwrap(), r);
        let mut big = r.clone();
        big.body_stored = false;
        big.body = Bytes::new();
        assert_eq!(StoredResponse::decode(&big.encode()).unwrap(), big);
    }

    #[test]
    fn corrupt_bytes_are_an_error_not_a_panic() {
        let enc = StoredResponse::new(200, [("a", "b")], Bytes::from_static(b"xyz")).encode();
        for cut in 0..enc.len() {
            assert!(StoredResponse::decode(&enc[..cut]).is_err());
        }
        assert!(StoredResponse::decode(b"garbage").is_err());
        let mut extra = enc.clone();
        extra.push(0);
        assert!(StoredResponse::decode(&extra).is_err());
    }
}
