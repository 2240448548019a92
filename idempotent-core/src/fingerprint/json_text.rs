//! Canonical JSON straight from a body's text, keeping every number's exact decimal value.
//!
//! A JSON body whose numbers have at most 17 significant digits (all a double carries), or are
//! integers that fit an `i64`/`u64`, canonicalises exactly as
//! [`canonical_json`](super::canonical_json) does for its `serde_json::Value`: RFC 8785. A number
//! written with more significant digits than that (an amount of an application on
//! arbitrary-precision decimals: `12345678901234567891.25` and `12345678901234567891.26` are one
//! double), or beyond a double's range, is kept apart instead: it is written as its exact decimal
//! value, normalised (`d.ddd…e±n`, no leading or trailing zeros), so two spellings of one value
//! agree and two values never do; such a form has more than 17 significant digits (or an exponent
//! beyond 308), so it never equals an RFC 8785 form.
//!
//! The grammar is RFC 8259's, as strict as serde_json's (which deserializes the body for the
//! handler): text that this parser refuses, serde_json refuses too, and the body is then
//! fingerprinted as bytes. A repeated object key keeps its last value, as serde_json does.

use std::fmt::Write as _;

/// How deeply arrays and objects may nest: serde_json's own limit.
const MAX_DEPTH: usize = 128;

/// The canonical JSON of `text`, or `None` when it is not one JSON value.
pub(crate) fn canonical(text: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(text).ok()?;
    let mut parser = Parser { text: text.as_bytes(), at: 0 };
    parser.space();
    let value = parser.value(0)?;
    parser.space();
    if parser.at != parser.text.len() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    write(&value, &mut out);
    Some(out)
}

enum Json<'a> {
    Null,
    Bool(bool),
    Number(&'a str),
    String(String),
    Array(Vec<Json<'a>>),
    Object(Vec<(String, Json<'a>)>),
}

struct Parser<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, literal: &[u8]) -> Option<()> {
        self.text[self.at..].starts_with(literal).then(|| self.at += literal.len())
    }

    fn value(&mut self, depth: usize) -> Option<Json<'a>> {
        match self.peek()? {
            b'n' => self.eat(b"null").map(|()| Json::Null),
            b't' => self.eat(b"true").map(|()| Json::Bool(true)),
            b'f' => self.eat(b"false").map(|()| Json::Bool(false)),
            b'"' => self.string().map(Json::String),
            b'[' if depth < MAX_DEPTH => {
                self.at += 1;
                let mut items = Vec::new();
                self.space();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Some(Json::Array(items));
                }
                loop {
                    self.space();
                    items.push(self.value(depth + 1)?);
                    self.space();
                    match self.peek()? {
                        b',' => self.at += 1,
                        b']' => {
                            self.at += 1;
                            return Some(Json::Array(items));
                        }
                        _ => return None,
                    }
                }
            }
            b'{' if depth < MAX_DEPTH => {
                self.at += 1;
                let mut entries = Vec::new();
                self.space();
                if self.peek() == Some(b'}') {
                    self.at += 1;
                    return Some(Json::Object(entries));
                }
                loop {
                    self.space();
                    if self.peek()? != b'"' {
                        return None;
                    }
                    let key = self.string()?;
                    self.space();
                    self.eat(b":")?;
                    self.space();
                    entries.push((key, self.value(depth + 1)?));
                    self.space();
                    match self.peek()? {
                        b',' => self.at += 1,
                        b'}' => {
                            self.at += 1;
                            return Some(Json::Object(entries));
                        }
                        _ => return None,
                    }
                }
            }
            b'-' | b'0'..=b'9' => self.number().map(Json::Number),
            _ => None,
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<&'a str> {
        let start = self.at;
        let digits = |p: &mut Self| {
            let from = p.at;
            while matches!(p.peek(), Some(b'0'..=b'9')) {
                p.at += 1;
            }
            p.at - from
        };
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => {
                digits(self);
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if digits(self) == 0 {
                return None;
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if digits(self) == 0 {
                return None;
            }
        }
        // The text is valid UTF-8 and a number is ASCII.
        std::str::from_utf8(&self.text[start..self.at]).ok()
    }

    fn string(&mut self) -> Option<String> {
        self.at += 1; // the opening quote
        let mut out = String::new();
        loop {
            let run = self.at;
            while matches!(self.peek(), Some(b) if b != b'"' && b != b'\\' && b >= 0x20) {
                self.at += 1;
            }
            out.push_str(std::str::from_utf8(&self.text[run..self.at]).ok()?);
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(out);
                }
                b'\\' => {
                    self.at += 1;
                    let c = match self.peek()? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            self.at += 1;
                            let high = self.hex4()?;
                            let c = match high {
                                0xD800..=0xDBFF => {
                                    self.eat(b"\\u")?;
                                    let low = self.hex4()?;
                                    if !(0xDC00..=0xDFFF).contains(&low) {
                                        return None;
                                    }
                                    char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))?
                                }
                                0xDC00..=0xDFFF => return None,
                                _ => char::from_u32(high)?,
                            };
                            out.push(c);
                            continue;
                        }
                        _ => return None,
                    };
                    self.at += 1;
                    out.push(c);
                }
                // A control character inside a string.
                _ => return None,
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.text.get(self.at..self.at + 4)?;
        let value = u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()?;
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        self.at += 4;
        Some(value)
    }
}

fn write(value: &Json<'_>, out: &mut String) {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(text) => write_number(text, out),
        Json::String(s) => super::write_string(s, out),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out);
            }
            out.push(']');
        }
        Json::Object(entries) => {
            // The last of a repeated key wins, then keys sort by UTF-16 code units (RFC 8785).
            let mut kept: Vec<&(String, Json<'_>)> = Vec::with_capacity(entries.len());
            for (i, entry) in entries.iter().enumerate() {
                if !entries[i + 1..].iter().any(|(k, _)| *k == entry.0) {
                    kept.push(entry);
                }
            }
            kept.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (key, value)) in kept.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                super::write_string(key, out);
                out.push(':');
                write(value, out);
            }
            out.push('}');
        }
    }
}

