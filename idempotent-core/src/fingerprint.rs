//! Request fingerprints.
//!
//! A fingerprint is SHA-256 over a canonical, versioned encoding of a request's whole identity as
//! the route's policy sees it: its scope, method, path parameters, query,
//! declared fields or body, and the parts the policy deliberately leaves out. Every part is
//! canonicalised first (object keys sorted, no whitespace, one spelling per number, query and form
//! pairs sorted, set elements sorted), so what a client may vary without changing the meaning of
//! its request never changes a fingerprint, while any change to a part that is fingerprinted does.
//!
//! # Encoding (`idempotent-fingerprint/v2`)
//!
//! `put(x)` is the length of the bytes `x` as a u64, big-endian (8 bytes), followed by `x`. The
//! encoding is
//!
//! ```text
//! put("idempotent-fingerprint/v2") put(scope) part* ...
//! part(tag, item*) = put(tag) put( put(item1) put(item2) ... )
//! ```
//!
//! so every part is its tag followed by one length-prefixed payload, and the payload is a
//! sequence of length-prefixed items. Parts appear in the order the builder's methods are called
//! (a route must always call them in the same order). Strings are their UTF-8 bytes. The parts:
//!
//! | method | tag | items |
//! | --- | --- | --- |
//! | [`method`](FingerprintBuilder::method) | `method` | the method, ASCII-uppercased |
//! | [`path`](FingerprintBuilder::path) | `path` | per parameter (in route order) its name and its value |
//! | [`path_params`](FingerprintBuilder::path_params) | `path-params` | as `path` |
//! | [`query`](FingerprintBuilder::query) | `query` | per decoded pair, sorted by name bytes (stably: the values of a repeated name keep their order): its name and its value |
//! | [`query_params`](FingerprintBuilder::query_params) | `query-params` | first one item that is itself `put(name)` per selected name (sorted bytewise, duplicates once), then the selected pairs as for `query` |
//! | [`field`](FingerprintBuilder::field) | `field` | the field's name, its canonical JSON |
//! | [`set_field`](FingerprintBuilder::set_field) | `field-set` | the field's name, then each element's canonical JSON, sorted bytewise, duplicates once |
//! | [`body`](FingerprintBuilder::body) | `body` | the canonical JSON of the deserialized body |
//! | [`raw_body`](FingerprintBuilder::raw_body), empty body | `body-empty` | none (whatever the content type) |
//! | [`raw_body`](FingerprintBuilder::raw_body), JSON | `body-json` | the body's canonical JSON |
//! | [`raw_body`](FingerprintBuilder::raw_body), form | `body-form` | the decoded pairs, as for `query` |
//! | [`raw_body`](FingerprintBuilder::raw_body), other | `body-bytes` | the body's bytes |
//! | [`omitted`](FingerprintBuilder::omitted) | `omitted` | the name of the part left out (`path`, `query`, `body`) |
//!
//! A part with no items has an empty payload, so it is encoded as `put(tag)` followed by eight
//! zero bytes. Because the length of every part and every item is spelled out, no two different
//! sequences of parts share an encoding, and the version tag keeps this encoding apart from any
//! earlier or later one.
//!
//! ## Query strings and form bodies
//!
//! Both are `application/x-www-form-urlencoded`: split on `&` (empty pieces skipped), each piece
//! split at its first `=` (a piece without `=` is a name with an empty value), `+` read as a
//! space, then percent-decoded. This is exactly what the `form_urlencoded` crate (the parser of
//! the `url` crate) does, except that names and values are kept as the decoded *bytes*:
//! `form_urlencoded` replaces bytes that are not UTF-8 with U+FFFD, which would make `a=%FF` and
//! `a=%FE` one fingerprint. The pairs are then sorted by name, stably, so `b=2&a=1` equals `a=1&b=2` while `a=1&a=2`
//! differs from `a=2&a=1` (a handler reading a list sees the order), and `a=%20`
//! equals `a=+`. Repeated names are all kept (`a=1&a=2` differs from `a=1`). An absent query and
//! an empty one are the same: no pairs.
//!
//! ## Raw bodies
//!
//! The content type's media type (before any `;` parameter, trimmed, case-insensitive) picks the
//! canonical form: `application/json` or any `application/*+json` whose bytes parse as JSON is
//! canonical JSON (a repeated object key keeps its last value, as when serde_json deserializes the
//! body for the handler); `application/x-www-form-urlencoded` is its sorted pairs; anything else,
//! and JSON that does not parse, is the bytes as they are.
//!
//! ## Canonical JSON
//!
//! [`canonical_json`] follows RFC 8785 (JSON Canonicalization Scheme): no whitespace, object keys
//! sorted by their UTF-16 code units, strings escaped only where JSON requires it (`"`, `\` and
//! the control characters, as `\b \t \n \f \r` or `\u00xx` in lowercase hex; neither `/` nor
//! non-ASCII characters are escaped), and numbers printed as ECMAScript's
//! `Number.prototype.toString` prints them (`1e3` and `1000.0` are `1000`, `1e21` is `1e+21`,
//! `1e-7` is `1e-7`, `-0` is `0`).
//!
//! Numbers in JSON text are read as the nearest double: this crate enables serde_json's
//! `float_roundtrip` feature, without which serde_json may read a number one unit in the last place
//! off depending on how it is spelled (`333333333.33333329` and `333333333.3333333` are one
//! double, RFC 8785's own example), and whether another crate in the build enabled the feature
//! would change fingerprints.
//!
//! One deliberate deviation from RFC 8785, which reads every number as an IEEE 754 double: an
//! integer that serde_json holds exactly (as an `i64` or `u64`) is printed as its exact decimal,
//! so amounts above 2^53 never collapse into one another (RFC 8785 would print both
//! `9007199254740993` and `9007199254740992` as `9007199254740992`). For the same reason a double
//! with an integral value in the `i64` or `u64` range prints the exact decimal of that integer
//! (2^60 as a double is `1152921504606846976`, where ECMAScript prints `1152921504606847000`), so
//! `1e3` and `1000` stay one fingerprint.
//!
//! A body's numbers are read from its text, so one written with more precision than a double
//! carries keeps its exact value (`12345678901234567891.25` and `...26` are one double, and two
//! fingerprints): see [`canonical_json_text`]. Typed fields (`fields = [..]`) are whatever the
//! application's types serialize to.

