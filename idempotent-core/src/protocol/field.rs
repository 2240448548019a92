//! Declared body fields, added to a fingerprint by generated code.
//!
//! `(&Field(&value)).add_to(builder, name)` picks, at compile time, how a field is fingerprinted:
//! a `HashSet` or `BTreeSet` as a set (its elements' encodings sorted, so a `HashSet`'s random
//! iteration order never makes an identical retry a 422), anything else as its canonical JSON.
//! The choice is made by method resolution (the `&self` impl for sets is found before the
//! auto-referenced one for everything else), so it needs no specialization.

use crate::fingerprint::{FingerprintBuilder, FingerprintError};
use crate::key::KeyError;
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

/// The values of the body fields a key is made of (`key = field(..)`), in order, collected by
/// generated code with [`KeyField::key_part`].
#[derive(Debug, Default, Clone)]
pub struct KeyParts(pub Vec<String>);

/// Adds a field's value to a key: a string as it is, a number or a boolean as its canonical
/// JSON, an object or array as its canonical JSON; null (an absent `Option`) or an empty string
/// is [`KeyError::FieldMissing`].
pub trait KeyField<T: ?Sized> {
    /// `parts` with this field's value added.
    fn key_part(&self, parts: KeyParts, name: &str) -> Result<KeyParts, KeyError>
    where
        T: Serialize;
}

impl<T: ?Sized> KeyField<T> for Field<'_, T> {
    fn key_part(&self, mut parts: KeyParts, name: &str) -> Result<KeyParts, KeyError>
    where
        T: Serialize,
    {
        let value = match serde_json::to_value(self.0) {
            Ok(serde_json::Value::String(s)) => s,
            Ok(serde_json::Value::Null) | Err(_) => String::new(),
            Ok(other) => crate::fingerprint::canonical_json(&other),
        };
        if value.is_empty() {
            return Err(KeyError::FieldMissing(name.to_owned()));
        }
        parts.0.push(value);
        Ok(parts)
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
    fn key_parts_are_values_and_a_missing_one_is_named() {
        use super::{KeyField as _, KeyParts};
        let parts = Field(&"evt_1").key_part(KeyParts::default(), "id").unwrap();
        let parts = Field(&42u64).key_part(parts, "n").unwrap();
        assert_eq!(parts.0, ["evt_1", "42"]);
        let missing = Field(&None::<String>).key_part(KeyParts::default(), "event.id").unwrap_err();
        assert_eq!(missing, crate::key::KeyError::FieldMissing("event.id".into()));
        assert!(Field(&"").key_part(KeyParts::default(), "id").is_err());
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
