//! Parsing of the `Idempotency-Key` header.
//!
//! The IETF draft defines the value as a Structured Fields String (`"abc"`); many clients send a bare
//! token (`abc`). Both are accepted. The key itself must be 1 to 255 visible ASCII characters
//! (`0x21..=0x7E`, plus the space inside a quoted string).

use std::fmt;

/// Longest key accepted, in characters.
pub const MAX_KEY_LEN: usize = 255;

/// Exactly the header values [`IdempotencyKey::from_header_values`] accepts, as an ECMA-262
/// regular expression (the dialect of a JSON Schema `pattern`, which Python and Rust read the
/// same way): optional spaces or tabs around either a bare token of 1 to 255 visible ASCII
/// characters that has no comma and does not start with `"`, or an RFC 8941 string of 1 to 255
/// characters (visible ASCII and spaces, `"` and `\` escaped with `\`).
///
/// A request path that carries a key (the status endpoint) accepts the same values, and commas.
pub const HEADER_PATTERN: &str = concat!(
    r"^[ \t]*(?:",
    r"[\x21\x23-\x2B\x2D-\x7E][\x21-\x2B\x2D-\x7E]{0,254}",
    r#"|"(?:[\x20\x21\x23-\x5B\x5D-\x7E]|\\[\x22\x5C]){1,255}""#,
    r")[ \t]*$",
);

/// A validated idempotency key, as the client sent it (without the sf-String quotes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses one header value, in sf-String form (`"abc"`) or as a bare token (`abc`).
    ///
    /// Returns a [`KeyError`] that says what is wrong with the value.
    pub fn parse(raw: &[u8]) -> Result<Self, KeyError> {
        let raw = trim_ows(raw);
        if raw.is_empty() {
            return Err(KeyError::Empty);
        }
        let inner: Vec<u8> = if raw[0] == b'"' {
            parse_sf_string(raw)?
        } else {
            for &b in raw {
                check_byte(b, false)?;
            }
            raw.to_vec()
        };
        if inner.is_empty() {
            return Err(KeyError::Empty);
        }
        if inner.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: inner.len() });
        }
        // Every byte was checked to be ASCII above, so this cannot fail.
        let key = String::from_utf8(inner).map_err(|_| KeyError::NonAscii)?;
        Ok(Self(key))
    }

    /// Parses every occurrence of the header on a request: zero is `Ok(None)`, one is parsed,
    /// more than one is [`KeyError::Repeated`] (a proxy that merged two requests' headers, or a
    /// client bug, must not pick one of them silently).
    pub fn from_header_values<'a, I>(values: I) -> Result<Option<Self>, KeyError>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        let mut iter = values.into_iter();
        let Some(first) = iter.next() else {
            return Ok(None);
        };
        if iter.next().is_some() {
            return Err(KeyError::Repeated);
        }
        // A comma outside a quoted string means a list: the same header repeated and folded.
        let trimmed = trim_ows(first);
        if trimmed.first() != Some(&b'"') && trimmed.contains(&b',') {
            return Err(KeyError::Repeated);
        }
        Self::parse(first).map(Some)
    }
}

impl IdempotencyKey {
    /// The key of a route whose key is derived from the request (`key = derived`): `derived:` and
    /// its fingerprint in hex.
    pub fn derived(fingerprint: &crate::fingerprint::Fingerprint) -> Self {
        let mut key = String::with_capacity(72);
        key.push_str("derived:");
        crate::push_hex(&mut key, &fingerprint.0);
        Self(key)
    }

