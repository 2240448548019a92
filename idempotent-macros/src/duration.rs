//! Compile-time durations: `"500ms"`, `"90s"`, `"15m"`, `"24h"`, `"7d"` and combinations such as
//! `"1h30m"`.
//!
//! Durations are parsed here, not at run time, so the policy the macro emits is a constant and a
//! typo is a compile error at the literal rather than a start-up failure.

use std::fmt;

/// A duration parsed from an attribute value, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Millis(pub(crate) u64);

/// Why a duration literal was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DurationError {
    Empty,
    MissingNumber {
        at: String,
    },
    MissingUnit {
        number: String,
    },
    UnknownUnit {
        unit: String,
    },
    /// Units must go from largest to smallest, each at most once (`1h30m`, not `30m1h`).
    OutOfOrder {
        unit: &'static str,
    },
    Overflow,
    Zero,
}

/// Units by decreasing size, with their length in milliseconds.
const UNITS: [(&str, u64); 5] =
    [("d", 24 * 60 * 60 * 1000), ("h", 60 * 60 * 1000), ("m", 60 * 1000), ("s", 1000), ("ms", 1)];

const EXAMPLES: &str = "e.g. \"24h\", \"15m\", \"90s\", \"500ms\" or \"1h30m\"";

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DurationError::Empty => write!(f, "is empty; write a duration, {EXAMPLES}"),
            DurationError::MissingNumber { at } => write!(f, "expects a number before `{at}`, {EXAMPLES}"),
            DurationError::MissingUnit { number } => {
                write!(f, "has no unit after `{number}`; write e.g. \"{number}s\" (units: d, h, m, s, ms)")
            }
            DurationError::UnknownUnit { unit } => {
                write!(f, "has an unknown unit `{unit}`; expected one of d, h, m, s, ms")
            }
            DurationError::OutOfOrder { unit } => {
                write!(f, "repeats or misorders the unit `{unit}`; write units from largest to smallest, each once, e.g. \"1h30m\"")
            }
            DurationError::Overflow => f.write_str("is too large"),
            DurationError::Zero => f.write_str("must be greater than zero"),
        }
    }
}

/// Parses `text` as a non-zero duration.
pub(crate) fn parse(text: &str) -> Result<Millis, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total: u64 = 0;
    // Index into UNITS of the smallest unit seen so far; the next one must be smaller.
    let mut last_unit: Option<usize> = None;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        let unit_len = after.find(|c: char| c.is_ascii_digit()).unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        if number.is_empty() {
            return Err(DurationError::MissingNumber { at: unit.to_owned() });
        }
        if unit.is_empty() {
            return Err(DurationError::MissingUnit { number: number.to_owned() });
        }
        let Some(index) = UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(DurationError::UnknownUnit { unit: unit.to_owned() });
        };
        if last_unit.is_some_and(|last| index <= last) {
            return Err(DurationError::OutOfOrder { unit: UNITS[index].0 });
        }
        last_unit = Some(index);
        let value: u64 = number.parse().map_err(|_| DurationError::Overflow)?;
        total =
            value.checked_mul(UNITS[index].1).and_then(|ms| total.checked_add(ms)).ok_or(DurationError::Overflow)?;
        rest = next;
    }
    if total == 0 {
        return Err(DurationError::Zero);
    }
    Ok(Millis(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> u64 {
        parse(text).unwrap_or_else(|e| panic!("{text}: {e}")).0
    }

    #[test]
    fn single_units() {
        assert_eq!(ms("500ms"), 500);
        assert_eq!(ms("90s"), 90_000);
        assert_eq!(ms("15m"), 15 * 60_000);
        assert_eq!(ms("24h"), 24 * 3_600_000);
        assert_eq!(ms("7d"), 7 * 86_400_000);
    }

    #[test]
    fn combinations_add_up() {
        assert_eq!(ms("1h30m"), 90 * 60_000);
        assert_eq!(ms("1d2h3m4s5ms"), 86_400_000 + 2 * 3_600_000 + 3 * 60_000 + 4_000 + 5);
        assert_eq!(ms("1s500ms"), 1_500);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert_eq!(parse("0s"), Err(DurationError::Zero));
        assert_eq!(parse("0h0m"), Err(DurationError::Zero));
        assert_eq!(parse("10"), Err(DurationError::MissingUnit { number: "10".into() }));
        assert_eq!(parse("h"), Err(DurationError::MissingNumber { at: "h".into() }));
        assert_eq!(parse("5x"), Err(DurationError::UnknownUnit { unit: "x".into() }));
        assert_eq!(parse("1 h"), Err(DurationError::UnknownUnit { unit: " h".into() }));
        assert_eq!(parse("-1s"), Err(DurationError::MissingNumber { at: "-".into() }));
        assert_eq!(parse("30m1h"), Err(DurationError::OutOfOrder { unit: "h" }));
        assert_eq!(parse("1m1m"), Err(DurationError::OutOfOrder { unit: "m" }));
        assert_eq!(parse("99999999999999999999s"), Err(DurationError::Overflow));
        assert_eq!(parse("999999999999999d"), Err(DurationError::Overflow));
    }
}
