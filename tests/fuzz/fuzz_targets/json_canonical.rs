//! The RFC 8785 JSON canonicaliser (`fingerprint::canonical_json`) and the raw-body fingerprint
//! of JSON media types.
//!
//! The input is a request body. Checked, for every input that parses as JSON:
//! - the canonical output parses back to a value equal to the input's (integers exactly, other
//!   numbers as doubles, the canonicaliser's definition of a number's value);
//! - canonicalising the output again gives the same bytes;
//! - the output is what [`reference`] writes: a small independent RFC 8785 serializer whose
//!   numbers come from the standard library's shortest float formatting rearranged by
//!   ECMAScript's `Number.prototype.toString` rules (a differential check of the number
//!   spelling, the string escapes and the UTF-16 key order);
//! - the canonical form of its text (`canonical_json_text`, which keeps numbers with more digits
//!   than a double carries exact) is a fixed point, reads back as the same doubles as the
//!   value's, and is the value's canonical form unless the text has such a number;
//! - the fingerprint of the body and of its text's canonical form is one (`raw_body` under every
//!   JSON media type), and `body` of the value and of its canonical form is one.
//!
//! What serde_json reads, the text's parser reads; the one thing it reads beyond that is a number
//! out of a double's range, kept exact. For every other input: fingerprinting it under a JSON media type does not panic and is the
//! fingerprint of the same bytes under a media type that is not JSON.
#![no_main]

use idempotent_core::fingerprint::{canonical_json, canonical_json_text, Fingerprint, FingerprintBuilder};
use libfuzzer_sys::fuzz_target;
use serde_json::{Number, Value};
use std::fmt::Write as _;

const JSON_TYPES: [&str; 3] = ["application/json", "Application/JSON; charset=utf-8", "application/problem+json"];

fuzz_target!(|data: &[u8]| {
    let fp = |content_type: &str, bytes: &[u8]| -> Fingerprint {
        FingerprintBuilder::new("s").raw_body(Some(content_type), bytes).finish()
    };
    let text_form = canonical_json_text(data);
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        if let Some(text_form) = text_form {
            // Only a number beyond a double's range, which serde_json refuses (without its
            // arbitrary_precision feature), is JSON to the text parser alone: it is kept exact.
            assert!(has_long_number(data), "the text parser read what serde_json refuses: {text_form:?}");
            for content_type in JSON_TYPES {
                assert_eq!(fp(content_type, data), fp(content_type, text_form.as_bytes()), "{content_type}");
            }
            return;
        }
        // Not JSON: kept as the bytes they are.
        let as_bytes = fp("text/plain", data);
        for content_type in JSON_TYPES {
            if data.is_empty() {
                assert_eq!(fp(content_type, data), FingerprintBuilder::new("s").raw_body(None, b"").finish());
            } else {
                assert_eq!(fp(content_type, data), as_bytes, "non-JSON under {content_type}");
            }
        }
        return;
    };

    let canonical = canonical_json(&value);
    let back: Value = serde_json::from_str(&canonical)
        .unwrap_or_else(|e| panic!("the canonical form {canonical:?} does not parse: {e}"));
    assert!(same_value(&value, &back), "{canonical:?} is not the value of the input");
    assert_eq!(canonical_json(&back), canonical, "canonicalising twice changed the output");
    assert_eq!(canonical, reference(&value), "the canonicaliser and the reference disagree");

    let text_form = text_form.expect("the text parser refused what serde_json reads");
    assert_eq!(canonical_json_text(text_form.as_bytes()).as_deref(), Some(text_form.as_str()), "not a fixed point");
    let as_doubles: Value = serde_json::from_str(&text_form).expect("the text's canonical form parses");
    assert_eq!(canonical_json(&as_doubles), canonical, "{text_form:?} is not the value of the input");
    if text_form != canonical {
        assert!(has_long_number(data), "{text_form:?} differs from {canonical:?} with no long number");
    }
    for content_type in JSON_TYPES {
        assert_eq!(fp(content_type, data), fp(content_type, text_form.as_bytes()), "{content_type}");
        if text_form == canonical {
            assert_eq!(fp(content_type, data), fp(content_type, canonical.as_bytes()), "{content_type}");
        }
    }
    assert_ne!(fp("application/json", data), fp("text/plain", data), "JSON was fingerprinted as bytes");
    let body = |v: &Value| FingerprintBuilder::new("s").body(v).map(FingerprintBuilder::finish).ok();
    assert_eq!(body(&value), body(&back));
    assert!(body(&value).is_some());
});