    /// The key made of a body's fields (`key = field(..)` or `[field(..), ..]`), in order. One
    /// value of 1 to 255 visible ASCII characters is the key as it is (so an operator finds the
    /// record under the sender's event id); several values, or one that is not such a string, are
    /// encoded without ambiguity (each length-prefixed), and a longer encoding is replaced by its
    /// SHA-256 (`sha256:` and 64 hex digits).
    pub fn from_parts(parts: &[String]) -> Result<Self, KeyError> {
        let visible =
            |s: &str| !s.is_empty() && s.len() <= MAX_KEY_LEN && s.bytes().all(|b| (0x21..=0x7E).contains(&b));
        if let [single] = parts {
            if visible(single) {
                return Ok(Self(single.clone()));
            }
        }
        let mut encoded = String::new();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                encoded.push('|');
            }
            encoded.push_str(&format!("{}:{part}", part.len()));
        }
        if visible(&encoded) {
            return Ok(Self(encoded));
        }
        use sha2::{Digest, Sha256};
        let mut key = String::from("sha256:");
        crate::push_hex(&mut key, &Sha256::digest(encoded.as_bytes()));
        Ok(Self(key))
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a header value is not a valid idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The header is present but empty (or `""`).
    #[error("the idempotency key is empty; send 1 to 255 visible ASCII characters")]
    Empty,
    /// Longer than [`MAX_KEY_LEN`].
    #[error("the idempotency key is {len} characters long; at most 255 are allowed")]
    TooLong {
        /// Length that was sent.
        len: usize,
    },
    /// A byte outside ASCII.
    #[error("the idempotency key contains a non-ASCII character; use visible ASCII only")]
    NonAscii,
    /// A control character (or a space outside a quoted string).
    #[error("the idempotency key contains a control character or space; use visible ASCII only")]
    Control,
    /// A quoted string that does not close, or has bytes after its closing quote, or a bad escape.
    #[error("the idempotency key is not a valid structured-field string: {0}")]
    Malformed(&'static str),
    /// The header appeared more than once.
    #[error("the idempotency key header was sent more than once; send exactly one")]
    Repeated,
    /// A body field the key is made of is absent, null or empty.
    #[error("the body field `{0}`, part of the idempotency key, is missing, null or empty")]
    FieldMissing(String),
}

fn trim_ows(raw: &[u8]) -> &[u8] {
    let start = raw.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(raw.len());
    let end = raw.iter().rposition(|b| *b != b' ' && *b != b'\t').map_or(start, |e| e + 1);
    &raw[start..end]
}

fn check_byte(b: u8, quoted: bool) -> Result<(), KeyError> {
    match b {
        0x80..=0xFF => Err(KeyError::NonAscii),
        b' ' if quoted => Ok(()),
        0x21..=0x7E => Ok(()),
        _ => Err(KeyError::Control),
    }
}