mod json_text;

use percent_encoding::percent_decode;
use serde::Serialize;
use serde_json::{Number, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fmt::{self, Write as _};

const VERSION_TAG: &[u8] = b"idempotent-fingerprint/v2";

/// SHA-256 of a request's canonical encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The digest as lowercase hex.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Error raised when a declared part of a request cannot be fingerprinted: a field that does not
/// serialize to JSON, or a declared path parameter the route does not have.
#[derive(Debug, thiserror::Error)]
#[error("`{field}` cannot be fingerprinted: {reason}")]
pub struct FingerprintError {
    /// The declared field path, or `path(name)`.
    pub field: String,
    /// Why.
    pub reason: String,
}

impl FingerprintError {
    fn json(field: &str, source: serde_json::Error) -> Self {
        Self { field: field.to_owned(), reason: source.to_string() }
    }

    /// A declared part the request does not have.
    pub fn missing(field: impl Into<String>) -> Self {
        Self { field: field.into(), reason: "the matched route has no such parameter".to_owned() }
    }
}

/// Builds a fingerprint incrementally: the scope first, then each part of the request in the
/// route's fixed order (see the [module docs](self) for the encoding of each part).
pub struct FingerprintBuilder {
    hasher: Sha256,
}

impl FingerprintBuilder {
    /// Starts a fingerprint for `scope`.
    pub fn new(scope: &str) -> Self {
        let mut hasher = Sha256::new();
        put(&mut hasher, VERSION_TAG);
        put(&mut hasher, scope.as_bytes());
        Self { hasher }
    }

    /// Adds the request's method, ASCII-uppercased (tag `method`).
    pub fn method(mut self, method: &str) -> Self {
        // Methods arrive uppercase almost always: no copy then.
        let upper = if method.bytes().any(|b| b.is_ascii_lowercase()) {
            std::borrow::Cow::Owned(method.to_ascii_uppercase())
        } else {
            std::borrow::Cow::Borrowed(method)
        };
        self.part(b"method", &[upper.as_bytes()]);
        self
    }

    /// Adds every path parameter of the route (`id` of `/payments/{id}/refunds`): names and
    /// values, in route order (tag `path`).
    ///
    /// The route template itself is not part of the identity: the scope already names the
    /// handler, and the prefix a router mounts it under (`/v1`) does not change what it does, so
    /// one key sent to `/payments/{id}` and to `/v1/payments/{id}` is one operation.
    pub fn path(mut self, params: &[(&str, &str)]) -> Self {
        self.path_part(b"path", params);
        self
    }

    /// Adds only the path parameters the route declares (`fields = [path(id)]`), in declaration
    /// order (tag `path-params`); the caller passes only those.
    pub fn path_params(mut self, params: &[(&str, &str)]) -> Self {
        self.path_part(b"path-params", params);
        self
    }

    /// Adds the whole query string, canonicalised: its decoded pairs sorted by name bytes, stably,
    /// so the values of one repeated name keep their order (tag `query`). `raw` is the query
    /// without its `?`; `None` and `Some("")` are the same.
    pub fn query(mut self, raw: Option<&str>) -> Self {
        let pairs = form_pairs(raw.unwrap_or("").as_bytes());
        let items = pair_items(&pairs);
        self.part(b"query", &items);
        self
    }

    /// Adds only the query pairs whose (decoded) name is one of `names`, sorted like
    /// [`query`](Self::query), preceded by the selected names themselves (tag `query-params`), so
    /// selecting `[a]` differs from selecting `[a, b]` even when `b` is absent. The order of
    /// `names` does not matter.
    pub fn query_params(mut self, raw: Option<&str>, names: &[&str]) -> Self {
        let mut selected: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
        selected.sort_unstable();
        selected.dedup();
        let mut names_item = Vec::new();
        for name in &selected {
            put_into(&mut names_item, name);
        }
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = form_pairs(raw.unwrap_or("").as_bytes())
            .into_iter()
            .filter(|(name, _)| selected.binary_search(&name.as_slice()).is_ok())
            .collect();
        let mut items = vec![names_item.as_slice()];
        items.extend(pair_items(&pairs));
        self.part(b"query-params", &items);
        self
    }

    /// Adds one declared field and its value (tag `field`).
    pub fn field<T: Serialize + ?Sized>(mut self, name: &str, value: &T) -> Result<Self, FingerprintError> {
        let json = to_canonical(name, value)?;
        self.part(b"field", &[name.as_bytes(), json.as_bytes()]);
        Ok(self)
    }

    /// Adds one declared field whose value is a set (a `HashSet`, a `BTreeSet`...) (tag
    /// `field-set`). Each element is encoded as canonical JSON and the encodings are sorted
    /// bytewise (equal ones counted once), so the iteration order of a `HashSet` never changes the
    /// fingerprint.
    pub fn set_field<T: Serialize>(
        mut self,
        name: &str,
        items: impl IntoIterator<Item = T>,
    ) -> Result<Self, FingerprintError> {
        let mut elements =
            items.into_iter().map(|item| to_canonical(name, &item)).collect::<Result<Vec<String>, _>>()?;
        elements.sort_unstable();
        elements.dedup();
        let mut parts: Vec<&[u8]> = vec![name.as_bytes()];
        parts.extend(elements.iter().map(|e| e.as_bytes()));
        self.part(b"field-set", &parts);
        Ok(self)
    }

    /// Adds the whole deserialized body (used when a route declares no fields) (tag `body`).
    pub fn body<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, FingerprintError> {
        let json = to_canonical("<body>", value)?;
        self.part(b"body", &[json.as_bytes()]);
        Ok(self)
    }

    /// Adds the whole raw body, canonicalised by its content type: an empty body is `body-empty`
    /// whatever the content type; a JSON media type (`application/json` or `application/*+json`,
    /// parameters ignored, case-insensitive) whose bytes parse is `body-json` and its canonical
    /// JSON; `application/x-www-form-urlencoded` is `body-form` and its sorted decoded pairs;
    /// anything else, and JSON that does not parse, is `body-bytes` and the bytes.
    pub fn raw_body(mut self, content_type: Option<&str>, bytes: &[u8]) -> Self {
        if bytes.is_empty() {
            self.part(b"body-empty", &[]);
            return self;
        }
        let media = content_type.map(media_type).unwrap_or_default();
        if is_json_media_type(&media) {
            if let Some(canonical) = json_text::canonical(bytes) {
                self.part(b"body-json", &[canonical.as_bytes()]);
                return self;
            }
        } else if media == "application/x-www-form-urlencoded" {
            let pairs = form_pairs(bytes);
            let items = pair_items(&pairs);
            self.part(b"body-form", &items);
            return self;
        }
        self.part(b"body-bytes", &[bytes]);
        self
    }

    /// Records that the route's policy deliberately leaves the part named `part` (`path`,
    /// `query`, `body`) out of the fingerprint (tag `omitted`), so an identity that excludes a
    /// part never equals one that includes it as empty.
    pub fn omitted(mut self, part: &str) -> Self {
        self.part(b"omitted", &[part.as_bytes()]);
        self
    }

    /// Finishes the digest.
    pub fn finish(self) -> Fingerprint {
        Fingerprint(self.hasher.finalize().into())
    }

    /// Appends `put(tag) put(put(item1) put(item2) ...)`, hashing the items in place.
    fn part(&mut self, tag: &[u8], items: &[&[u8]]) {
        put(&mut self.hasher, tag);
        let payload_len: u64 = items.iter().map(|item| 8 + item.len() as u64).sum();
        self.hasher.update(payload_len.to_be_bytes());
        for item in items {
            put(&mut self.hasher, item);
        }
    }

    fn path_part(&mut self, tag: &[u8], params: &[(&str, &str)]) {
        let mut items: Vec<&[u8]> = Vec::with_capacity(2 * params.len());
        for (name, value) in params {
            items.push(name.as_bytes());
            items.push(value.as_bytes());
        }
        self.part(tag, &items);
    }
}

fn put(hasher: &mut Sha256, item: &[u8]) {
    hasher.update((item.len() as u64).to_be_bytes());
    hasher.update(item);
}

fn put_into(out: &mut Vec<u8>, item: &[u8]) {
    out.extend_from_slice(&(item.len() as u64).to_be_bytes());
    out.extend_from_slice(item);
}

fn to_canonical<T: Serialize + ?Sized>(field: &str, value: &T) -> Result<String, FingerprintError> {
    let value = serde_json::to_value(value).map_err(|source| FingerprintError::json(field, source))?;
    Ok(canonical_json(&value))
}

/// The media type of a `Content-Type` value: before any parameter, trimmed, lowercased.
fn media_type(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

fn is_json_media_type(media: &str) -> bool {
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// The decoded pairs of an `application/x-www-form-urlencoded` string, sorted by (name bytes,
/// value bytes). Splits like `form_urlencoded::parse` but keeps the decoded bytes instead of
/// replacing invalid UTF-8 with U+FFFD (see the module docs).
pub(crate) fn form_pairs(input: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = input
        .split(|&b| b == b'&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| match piece.iter().position(|&b| b == b'=') {
            Some(eq) => (form_decode(&piece[..eq]), form_decode(&piece[eq + 1..])),
            None => (form_decode(piece), Vec::new()),
        })
        .collect();
    // By name only, and stably: the values of one repeated name keep their order, which a
    // handler reading a list (`?tag=a&tag=b`) sees.
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    pairs
}

/// `+` as a space, then percent-decoding (with the `url` crate's own percent-decoder).
fn form_decode(raw: &[u8]) -> Vec<u8> {
    let spaced: Cow<'_, [u8]> = if raw.contains(&b'+') {
        Cow::Owned(raw.iter().map(|&b| if b == b'+' { b' ' } else { b }).collect())
    } else {
        Cow::Borrowed(raw)
    };
    percent_decode(&spaced).collect()
}

fn pair_items(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<&[u8]> {
    pairs.iter().flat_map(|(name, value)| [name.as_slice(), value.as_slice()]).collect()
}

/// The canonical JSON of a body's text, as [`FingerprintBuilder::raw_body`] fingerprints a JSON
/// body, or `None` when `text` is not one JSON value (by RFC 8259, as strictly as serde_json
/// reads it).
///
/// Where every number of `text` has at most 17 significant digits (all a double carries) or is an
/// integer that fits an `i64`/`u64`, this is [`canonical_json`] of the parsed value. A number
/// written with more digits than that, or beyond a double's range, keeps its exact decimal value,
/// normalised (`d.ddd…e±n`), so `12345678901234567891.25` and `12345678901234567891.26`, one
/// double, stay two requests:
///
/// ```
/// use idempotent_core::fingerprint::canonical_json_text;
///
/// assert_eq!(canonical_json_text(br#"{ "b": 1e3, "a": 2.50 }"#).as_deref(), Some(r#"{"a":2.5,"b":1000}"#));
/// assert_ne!(canonical_json_text(b"12345678901234567891.25"), canonical_json_text(b"12345678901234567891.26"));
/// assert_eq!(canonical_json_text(b"{"), None);
/// ```
pub fn canonical_json_text(text: &[u8]) -> Option<String> {
    json_text::canonical(text)
}

/// Renders `value` as canonical JSON (RFC 8785, with exact integers; see the module docs): object
/// keys sorted by UTF-16 code units, no whitespace, minimal string escapes, one spelling per
/// number.
///
/// Sorting is done here rather than relying on `serde_json::Map`'s ordering, which changes to
/// insertion order when any crate in the build enables serde_json's `preserve_order` feature.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // RFC 8785 section 3.2.3: keys compare as arrays of UTF-16 code units, which differs
            // from UTF-8 byte order for characters above U+FFFF versus U+E000..U+FFFF.
            entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
    }
}