/// Whether `data` has a number with more than 17 significant digits, or an exponent that takes
/// it out of a double's range (where the text's canonical form keeps the exact decimal).
fn has_long_number(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    let mut in_string = false;
    let mut escaped = false;
    let mut number = String::new();
    let mut long = false;
    for c in text.chars().chain(std::iter::once(' ')) {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E') {
            number.push(c);
            continue;
        }
        if !number.is_empty() {
            let (mantissa, exponent) = number.split_once(['e', 'E']).unwrap_or((&number, "0"));
            let digits = mantissa.trim_start_matches('-').replace('.', "");
            let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
            let exponent: i64 = exponent.parse().unwrap_or(i64::MAX);
            long |= significant > 17 || exponent.unsigned_abs() > 290;
            number.clear();
        }
        in_string = c == '"';
    }
    long
}

/// Whether two values are the same JSON value: numbers that are both exact integers compare
/// exactly, any other numbers as doubles; objects regardless of key order.
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

/// RFC 8785 written independently of the library, with the library's documented deviation for
/// integers (an exact integer, or an integral double within the `i64`/`u64` range, prints its
/// exact decimal).
fn reference(value: &Value) -> String {
    let mut out = String::new();
    write_value(value, &mut out);
    out
}

fn write_value(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(&b.to_string()),
        Value::Number(n) => out.push_str(&number(n)),
        Value::String(s) => write_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<(Vec<u16>, &String)> = map.keys().map(|k| (k.encode_utf16().collect(), k)).collect();
            keys.sort();
            out.push('{');
            for (i, (_, key)) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_str(key, out);
                out.push(':');
                write_value(&map[key.as_str()], out);
            }
            out.push('}');
        }
    }
}

/// RFC 8785 section 3.2.2.2.
fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        let short = match c {
            '"' => Some('"'),
            '\\' => Some('\\'),
            '\u{8}' => Some('b'),
            '\u{c}' => Some('f'),
            '\n' => Some('n'),
            '\r' => Some('r'),
            '\t' => Some('t'),
            _ => None,
        };
        match short {
            Some(letter) => {
                out.push('\\');
                out.push(letter);
            }
            None if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).unwrap(),
            None => out.push(c),
        }
    }
    out.push('"');
}

fn number(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().expect("without arbitrary_precision every number is an i64, u64 or f64");
    if f.fract() == 0.0 {
        if f >= -(2f64.powi(63)) && f < 2f64.powi(63) {
            return (f as i64).to_string();
        }
        if f >= 0.0 && f < 2f64.powi(64) {
            return (f as u64).to_string();
        }
    }
    ecmascript(f)
}

/// ECMAScript's Number::toString (ECMA-262, 6.1.6.1.20) for a finite double: the fewest digits
/// that read back as `f` (their count from Rust's shortest `{:e}`), and of those the ones
/// closest to `f`'s exact value, ties to even (Rust's `{:.Ne}` rounds the exact value so; its
/// shortest form does not promise the closest: 2212121411179984.25 is `...984.3` there, `...984.2`
/// in ECMAScript).
fn ecmascript(f: f64) -> String {
    if f == 0.0 {
        return "0".to_owned();
    }
    let shortest = format!("{:e}", f.abs());
    let count = shortest.split('e').next().unwrap_or_default().chars().filter(char::is_ascii_digit).count();
    let nearest = format!("{:.*e}", count - 1, f.abs());
    let sci = if nearest.parse::<f64>() == Ok(f.abs()) { nearest } else { shortest };
    let (mantissa, exponent) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let k = digits.len() as i32;
    let n = exponent.parse::<i32>().expect("an integer exponent") + 1;
    let sign = if f < 0.0 { "-" } else { "" };
    let body = if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat((-n) as usize))
    } else {
        let e = n - 1;
        let e = if e >= 0 { format!("+{e}") } else { e.to_string() };
        if k == 1 {
            format!("{digits}e{e}")
        } else {
            format!("{}.{}e{e}", &digits[..1], &digits[1..])
        }
    };
    format!("{sign}{body}")
}
