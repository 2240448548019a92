//! Declared body fields, added to a fingerprint by generated code.
//!
//! `(&Field(&value)).add_to(builder, name)` picks, at compile time, how a field is fingerprinted:
//! a `HashSet` or `BTreeSet` as a set (its elements' encodings sorted, so a `HashSet`'s random
//! iteration order never makes an identical retry a 422), anything else as its canonical JSON.
//! The choice is made by method resolution (the `&self` impl for sets is found before the
//! auto-referenced one for everything else), so it needs no specialization.

use crate::fingerprint::{FingerprintBuilder, FingerprintError};
use serde::Serialize;
use std::collections::{BTreeSet, HashSet};

/// A declared field's value, borrowed.
#[derive(Debug)]
pub struct Field<'a, T: ?Sized>(pub &'a T);

/// Fingerprints a set field as a set.
pub trait SetField {
    /// Adds the field to `builder`.
    fn add_to(&self, builder: FingerprintBuilder, name: &str) -> Result<FingerprintBuilder, FingerprintError>;
}

impl<T: Serialize, S> SetField for Field<'_, HashSet<T, S>> {
    fn add_to(&self, builder: FingerprintBuilder, name: &str) -> Result<FingerprintBuilder, FingerprintError> {
        builder.set_field(name, self.0.iter())
    }
}

impl<T: Serialize> SetField for Field<'_, BTreeSet<T>> {
    fn add_to(&self, builder: FingerprintBuilder, name: &str) -> Result<FingerprintBuilder, FingerprintError> {
        builder.set_field(name, self.0.iter())
    }
}

/// Fingerprints any other field as its canonical JSON.
///
/// The `Serialize` bound sits on the method rather than the impl, so a field that is not
/// `Serialize` is reported as exactly that, at the field's name in the attribute.
pub trait PlainField<T: ?Sized> {
    /// Adds the field to `builder`.
    fn add_to(&self, builder: FingerprintBuilder, name: &str) -> Result<FingerprintBuilder, FingerprintError>
    where
        T: Serialize;
}

impl<T: ?Sized> PlainField<T> for &Field<'_, T> {
    fn add_to(&self, builder: FingerprintBuilder, name: &str) -> Result<FingerprintBuilder, FingerprintError>
    where
        T: Serialize,
    {
        builder.field(name, self.0)
    }
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use super::{Field, PlainField as _, SetField as _};
    use crate::fingerprint::FingerprintBuilder;
    use std::collections::HashSet;

    // The tests call `add_to` exactly as generated code does, borrow included.
    #[test]
    #[allow(clippy::needless_borrow)]
    fn a_hash_set_field_is_the_same_whatever_its_order() {
        let fp = |items: &[&str]| {
            let set: HashSet<String> = items.iter().map(|s| s.to_string()).collect();
            (&Field(&set)).add_to(FingerprintBuilder::new("s"), "tags").unwrap().finish()
        };
        let many: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
        let forward: Vec<&str> = many.iter().map(String::as_str).collect();
        let backward: Vec<&str> = forward.iter().rev().copied().collect();
        assert_eq!(fp(&forward), fp(&backward));
        assert_ne!(fp(&["a"]), fp(&["b"]));
    }

    #[test]
    #[allow(clippy::needless_borrow)]
    fn other_fields_are_their_json() {
        let v = vec![2, 1];
        let a = (&Field(&v)).add_to(FingerprintBuilder::new("s"), "v").unwrap().finish();
        let b = FingerprintBuilder::new("s").field("v", &[2, 1]).unwrap().finish();
        assert_eq!(a, b, "a list keeps its order");
    }
}