fn parse_sf_string(raw: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 1;
    while i < raw.len() {
        match raw[i] {
            b'\\' => {
                let next = *raw.get(i + 1).ok_or(KeyError::Malformed("dangling backslash"))?;
                if next != b'"' && next != b'\\' {
                    return Err(KeyError::Malformed("only \\\" and \\\\ may be escaped"));
                }
                out.push(next);
                i += 2;
            }
            b'"' => {
                if i + 1 != raw.len() {
                    return Err(KeyError::Malformed("characters after the closing quote"));
                }
                return Ok(out);
            }
            b => {
                check_byte(b, true)?;
                out.push(b);
                i += 1;
            }
        }
    }
    Err(KeyError::Malformed("missing closing quote"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_bare_token_and_sf_string() {
        assert_eq!(IdempotencyKey::parse(b"abc-123").unwrap().as_str(), "abc-123");
        assert_eq!(IdempotencyKey::parse(b"\"abc 123\"").unwrap().as_str(), "abc 123");
        assert_eq!(IdempotencyKey::parse(b"\"a\\\"b\"").unwrap().as_str(), "a\"b");
        assert_eq!(IdempotencyKey::parse(b"  padded\t").unwrap().as_str(), "padded");
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(IdempotencyKey::parse(b""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(b"   "), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::parse(b"\"\""), Err(KeyError::Empty));
    }

    #[test]
    fn length_limit_is_255() {
        let ok = "k".repeat(255);
        assert!(IdempotencyKey::parse(ok.as_bytes()).is_ok());
        let long = "k".repeat(256);
        assert_eq!(IdempotencyKey::parse(long.as_bytes()), Err(KeyError::TooLong { len: 256 }));
    }

    #[test]
    fn rejects_non_ascii_and_control() {
        assert_eq!(IdempotencyKey::parse("clé".as_bytes()), Err(KeyError::NonAscii));
        assert_eq!(IdempotencyKey::parse(b"a\x01b"), Err(KeyError::Control));
        assert_eq!(IdempotencyKey::parse(b"a b"), Err(KeyError::Control));
        assert_eq!(IdempotencyKey::parse(b"a\x7fb"), Err(KeyError::Control));
    }

    #[test]
    fn rejects_malformed_sf_strings() {
        assert!(matches!(IdempotencyKey::parse(b"\"abc"), Err(KeyError::Malformed(_))));
        assert!(matches!(IdempotencyKey::parse(b"\"abc\"x"), Err(KeyError::Malformed(_))));
        assert!(matches!(IdempotencyKey::parse(b"\"a\\nb\""), Err(KeyError::Malformed(_))));
    }

    #[test]
    fn repeated_header_is_an_error() {
        let vals: [&[u8]; 2] = [b"a", b"b"];
        assert_eq!(IdempotencyKey::from_header_values(vals), Err(KeyError::Repeated));
        let folded: [&[u8]; 1] = [b"a, b"];
        assert_eq!(IdempotencyKey::from_header_values(folded), Err(KeyError::Repeated));
        let none: [&[u8]; 0] = [];
        assert_eq!(IdempotencyKey::from_header_values(none), Ok(None));
    }

    fn header(value: &str) -> Result<Option<IdempotencyKey>, KeyError> {
        IdempotencyKey::from_header_values([value.as_bytes()])
    }

    #[test]
    fn the_pattern_describes_exactly_the_accepted_values() {
        let pattern = regex::Regex::new(HEADER_PATTERN).unwrap();
        let max = "k".repeat(255);
        let quoted_max = format!("\"{}\"", "\\\"".repeat(255));
        for ok in ["a", "abc-123", "\"abc 123\"", "\"a,b\"", " \tpadded\t ", "a\"b", &max, &quoted_max, "\"\\\\\""] {
            assert!(header(ok).is_ok(), "{ok}");
            assert!(pattern.is_match(ok), "{ok}");
        }
        let long = "k".repeat(256);
        let quoted_long = format!("\"{}\"", "k".repeat(256));
        for bad in
            ["", " ", "\"\"", "a b", "a,b", "cl\u{e9}", "a\x01", "\"abc", "\"a\"b\"", "\"a\\nb\"", &long, &quoted_long]
        {
            assert!(header(bad).is_err(), "{bad:?}");
            assert!(!pattern.is_match(bad), "{bad:?}");
        }
    }

    #[test]
    fn keys_of_fields_are_unambiguous() {
        let key = |parts: &[&str]| {
            IdempotencyKey::from_parts(&parts.iter().map(|p| p.to_string()).collect::<Vec<_>>()).unwrap().0
        };
        assert_eq!(key(&["evt_123"]), "evt_123", "one visible value is the key itself");
        assert_eq!(key(&["AUTHORISATION", "8535"]), "13:AUTHORISATION|4:8535");
        assert_ne!(key(&["a|1:b"]), key(&["a", "b"]));
        assert_ne!(key(&["ab", "c"]), key(&["a", "bc"]));
        let long = key(&["x".repeat(300).as_str()]);
        assert!(long.starts_with("sha256:") && long.len() == 71, "{long}");
        assert!(key(&["with space"]).starts_with("sha256:"), "not visible ASCII: digested");
        assert_eq!(key(&["with space"]), key(&["with space"]), "stable");
        let fp = crate::fingerprint::Fingerprint([7; 32]);
        assert_eq!(IdempotencyKey::derived(&fp).as_str().len(), 72);
    }

    proptest::proptest! {
        /// Strings made mostly of the characters that matter (quotes, backslashes, commas,
        /// spaces, control and non-ASCII characters): the pattern and the parser agree on each.
        #[test]
        fn the_pattern_agrees_with_the_parser(value in "[\"\\\\, \t\x01\x7fa-c\u{e9}]{0,8}|\"?[!-~]{250,260}\"?") {
            let pattern = regex::Regex::new(HEADER_PATTERN).unwrap();
            proptest::prop_assert_eq!(pattern.is_match(&value), header(&value).is_ok(), "{:?}", value);
        }

        #[test]
        fn visible_ascii_round_trips(key in "[!-~]{1,255}") {
            proptest::prop_assume!(!key.starts_with('"') && !key.contains(','));
            let parsed = IdempotencyKey::parse(key.as_bytes()).unwrap();
            proptest::prop_assert_eq!(parsed.as_str(), key.as_str());
        }
    }
}