/// RFC 8785 section 3.2.2.2: escape only `"`, `\` and the control characters.
fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// 2^63 and 2^64, exactly representable as doubles.
const TWO_POW_63: f64 = 9_223_372_036_854_775_808.0;
const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

/// Numbers go through `as_i64`/`as_u64`/`as_f64`, never through `Number`'s `Display`: with
/// serde_json's `arbitrary_precision` feature (which any crate in a build may enable) `Display`
/// prints the client's own spelling, so `1e3` and `1000` would differ.
fn write_number(n: &Number, out: &mut String) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        write_f64(f, out);
    } else {
        // Reachable only with `arbitrary_precision`, for a number outside the range of a double
        // (which serde_json otherwise refuses to parse). No canonical form exists; the client's
        // spelling keeps different numbers apart, and cannot equal any canonical number, which
        // never has an exponent above 308.
        let _ = write!(out, "{n}");
    }
}

fn write_f64(f: f64, out: &mut String) {
    // `f` is finite: serde_json Values hold no NaN or infinity.
    if f.trunc() == f {
        if (-TWO_POW_63..TWO_POW_63).contains(&f) {
            // In range, so the cast is exact; -0.0 becomes 0.
            let _ = write!(out, "{}", f as i64);
            return;
        }
        if (0.0..TWO_POW_64).contains(&f) {
            let _ = write!(out, "{}", f as u64);
            return;
        }
    }
    // `ryu-js` implements ECMAScript's Number.prototype.toString exactly (the shortest digits
    // that round-trip, with its rules for when to switch to exponent form and its `e+21`/`e-7`
    // spelling), which is what RFC 8785 section 3.2.2.3 prescribes; Rust's own float formatting
    // and the plain `ryu` crate print other forms (`1e21`, `1e-7` without a sign, `1.0`).
    out.push_str(ryu_js::Buffer::new().format_finite(f));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use std::collections::{BTreeSet, HashSet};

    fn fp_body(scope: &str, text: &str) -> Fingerprint {
        let v: Value = serde_json::from_str(text).unwrap();
        FingerprintBuilder::new(scope).body(&v).unwrap().finish()
    }

    fn fp_query(raw: Option<&str>) -> Fingerprint {
        FingerprintBuilder::new("s").query(raw).finish()
    }

    fn fp_raw(content_type: Option<&str>, bytes: &[u8]) -> Fingerprint {
        FingerprintBuilder::new("s").raw_body(content_type, bytes).finish()
    }

    /// A body's canonical JSON, from its text; the same as its `Value`'s for every number these
    /// tests use (each fits a double or an integer).
    fn canon(text: &str) -> String {
        let from_value = canonical_json(&serde_json::from_str(text).unwrap());
        assert_eq!(json_text::canonical(text.as_bytes()).as_deref(), Some(from_value.as_str()), "{text}");
        from_value
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a = fp_body("s", r#"{"a":1,"b":{"x":[1,2],"y":"z"}}"#);
        let b = fp_body("s", "{ \"b\" : { \"y\":\"z\", \"x\" : [ 1 , 2 ] },\n \"a\": 1 }");
        assert_eq!(a, b);
    }

    #[test]
    fn values_scope_and_field_names_matter() {
        assert_ne!(fp_body("s", r#"{"a":1}"#), fp_body("s", r#"{"a":2}"#));
        assert_ne!(fp_body("s", r#"{"a":1}"#), fp_body("t", r#"{"a":1}"#));
        let f1 = FingerprintBuilder::new("s").field("a", &1).unwrap().finish();
        let f2 = FingerprintBuilder::new("s").field("b", &1).unwrap().finish();
        assert_ne!(f1, f2);
    }

    #[test]
    fn parts_are_length_prefixed() {
        // "ab" + "c" must not equal "a" + "bc".
        let f1 = FingerprintBuilder::new("ab").field("c", &1).unwrap().finish();
        let f2 = FingerprintBuilder::new("a").field("bc", &1).unwrap().finish();
        assert_ne!(f1, f2);
        // A path parameter must not pass for a following part.
        let f1 = FingerprintBuilder::new("s").path(&[("method", "GET")]).finish();
        let f2 = FingerprintBuilder::new("s").path(&[]).method("GET").finish();
        assert_ne!(f1, f2);
        // Nor a query pair for the next part's tag and item.
        let f1 = FingerprintBuilder::new("s").query(Some("omitted=body")).finish();
        let f2 = FingerprintBuilder::new("s").query(None).omitted("body").finish();
        assert_ne!(f1, f2);
    }

    #[test]
    fn canonical_json_sorts_and_strips() {
        assert_eq!(
            canonical_json(&json!({"b": [1, {"d": 1, "c": 2}], "a": "x y"})),
            r#"{"a":"x y","b":[1,{"c":2,"d":1}]}"#
        );
    }

    #[test]
    fn equal_numbers_have_one_spelling() {
        for text in ["1000", "1000.0", "1e3", "1.0E3", "1E+3", "10000e-1"] {
            assert_eq!(canon(text), "1000", "{text}");
        }
        assert_eq!(fp_body("s", r#"{"amount":1000}"#), fp_body("s", r#"{"amount":1000.0}"#));
        assert_eq!(fp_body("s", r#"{"amount":1000}"#), fp_body("s", r#"{"amount":1e3}"#));
        assert_ne!(fp_body("s", r#"{"amount":1}"#), fp_body("s", r#"{"amount":2}"#));
        assert_eq!(canon("-0"), "0");
        assert_eq!(canon("-0.0"), "0");
        assert_eq!(canonical_json(&json!(-0.0_f64)), "0");
        assert_eq!(canon("4.50"), "4.5");
        assert_eq!(canon("2e-3"), "0.002");
    }

    #[test]
    fn integers_beyond_two_pow_53_stay_exact() {
        // The documented deviation from RFC 8785: exact integers never collapse.
        assert_eq!(canon("9007199254740993"), "9007199254740993");
        assert_ne!(canon("9007199254740993"), canon("9007199254740992"));
        assert_eq!(canon("18446744073709551615"), "18446744073709551615");
        assert_eq!(canon("-9223372036854775808"), "-9223372036854775808");
        // An integral double in range prints the digits of its exact integer value...
        assert_eq!(canonical_json(&json!(2f64.powi(60))), "1152921504606846976");
        assert_eq!(canonical_json(&json!(2f64.powi(60))), canonical_json(&json!(1u64 << 60)));
        assert_eq!(canonical_json(&json!(-(2f64.powi(63)))), "-9223372036854775808");
        assert_eq!(canonical_json(&json!(2f64.powi(63))), "9223372036854775808");
        // ...and beyond u64 it is ECMAScript's form again.
        assert_eq!(canonical_json(&json!(2f64.powi(64))), "18446744073709552000");
    }

    /// RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical form (checked against
    /// `String(x)` in Node.js). NaN and Infinity are left out: serde_json Values cannot hold them.
    #[test]
    fn rfc8785_number_vectors() {
        let vectors: &[(u64, &str)] = &[
            (0x0000000000000000, "0"),
            (0x8000000000000000, "0"),
            (0x0000000000000001, "5e-324"),
            (0x8000000000000001, "-5e-324"),
            (0x7fefffffffffffff, "1.7976931348623157e+308"),
            (0xffefffffffffffff, "-1.7976931348623157e+308"),
            (0x4340000000000000, "9007199254740992"),
            (0xc340000000000000, "-9007199254740992"),
            (0x4430000000000000, "295147905179352830000"),
            (0x44b52d02c7e14af5, "9.999999999999997e+22"),
            (0x44b52d02c7e14af6, "1e+23"),
            (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
            (0x444b1ae4d6e2ef4e, "999999999999999700000"),
            (0x444b1ae4d6e2ef4f, "999999999999999900000"),
            (0x444b1ae4d6e2ef50, "1e+21"),
            (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
            (0x3eb0c6f7a0b5ed8d, "0.000001"),
            (0x41b3de4355555553, "333333333.3333332"),
            (0x41b3de4355555554, "333333333.33333325"),
            (0x41b3de4355555555, "333333333.3333333"),
            (0x41b3de4355555556, "333333333.3333334"),
            (0x41b3de4355555557, "333333333.33333343"),
            (0xbecbf647612f3696, "-0.0000033333333333333333"),
            (0x43143ff3c1cb0959, "1424953923781206.2"),
        ];
        for &(bits, expected) in vectors {
            let f = f64::from_bits(bits);
            assert_eq!(canonical_json(&json!(f)), expected, "{bits:016x}");
            // The canonical form parses back to the same double, and re-canonicalises to itself.
            assert_eq!(canon(expected), expected, "{bits:016x}");
        }
        assert_eq!(canon("1e21"), "1e+21");
        assert_eq!(canon("0.000001"), "0.000001");
        assert_eq!(canon("1e-7"), "1e-7");
        assert_eq!(canon("1E30"), "1e+30");
        assert_eq!(canon("0.000000000000000000000000001"), "1e-27");
    }

    /// RFC 8785 section 3.2.2 example (its `numbers` and `literals`) and section 3.2.3's sorting
    /// example, whose expected key order follows UTF-16 code units: U+1F600 (`\ud83d\ude00`) sorts
    /// before U+FB33, although its UTF-8 bytes sort after.
    #[test]
    fn rfc8785_examples() {
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        assert_eq!(
            canon(input),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
        let sorting = r#"{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        assert_eq!(
            canon(sorting),
            "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\
             \"\u{f6}\":\"Latin Small Letter O With Diaeresis\",\"\u{20ac}\":\"Euro Sign\",\
             \"\u{1f600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}"
        );
    }

    #[test]
    fn strings_are_escaped_as_rfc8785_says() {
        let s = "q\"b\\s/\u{8}\u{9}\u{a}\u{c}\u{d}\u{0}\u{1f}\u{7f}é€😀";
        assert_eq!(canonical_json(&Value::String(s.into())), "\"q\\\"b\\\\s/\\b\\t\\n\\f\\r\\u0000\\u001f\u{7f}é€😀\"");
        assert_eq!(canonical_json(&json!({"k\n": "v"})), "{\"k\\n\":\"v\"}");
    }

    #[test]
    fn set_iteration_order_does_not_matter() {
        let a: Vec<&str> = vec!["usd", "eur", "gbp"];
        let b: Vec<&str> = vec!["gbp", "usd", "eur"];
        let fa = FingerprintBuilder::new("s").set_field("currencies", a).unwrap().finish();
        let fb = FingerprintBuilder::new("s").set_field("currencies", b).unwrap().finish();
        assert_eq!(fa, fb);
        let hash: HashSet<u32> = (0..50).collect();
        let tree: BTreeSet<u32> = (0..50).rev().collect();
        let fh = FingerprintBuilder::new("s").set_field("ids", &hash).unwrap().finish();
        let ft = FingerprintBuilder::new("s").set_field("ids", &tree).unwrap().finish();
        assert_eq!(fh, ft);
        let fewer: BTreeSet<u32> = (0..49).collect();
        assert_ne!(ft, FingerprintBuilder::new("s").set_field("ids", &fewer).unwrap().finish());
        // A set is not the list of the same elements.
        let list: Vec<u32> = (0..50).collect();
        assert_ne!(ft, FingerprintBuilder::new("s").field("ids", &list).unwrap().finish());
    }

    #[test]
    fn set_field_reports_the_field_that_fails() {
        let bad: Vec<std::collections::HashMap<Vec<u8>, u8>> = vec![[(vec![1], 1)].into_iter().collect()];
        let err = FingerprintBuilder::new("s").set_field("tags", bad).err().unwrap();
        assert_eq!(err.field, "tags");
    }

    #[test]
    fn query_is_canonical() {
        assert_eq!(fp_query(Some("b=2&a=1")), fp_query(Some("a=1&b=2")));
        assert_eq!(fp_query(Some("a=%20")), fp_query(Some("a=+")));
        assert_eq!(fp_query(Some("a=%41")), fp_query(Some("a=A")));
        assert_ne!(fp_query(Some("a=1")), fp_query(Some("a=2")));
        assert_ne!(fp_query(Some("a=1")), fp_query(Some("a=1&a=1")));
        assert_eq!(fp_query(Some("a=1&&b=2&")), fp_query(Some("b=2&a=1")));
        assert_eq!(fp_query(None), fp_query(Some("")));
        assert_ne!(fp_query(None), fp_query(Some("a")));
        assert_eq!(fp_query(Some("a")), fp_query(Some("a=")));
        // Invalid UTF-8 after decoding is kept as bytes, not collapsed into U+FFFD.
        assert_ne!(fp_query(Some("a=%FF")), fp_query(Some("a=%FE")));
        assert_ne!(fp_query(Some("a=%FF")), fp_query(Some("a=%EF%BF%BD")));
        // Pairs sort by name only: the values of a repeated name keep their order.
        assert_ne!(fp_query(Some("a=2&a=1")), fp_query(Some("a=1&a=2")));
    }

    #[test]
    fn query_params_select_and_record_names() {
        let fp = |raw: &str, names: &[&str]| FingerprintBuilder::new("s").query_params(Some(raw), names).finish();
        assert_eq!(fp("a=1&utm=x", &["a"]), fp("utm=y&a=1", &["a"]));
        assert_ne!(fp("a=1", &["a"]), fp("a=2", &["a"]));
        assert_ne!(fp("a=1", &["a"]), fp("a=1", &["a", "b"]));
        assert_eq!(fp("b=2&a=1", &["a", "b"]), fp("a=1&b=2", &["b", "a"]));
        assert_ne!(fp("a=1", &["a"]), FingerprintBuilder::new("s").query(Some("a=1")).finish());
        assert_eq!(fp("a%20b=1", &["a b"]), fp("a+b=1", &["a b"]));
    }

    #[test]
    fn raw_bodies_are_canonical_by_content_type() {
        let json = br#"{"b":1, "a":1e3}"#;
        let same = br#"{"a":1000,"b":1}"#;
        assert_eq!(fp_raw(Some("application/json"), json), fp_raw(Some("application/json"), same));
        assert_eq!(
            fp_raw(Some("Application/JSON; charset=utf-8"), json),
            fp_raw(Some("application/vnd.api+json"), same)
        );
        assert_ne!(fp_raw(Some("application/json"), json), fp_raw(Some("text/plain"), json));
        assert_ne!(fp_raw(Some("application/json"), json), fp_raw(None, json));
        // JSON that does not parse is kept as bytes.
        assert_eq!(fp_raw(Some("application/json"), b"{nope"), fp_raw(Some("text/plain"), b"{nope"));
        assert_ne!(fp_raw(Some("application/json"), b"{nope"), fp_raw(Some("application/json"), b"{nope "));
        // Form bodies: pairs sorted and decoded.
        let form = Some("application/x-www-form-urlencoded");
        assert_eq!(fp_raw(form, b"b=2&a=hello+world"), fp_raw(form, b"a=hello%20world&b=2"));
        assert_ne!(fp_raw(form, b"a=1"), fp_raw(form, b"a=2"));
        assert_ne!(fp_raw(form, b"a=1"), fp_raw(Some("text/plain"), b"a=1"));
        // The same pairs in a form body and in the query are different parts.
        assert_ne!(fp_raw(form, b"a=1"), fp_query(Some("a=1")));
        // An empty body is one thing whatever its content type.
        assert_eq!(fp_raw(Some("application/json"), b""), fp_raw(None, b""));
        assert_eq!(fp_raw(form, b""), fp_raw(Some("text/plain"), b""));
        // A form body with no pairs is not an empty body.
        assert_ne!(fp_raw(form, b"&"), fp_raw(form, b""));
        // Bytes are bytes.
        assert_ne!(
            fp_raw(Some("application/octet-stream"), b"\x00"),
            fp_raw(Some("application/octet-stream"), b"\x01")
        );
    }

    #[test]
    fn omitted_differs_from_empty() {
        let omitted = FingerprintBuilder::new("s").omitted("query").finish();
        let empty = FingerprintBuilder::new("s").query(None).finish();
        assert_ne!(omitted, empty);
        let omitted = FingerprintBuilder::new("s").omitted("body").finish();
        assert_ne!(omitted, fp_raw(None, b""));
        assert_ne!(FingerprintBuilder::new("s").finish(), FingerprintBuilder::new("s").omitted("body").finish());
        assert_ne!(
            FingerprintBuilder::new("s").omitted("path").finish(),
            FingerprintBuilder::new("s").omitted("query").finish()
        );
    }

    #[test]
    fn path_and_method_matter() {
        let refund = |id: &str| FingerprintBuilder::new("s").method("POST").path(&[("id", id)]).finish();
        assert_ne!(refund("1"), refund("2"));
        assert_eq!(refund("1"), refund("1"));
        let put = FingerprintBuilder::new("s").method("PUT").path(&[("id", "1")]).finish();
        assert_ne!(refund("1"), put);
        assert_eq!(
            FingerprintBuilder::new("s").method("post").finish(),
            FingerprintBuilder::new("s").method("POST").finish()
        );
        let all = FingerprintBuilder::new("s").path(&[("id", "1")]).finish();
        let declared = FingerprintBuilder::new("s").path_params(&[("id", "1")]).finish();
        assert_ne!(all, declared);
        let other_name = FingerprintBuilder::new("s").path(&[("key", "1")]).finish();
        assert_ne!(all, other_name);
    }

    #[test]
    fn fingerprint_is_stable_across_releases() {
        // Changing these values means every stored record in production mismatches: bump the
        // version tag instead. Each is SHA-256 of the documented encoding, computed independently
        // of this crate with this Python 3:
        //
        // import hashlib, struct
        // def put(b): return struct.pack('>Q', len(b)) + b
        // def part(tag, *items): return put(tag) + put(b''.join(put(i) for i in items))
        // head = put(b'idempotent-fingerprint/v2') + put(b'payments.create')
        // print(hashlib.sha256(head + part(b'field', b'amount', b'100')).hexdigest())
        // print(hashlib.sha256(head + part(b'method', b'POST')
        //     + part(b'path', b'id', b'pay_1')
        //     + part(b'query', b'a', b'1', b'b', b'2')
        //     + part(b'field', b'amount', b'100')).hexdigest())
        let fields_only = FingerprintBuilder::new("payments.create").field("amount", &100).unwrap().finish();
        assert_eq!(fields_only.to_hex(), "ca0d18648d18aaf9cdfbc738612728fd81493e47028db2838894d34f0d3a89c8");
        let whole = FingerprintBuilder::new("payments.create")
            .method("POST")
            .path(&[("id", "pay_1")])
            .query(Some("b=2&a=1"))
            .field("amount", &100)
            .unwrap()
            .finish();
        assert_eq!(whole.to_hex(), "d837fa5416944889fb2f4af469fce92c58ddd39ab90c20f3236b974319de3e1e");
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
            "[a-z ]{0,8}".prop_map(Value::String),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner.clone(), 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                prop::collection::btree_map(any::<String>(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Re-serializes `v` with object keys in reverse order and random-ish whitespace.
    fn scrambled(v: &Value, ws: &str) -> String {
        match v {
            Value::Object(m) => {
                let mut parts: Vec<String> = m
                    .iter()
                    .map(|(k, v)| format!("{ws}{}{ws}:{ws}{}", Value::String(k.clone()), scrambled(v, ws)))
                    .collect();
                parts.reverse();
                format!("{{{}{ws}}}", parts.join(","))
            }
            Value::Array(a) => {
                let parts: Vec<String> = a.iter().map(|v| format!("{ws}{}", scrambled(v, ws))).collect();
                format!("[{}{ws}]", parts.join(","))
            }
            other => other.to_string(),
        }
    }

    /// A query string from arbitrary pairs, each byte percent-encoded or not at random.
    fn arb_query() -> impl Strategy<Value = String> {
        let encoded = prop::collection::vec(("[a-c+%&=]{0,3}|.{0,3}", "[a-c+%&= ]{0,4}|.{0,3}", any::<bool>()), 0..5)
            .prop_map(|pairs| {
                let enc = |s: &str, all: bool| -> String {
                    s.bytes()
                        .map(|b| {
                            if all || !b.is_ascii_alphanumeric() {
                                format!("%{b:02X}")
                            } else {
                                (b as char).to_string()
                            }
                        })
                        .collect()
                };
                pairs
                    .iter()
                    .map(|(n, v, all)| format!("{}={}", enc(n, *all), enc(v, !*all)))
                    .collect::<Vec<_>>()
                    .join("&")
            });
        prop_oneof!["[a-c+%&=0-9A-Fa-f]{0,16}", "\\PC{0,8}", encoded]
    }

    proptest! {
        #[test]
        fn permuted_keys_and_whitespace_give_the_same_fingerprint(v in arb_json(), ws in "[ \t\n]{0,3}") {
            let original = serde_json::to_string(&v).unwrap();
            let other = scrambled(&v, &ws);
            prop_assert_eq!(fp_body("scope", &original), fp_body("scope", &other));
        }

        #[test]
        fn canonical_json_is_valid_json_of_the_same_value_and_a_fixed_point(v in arb_json()) {
            let out = canonical_json(&v);
            let back: Value = serde_json::from_str(&out).unwrap();
            prop_assert_eq!(&canonical_json(&back), &out);
            // Same value: numbers compare as doubles (exact integers compare exactly).
            prop_assert!(same_value(&v, &back));
        }

        #[test]
        fn integers_print_exactly(i in any::<i64>(), u in any::<u64>()) {
            prop_assert_eq!(canonical_json(&json!(i)), i.to_string());
            prop_assert_eq!(canonical_json(&json!(u)), u.to_string());
        }

        #[test]
        fn floats_round_trip(f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
            let out = canonical_json(&json!(f));
            let back: f64 = out.parse().unwrap();
            prop_assert_eq!(back, f);
        }

        #[test]
        fn query_decoding_matches_form_urlencoded(raw in arb_query()) {
            // form_urlencoded's pairs are ours with invalid UTF-8 replaced by U+FFFD.
            let mut expected: Vec<(String, String)> =
                form_urlencoded::parse(raw.as_bytes()).map(|(n, v)| (n.into_owned(), v.into_owned())).collect();
            expected.sort();
            let mut ours: Vec<(String, String)> = form_pairs(raw.as_bytes())
                .iter()
                .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()))
                .collect();
            ours.sort();
            prop_assert_eq!(ours, expected);
        }

        #[test]
        fn query_pair_order_does_not_matter(pairs in prop::collection::btree_map("[a-c]{0,2}", "[a-c ]{0,2}", 0..6)) {
            let enc = |s: &str| s.replace(' ', "+");
            let forward: Vec<String> = pairs.iter().map(|(n, v)| format!("{}={}", enc(n), enc(v))).collect();
            let mut backward = forward.clone();
            backward.reverse();
            prop_assert_eq!(fp_query(Some(&forward.join("&"))), fp_query(Some(&backward.join("&"))));
        }
    }

    #[test]
    fn the_values_of_a_repeated_name_keep_their_order() {
        // A handler reading `?tag=a&tag=b` as a list sees the order.
        assert_ne!(fp_query(Some("tag=a&tag=b")), fp_query(Some("tag=b&tag=a")));
        assert_eq!(fp_query(Some("tag=a&x=1&tag=b")), fp_query(Some("x=1&tag=a&tag=b")));
        let form = |b: &str| {
            FingerprintBuilder::new("s").raw_body(Some("application/x-www-form-urlencoded"), b.as_bytes()).finish()
        };
        assert_ne!(form("tag=a&tag=b"), form("tag=b&tag=a"));
    }

    fn same_value(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => match (x.as_i64(), x.as_u64(), y.as_i64(), y.as_u64()) {
                (Some(p), _, Some(q), _) => p == q,
                (_, Some(p), _, Some(q)) => p == q,
                _ => x.as_f64() == y.as_f64(),
            },
            (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_value(p, q)),
            (Value::Object(x), Value::Object(y)) => {
                x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
            }
            _ => a == b,
        }
    }
}
