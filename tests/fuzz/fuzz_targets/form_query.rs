//! Canonicalisation of query strings and `application/x-www-form-urlencoded` bodies in the
//! fingerprint (`FingerprintBuilder::query`, `query_params`, `raw_body`).
//!
//! The input is two strings separated by the first `\n`, `a` and `b` (`b` empty when there is
//! none). The canonical form of a query is its decoded pairs, sorted by name, stably (the values of
//! a repeated name keep their order); the fingerprint is SHA-256 of its documented encoding.
//! Checked:
//! - nothing panics, whatever the bytes;
//! - decoding agrees with the `form_urlencoded` crate (the `url` crate's parser), pair for pair,
//!   up to its replacement of invalid UTF-8;
//! - the fingerprint is the documented encoding (the module docs of `fingerprint`) of the
//!   canonical pairs, recomputed here with `sha2`: so the encoding is unambiguous, and two
//!   inputs whose canonical pairs differ never share a fingerprint;
//! - idempotence: the canonical pairs written back as a query (percent-encoded two ways) have
//!   the same fingerprint;
//! - order: moving pairs of different names around keeps the fingerprint, swapping two values
//!   of one name changes it;
//! - `a` and `b` have one fingerprint exactly when their canonical pairs are equal;
//! - a request gathered by the protocol (`Incoming`) with that query and form body has the
//!   documented encoding of its method, path, query and body parts;
//! - `query_params` selects the named pairs, whatever the order of the names, a name given
//!   twice counted once.
#![no_main]

use bytes::Bytes;
use idempotent_core::fingerprint::{Fingerprint, FingerprintBuilder};
use idempotent_core::policy::Policy;
use idempotent_core::protocol::Incoming;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

/// A route whose identity is the whole request: path parameters, query and body.
static POLICY: Policy = Policy::new("s");

fuzz_target!(|data: &[u8]| {
    let (a, b) = match data.iter().position(|&byte| byte == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &data[data.len()..]),
    };
    check_one(a);
    check_one(b);

    let same = canonical(&decode(a)) == canonical(&decode(b));
    // An empty body is `body-empty`, one of only `&` a form with no pairs.
    let same_form = same && a.is_empty() == b.is_empty();
    assert_eq!(same_form, form(a) == form(b), "form bodies {a:?} and {b:?}");
    if let (Ok(qa), Ok(qb)) = (std::str::from_utf8(a), std::str::from_utf8(b)) {
        assert_eq!(same, query(qa) == query(qb), "queries {qa:?} and {qb:?}");
    }
});

