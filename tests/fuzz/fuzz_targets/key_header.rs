//! The `Idempotency-Key` header parser (`IdempotencyKey::parse`, `from_header_values`, and
//! `Caller::identify` reading it from a `HeaderMap`).
//!
//! The input is one header value; a `\n` in it splits it into several values of one header.
//! Checked, for every input:
//! - nothing panics;
//! - the parser agrees with [`reference`], a small independent implementation of the rules
//!   (accept or reject, and the same key);
//! - an accepted key is 1 to 255 visible ASCII characters, with a space only when the value was a
//!   quoted sf-String;
//! - round trips: an accepted key written back as an sf-String (escaping `"` and `\`) parses to
//!   the same key, and written bare (when it has no leading quote, no space) to itself;
//! - optional whitespace around the value never changes the answer;
//! - `from_header_values`: no value is no key, two or more are `Repeated`, one is `parse`
//!   unless it is a bare list (a comma outside a quoted string);
//! - `Caller::identify` reads the header exactly as `from_header_values` parses its values.
#![no_main]

use idempotent_core::engine::Config;
use idempotent_core::key::{IdempotencyKey, KeyError, MAX_KEY_LEN};
use idempotent_core::protocol::Caller;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parsed = IdempotencyKey::parse(data);
    let expected = reference(data);
    match (&parsed, &expected) {
        (Ok(key), Ok(want)) => assert_eq!(key.as_str(), want, "input {data:?}"),
        (Err(_), Err(())) => {}
        _ => panic!("parse and the reference disagree on {data:?}: {parsed:?} vs {expected:?}"),
    }

    let trimmed = trim(data);
    match &parsed {
        Ok(key) => check_accepted(key, trimmed),
        Err(e) => check_rejected(e, trimmed),
    }

    // Optional whitespace around a value is not part of it.
    let mut padded = b" \t".to_vec();
    padded.extend_from_slice(data);
    padded.extend_from_slice(b"\t ");
    assert_eq!(IdempotencyKey::parse(&padded), parsed, "padding changed the answer for {data:?}");

    check_header_values(data, &parsed);
});

/// What must hold of an accepted key, and its round trips.
fn check_accepted(key: &IdempotencyKey, trimmed: &[u8]) {
    let k = key.as_str();
    assert!((1..=MAX_KEY_LEN).contains(&k.len()), "accepted a key of {} characters", k.len());
    assert!(k.bytes().all(|b| (0x20..=0x7E).contains(&b)), "accepted a key that is not visible ASCII: {k:?}");
    if k.contains(' ') {
        assert_eq!(trimmed.first(), Some(&b'"'), "a space outside an sf-String was accepted: {k:?}");
    }
    assert_eq!(key.to_string(), k);

    // Written back as an sf-String, it parses to itself.
    let quoted = sf_string(k);
    assert_eq!(IdempotencyKey::parse(quoted.as_bytes()).as_ref(), Ok(key), "sf-String {quoted:?}");
    assert_eq!(IdempotencyKey::from_header_values([quoted.as_bytes()]), Ok(Some(key.clone())));

    // Written bare, it parses to itself when a bare token can carry it.
    if !k.starts_with('"') && !k.contains(' ') {
        assert_eq!(IdempotencyKey::parse(k.as_bytes()).as_ref(), Ok(key), "bare {k:?}");
        let one = IdempotencyKey::from_header_values([k.as_bytes()]);
        if k.contains(',') {
            assert_eq!(one, Err(KeyError::Repeated), "a bare key with a comma is a list: {k:?}");
        } else {
            assert_eq!(one, Ok(Some(key.clone())), "bare {k:?}");
        }
    }
}

/// Each error is one the input explains.
fn check_rejected(error: &KeyError, trimmed: &[u8]) {
    match error {
        KeyError::Empty => {
            assert!(trimmed.is_empty() || trimmed == b"\"\"", "Empty for {trimmed:?}")
        }
        KeyError::TooLong { len } => assert!(*len > MAX_KEY_LEN && *len <= trimmed.len()),
        KeyError::NonAscii => assert!(trimmed.iter().any(|b| !b.is_ascii()), "NonAscii for {trimmed:?}"),
        KeyError::Control => {
            assert!(trimmed.iter().any(|b| b.is_ascii_control() || *b == b' '), "Control for {trimmed:?}")
        }
        KeyError::Malformed(_) => assert_eq!(trimmed.first(), Some(&b'"'), "Malformed for a bare {trimmed:?}"),
        KeyError::Repeated => panic!("parse of one value said Repeated: {trimmed:?}"),
        KeyError::FieldMissing(field) => panic!("parse of a header value said the field {field:?} is missing"),
    }
}

/// The header given as several values (split at `\n`), as `from_header_values` and a real
/// `HeaderMap` see them.
fn check_header_values(data: &[u8], parsed: &Result<IdempotencyKey, KeyError>) {
    let none: [&[u8]; 0] = [];
    assert_eq!(IdempotencyKey::from_header_values(none), Ok(None));

    let values: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let answer = IdempotencyKey::from_header_values(values.iter().copied());
    if values.len() > 1 {
        assert_eq!(answer, Err(KeyError::Repeated), "{} values of one header", values.len());
    } else {
        let t = trim(data);
        if t.first() != Some(&b'"') && t.contains(&b',') {
            assert_eq!(answer, Err(KeyError::Repeated), "a bare list {data:?}");
        } else {
            assert_eq!(answer, parsed.clone().map(Some), "one value {data:?}");
        }
    }

    // Through a HeaderMap, as an adapter hands the request's headers over. Values the `http`
    // crate refuses cannot reach the parser, and are left out.
    let mut headers = http::HeaderMap::new();
    let mut kept: Vec<&[u8]> = Vec::new();
    for value in &values {
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            headers.append("idempotency-key", v);
            kept.push(value);
        }
    }
    let caller = Caller::identify(&Config::default(), &headers, None);
    assert_eq!(caller.key, IdempotencyKey::from_header_values(kept), "Caller::identify on {data:?}");
}

/// `key` as an sf-String: quoted, with `"` and `\` escaped.
fn sf_string(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    out.push('"');
    for c in key.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn trim(data: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = data.iter().take_while(|b| is_ows(b)).count();
    let rest = &data[start..];
    let end = rest.len() - rest.iter().rev().take_while(|b| is_ows(b)).count();
    &rest[..end]
}

/// The rules, written from the protocol's description rather than from the parser: strip
/// spaces and tabs around the value; a value that opens with `"` is an sf-String (RFC 8941
/// 3.3.3: printable ASCII and space between the quotes, `\` escapes only `"` and `\`, nothing
/// after the closing quote), any other value is taken as it is and must be visible ASCII; the
/// key is 1 to 255 characters.
fn reference(data: &[u8]) -> Result<String, ()> {
    let value = std::str::from_utf8(trim(data)).map_err(|_| ())?;
    let key = match value.strip_prefix('"') {
        Some(quoted) => {
            let mut key = String::new();
            let mut chars = quoted.chars();
            loop {
                match chars.next().ok_or(())? {
                    '\\' => match chars.next() {
                        Some(c @ ('"' | '\\')) => key.push(c),
                        _ => return Err(()),
                    },
                    '"' => break,
                    c @ ' '..='~' => key.push(c),
                    _ => return Err(()),
                }
            }
            if chars.next().is_some() {
                return Err(());
            }
            key
        }
        None if value.chars().all(|c| c.is_ascii_graphic()) => value.to_owned(),
        None => return Err(()),
    };
    if key.is_empty() || key.len() > 255 {
        return Err(());
    }
    Ok(key)
}