/// Significant digits a double carries: beyond them, two values can be one double.
const DOUBLE_DIGITS: usize = 17;

/// A number's canonical form: what its `serde_json` value gives (RFC 8785) for a number a double
/// or an integer holds, else its exact value (see the module docs).
fn write_number(text: &str, out: &mut String) {
    let exact = Decimal::parse(text);
    let plain = !text.contains(['.', 'e', 'E']);
    if plain {
        if let Ok(i) = text.parse::<i64>() {
            let _ = write!(out, "{i}");
            return;
        }
        if let Ok(u) = text.parse::<u64>() {
            let _ = write!(out, "{u}");
            return;
        }
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() && exact.digits.len() <= DOUBLE_DIGITS => super::write_f64(f, out),
        _ => exact.write(out),
    }
}

/// A decimal number's exact value: sign, significant digits (no leading or trailing zeros) and
/// the power of ten of the last digit. Zero has no digits and no sign.
#[derive(Debug, PartialEq, Eq)]
struct Decimal {
    negative: bool,
    digits: String,
    exponent: i64,
}

impl Decimal {
    /// Reads a JSON number's text (or a canonical form's, which may say `e+21`).
    fn parse(text: &str) -> Self {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], rest[at + 1..].parse::<i64>().unwrap_or_else(|_| saturated(&rest[at + 1..]))),
            None => (rest, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all = format!("{int}{frac}");
        let mut exponent = exponent.saturating_sub(frac.len() as i64);
        let trimmed = all.trim_start_matches('0');
        let digits = trimmed.trim_end_matches('0');
        exponent = exponent.saturating_add((trimmed.len() - digits.len()) as i64);
        if digits.is_empty() {
            return Self { negative: false, digits: String::new(), exponent: 0 };
        }
        Self { negative, digits: digits.to_owned(), exponent }
    }

    /// `-d.ddde+n`: the first digit, the others after a point, and the power of ten of the first.
    fn write(&self, out: &mut String) {
        if self.digits.is_empty() {
            out.push('0');
            return;
        }
        if self.negative {
            out.push('-');
        }
        let (first, rest) = self.digits.split_at(1);
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let power = self.exponent.saturating_add(rest.len() as i64);
        let _ = write!(out, "e{}{}", if power < 0 { '-' } else { '+' }, power.unsigned_abs());
    }
}

/// An exponent too large for an `i64`: its sign decides which end it saturates at.
fn saturated(text: &str) -> i64 {
    if text.starts_with('-') {
        i64::MIN / 2
    } else {
        i64::MAX / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(text: &str) -> String {
        canonical(text.as_bytes()).unwrap_or_else(|| panic!("not JSON: {text}"))
    }

    #[test]
    fn numbers_beyond_a_double_keep_their_exact_value() {
        // Two amounts that one double cannot tell apart.
        let a = canon(r#"{"amount": 12345678901234567891.25}"#);
        let b = canon(r#"{"amount": 12345678901234567891.26}"#);
        assert_ne!(a, b);
        assert_eq!(a, r#"{"amount":1.234567890123456789125e+19}"#);
        // One value, several spellings.
        assert_eq!(canon("12345678901234567891.250"), canon("1234567890123456789125e-2"));
        assert_eq!(canon("123456789012345678901234567890"), canon("1.2345678901234567890123456789e29"));
        assert_ne!(canon("123456789012345678901234567890"), canon("123456789012345678901234567891"));
        assert_eq!(canon("1e400"), "1e+400", "beyond a double's range");
        // 17 significant digits are a double's: RFC 8785, as serde_json reads it.
        assert_eq!(canon("333333333.33333329"), "333333333.3333333");
        assert_ne!(canon("1e400"), canon("1e401"));
        // Numbers a double states exactly keep RFC 8785's form.
        for (text, canonical) in [
            ("1000", "1000"),
            ("1e3", "1000"),
            ("1000.0", "1000"),
            ("0.1", "0.1"),
            ("-0", "0"),
            ("-0.0", "0"),
            ("1E30", "1e+30"),
            ("4.50", "4.5"),
            ("2e-3", "0.002"),
            ("18446744073709551615", "18446744073709551615"),
        ] {
            assert_eq!(canon(text), canonical, "{text}");
        }
    }

    #[test]
    fn it_agrees_with_serde_json_where_numbers_fit() {
        for text in [
            r#"{"b": [1, 2.5, {"z": null, "a": true}], "a": "x\u00e9\n", "c": -3e-7}"#,
            r#"[333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001]"#,
            r#"{"k": 1, "k": 2}"#,
            r#""\ud83d\ude00 and \u00e9""#,
            "9007199254740993",
        ] {
            let value: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(canon(text), super::super::canonical_json(&value), "{text}");
        }
    }

    #[test]
    fn what_serde_json_refuses_is_refused() {
        for text in [
            "",
            "01",
            "1.",
            ".5",
            "1e",
            "-",
            "[1,]",
            "{\"a\" 1}",
            "\"\\x\"",
            "\"\\ud800\"",
            "\"a\u{1}\"",
            "nul",
            "1 2",
            "{\"a\":1,}",
        ] {
            assert!(serde_json::from_str::<serde_json::Value>(text).is_err(), "{text:?}");
            assert!(canonical(text.as_bytes()).is_none(), "{text:?}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(canonical(deep.as_bytes()).is_none(), "nesting beyond serde_json's limit");
    }
}