fn check_one(raw: &[u8]) {
    let pairs = decode(raw);
    let expected = canonical(&pairs);

    // The `url` crate's decoding, which replaces invalid UTF-8 with U+FFFD.
    let lossy = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let theirs: Vec<(String, String)> =
        form_urlencoded::parse(raw).map(|(n, v)| (n.into_owned(), v.into_owned())).collect();
    let ours: Vec<(String, String)> = pairs.iter().map(|(n, v)| (lossy(n), lossy(v))).collect();
    assert_eq!(ours, theirs, "the reference decoder and form_urlencoded disagree on {raw:?}");

    // The fingerprint is the documented encoding of the canonical pairs.
    assert_eq!(form(raw), encoding(&[form_part(raw, &expected)]), "body-form of {raw:?}");
    let text = std::str::from_utf8(raw).ok();
    if let Some(text) = text {
        assert_eq!(query(text), encoding(&[(b"query", items(&expected))]), "query of {text:?}");
        // The same parts as the protocol gathers them from a request, after method and path.
        let incoming = Incoming::new("POST", Some("/r"))
            .query(Some(text))
            .body(FORM.map(str::as_bytes), Bytes::copy_from_slice(raw));
        let parts = [
            (&b"method"[..], vec![&b"POST"[..]]),
            (b"path", vec![]),
            (b"query", items(&expected)),
            form_part(raw, &expected),
        ];
        assert_eq!(incoming.fingerprint(&POLICY, Ok).ok(), Some(encoding(&parts)), "a request with {text:?}");
    }

    // Idempotent: the canonical pairs, written again, are the same request.
    for encoded in [encode_all(&expected), encode_some(&expected)] {
        let part = form_part(encoded.as_bytes(), &expected);
        assert_eq!(form(encoded.as_bytes()), encoding(&[part]), "{encoded:?} rewrites {raw:?}");
        assert_eq!(query(&encoded), encoding(&[(b"query", items(&expected))]));
    }

    // Order: pairs of different names move freely; a repeated name's values keep their order.
    let pieces: Vec<&[u8]> = raw.split(|&b| b == b'&').filter(|p| !p.is_empty()).collect();
    let regrouped = regroup(&pieces);
    assert_eq!(form(&regrouped), encoding(&[form_part(&regrouped, &expected)]), "{regrouped:?} regroups {raw:?}");
    if let Some(swapped) = swap_values_of_one_name(&pieces) {
        assert_ne!(form(&swapped), form(raw), "swapping two values of one name in {raw:?}");
    }

    // Selected names: only those pairs, the names recorded, in any order.
    if let Some(text) = text {
        let mut names: Vec<&str> = Vec::new();
        for (name, _) in &expected {
            if let Ok(name) = std::str::from_utf8(name) {
                if !names.contains(&name) && names.len() < 2 {
                    names.push(name);
                }
            }
        }
        names.push("absent-name");
        names.push(names[0]);
        let selected: Pairs =
            expected.iter().filter(|(n, _)| names.iter().any(|s| s.as_bytes() == n)).cloned().collect();
        let mut sorted: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
        sorted.sort();
        sorted.dedup();
        let names_item: Vec<u8> = encoding_of_names(&sorted);
        let mut part = vec![names_item.as_slice()];
        part.extend(items(&selected));
        let fp = |names: &[&str]| FingerprintBuilder::new("s").query_params(Some(text), names).finish();
        assert_eq!(fp(&names), encoding(&[(b"query-params", part)]), "query_params({names:?}) of {text:?}");
        let reversed: Vec<&str> = names.iter().rev().copied().collect();
        assert_eq!(fp(&reversed), fp(&names));
    }
}

fn query(raw: &str) -> Fingerprint {
    FingerprintBuilder::new("s").query(Some(raw)).finish()
}

fn form(raw: &[u8]) -> Fingerprint {
    FingerprintBuilder::new("s").raw_body(FORM, raw).finish()
}

/// application/x-www-form-urlencoded parsing (WHATWG URL, 5.1): split on `&`, drop empty
/// pieces, split each at its first `=`, then `+` is a space and `%XX` a byte; a `%` not followed
/// by two hex digits is itself.
fn decode(raw: &[u8]) -> Pairs {
    raw.split(|&b| b == b'&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let eq = piece.iter().position(|&b| b == b'=').unwrap_or(piece.len());
            (unescape(&piece[..eq]), unescape(piece.get(eq + 1..).unwrap_or_default()))
        })
        .collect()
}

