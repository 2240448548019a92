//! The duration parser of the `#[idempotent]` attribute (`ttl = "24h"`, `lease = "10s"`), the
//! file `idempotent-macros/src/duration.rs` itself: a proc-macro crate cannot be a dependency,
//! and the parser needs only `std`.
//!
//! The input is the text of the literal. Checked:
//! - nothing panics or overflows (the targets build with overflow checks);
//! - an accepted duration is more than zero milliseconds;
//! - it agrees with [`reference`], an independent reading of the grammar (accept or reject, and
//!   the same milliseconds; a total beyond `u64` milliseconds is `Overflow`, nothing else);
//! - rendered in canonical units (largest first, zero units left out, `1d2h3m4s5ms`), an
//!   accepted duration parses again to the same milliseconds, and renders the same;
//! - every error has a message.
#![no_main]

#[allow(dead_code)]
#[path = "../../../idempotent-macros/src/duration.rs"]
mod duration;

use duration::{parse, DurationError, Millis};
use libfuzzer_sys::fuzz_target;

const UNITS: [(&str, u64); 5] = [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = parse(text);
    let expected = reference(text);
    match (&parsed, &expected) {
        (Ok(Millis(ms)), Ok(want)) => {
            assert_eq!(ms, want, "{text:?}");
            assert!(*ms > 0, "{text:?} was accepted as zero");
            let canonical = render(*ms);
            assert_eq!(parse(&canonical), Ok(Millis(*ms)), "{text:?} renders as {canonical:?}");
            assert_eq!(render(parse(&canonical).unwrap().0), canonical);
        }
        (Err(e), Err(reason)) => {
            assert!(!e.to_string().is_empty());
            match reason {
                Reason::Zero => assert_eq!(e, &DurationError::Zero, "{text:?}"),
                Reason::Overflow => assert_eq!(e, &DurationError::Overflow, "{text:?}"),
                Reason::Invalid => assert!(!matches!(e, DurationError::Zero), "{text:?} is not a zero duration"),
            }
        }
        _ => panic!("the parser and the reference disagree on {text:?}: {parsed:?} vs {expected:?}"),
    }
});

/// `ms` in canonical units.
fn render(ms: u64) -> String {
    let mut rest = ms;
    let mut out = String::new();
    for (unit, size) in UNITS {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

#[derive(Debug)]
enum Reason {
    /// Not a duration: empty, a term without number or unit, an unknown unit, units out of order.
    Invalid,
    /// Every term is valid and the total is zero.
    Zero,
    /// Every term is valid and the total is more than `u64::MAX` milliseconds.
    Overflow,
}

/// The grammar read whole, then summed in `u128`: one or more terms, a term is ASCII digits then
/// a unit (`d`, `h`, `m`, `s`, `ms`), units strictly from larger to smaller.
fn reference(text: &str) -> Result<u64, Reason> {
    let bytes = text.as_bytes();
    let mut terms: Vec<(&str, usize)> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let number = &text[start..i];
        let unit_start = i;
        while i < bytes.len() && !bytes[i].is_ascii_digit() {
            i += 1;
        }
        let unit = &text[unit_start..i];
        let index = UNITS.iter().position(|(u, _)| *u == unit).ok_or(Reason::Invalid)?;
        if number.is_empty() || terms.last().is_some_and(|(_, last)| *last >= index) {
            return Err(Reason::Invalid);
        }
        terms.push((number, index));
    }
    if terms.is_empty() {
        return Err(Reason::Invalid);
    }
    let mut total: u128 = 0;
    for (number, index) in terms {
        let digits = number.trim_start_matches('0');
        if digits.len() > 20 {
            return Err(Reason::Overflow);
        }
        let value: u128 = if digits.is_empty() { 0 } else { digits.parse().expect("at most 20 digits fit in u128") };
        total += value * u128::from(UNITS[index].1);
    }
    match u64::try_from(total) {
        Ok(0) => Err(Reason::Zero),
        Ok(ms) => Ok(ms),
        Err(_) => Err(Reason::Overflow),
    }
}