fn unescape(raw: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match (raw[i], raw.get(i + 1).copied().and_then(hex), raw.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi * 16 + lo);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Sorted by name, stably.
fn canonical(pairs: &Pairs) -> Pairs {
    let mut sorted = pairs.clone();
    sorted.sort_by(|x, y| x.0.cmp(&y.0));
    sorted
}

/// The first item of `query-params`: `put(name)` per selected name.
fn encoding_of_names(names: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for name in names {
        out.extend_from_slice(&(name.len() as u64).to_be_bytes());
        out.extend_from_slice(name);
    }
    out
}

/// One part of the documented encoding: its tag and its items.
type Part<'a> = (&'static [u8], Vec<&'a [u8]>);

/// SHA-256 of the documented encoding (the module docs of `fingerprint`): `put(version)
/// put(scope)`, then per part `put(tag) put(put(item) put(item) ...)`, where `put(x)` is the
/// length of `x` as 8 bytes big-endian, then `x`.
fn encoding(parts: &[Part<'_>]) -> Fingerprint {
    let put = |out: &mut Vec<u8>, item: &[u8]| {
        out.extend_from_slice(&(item.len() as u64).to_be_bytes());
        out.extend_from_slice(item);
    };
    let mut out = Vec::new();
    put(&mut out, b"idempotent-fingerprint/v2");
    put(&mut out, b"s");
    for (tag, items) in parts {
        let mut payload = Vec::new();
        for item in items {
            put(&mut payload, item);
        }
        put(&mut out, tag);
        put(&mut out, &payload);
    }
    Fingerprint(Sha256::digest(&out).into())
}

/// Each pair's name, then its value.
fn items(pairs: &Pairs) -> Vec<&[u8]> {
    pairs.iter().flat_map(|(name, value)| [name.as_slice(), value.as_slice()]).collect()
}

/// The part of a form body: `body-empty` for no bytes at all (whatever the content type), else
/// `body-form` and its pairs.
fn form_part<'a>(raw: &[u8], pairs: &'a Pairs) -> Part<'a> {
    if raw.is_empty() {
        (b"body-empty", Vec::new())
    } else {
        (b"body-form", items(pairs))
    }
}

/// Every byte percent-encoded.
fn encode_all(pairs: &Pairs) -> String {
    encode(pairs, |b, out| push_escaped(b, b"0123456789ABCDEF", out))
}

/// Alphanumerics as they are, a space as `+`, anything else `%xx` in lowercase hex.
fn encode_some(pairs: &Pairs) -> String {
    encode(pairs, |b, out| match b {
        b' ' => out.push('+'),
        b if b.is_ascii_alphanumeric() => out.push(char::from(b)),
        b => push_escaped(b, b"0123456789abcdef", out),
    })
}

fn encode(pairs: &Pairs, byte: impl Fn(u8, &mut String)) -> String {
    let mut out = String::new();
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        name.iter().for_each(|&b| byte(b, &mut out));
        out.push('=');
        value.iter().for_each(|&b| byte(b, &mut out));
    }
    out
}

fn push_escaped(b: u8, digits: &[u8; 16], out: &mut String) {
    out.push('%');
    out.push(char::from(digits[usize::from(b >> 4)]));
    out.push(char::from(digits[usize::from(b & 15)]));
}

/// The pieces grouped by decoded name, the groups in the reverse order of their names' first
/// appearance, each group in its original order: the same canonical pairs.
fn regroup(pieces: &[&[u8]]) -> Vec<u8> {
    let mut groups: BTreeMap<Vec<u8>, (usize, Vec<&[u8]>)> = BTreeMap::new();
    for (i, piece) in pieces.iter().enumerate() {
        groups.entry(name_of(piece)).or_insert_with(|| (i, Vec::new())).1.push(piece);
    }
    let mut groups: Vec<(usize, Vec<&[u8]>)> = groups.into_values().collect();
    groups.sort_by_key(|(first, _)| std::cmp::Reverse(*first));
    groups.into_iter().flat_map(|(_, group)| group).collect::<Vec<&[u8]>>().join(&b'&')
}

/// The pieces with two values of one name that differ swapped, if there are any.
fn swap_values_of_one_name(pieces: &[&[u8]]) -> Option<Vec<u8>> {
    let mut first_of: BTreeMap<Vec<u8>, (usize, Vec<u8>)> = BTreeMap::new();
    for (j, piece) in pieces.iter().enumerate() {
        let (name, value) = decode(piece).pop().unwrap_or_default();
        match first_of.get(&name) {
            Some((i, first)) if *first != value => {
                let mut swapped = pieces.to_vec();
                swapped.swap(*i, j);
                return Some(swapped.join(&b'&'));
            }
            Some(_) => {}
            None => {
                first_of.insert(name, (j, value));
            }
        }
    }
    None
}

fn name_of(piece: &[u8]) -> Vec<u8> {
    decode(piece).pop().map(|(name, _)| name).unwrap_or_default()
}
