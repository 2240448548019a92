//! Request fingerprints.
//!
//! A fingerprint is SHA-256 over a canonical, versioned encoding of the route's scope and the
//! declared field values (or the whole body when no fields are declared). Values are encoded as
//! canonical JSON: object keys sorted by their UTF-8 bytes, no whitespace, numbers as serde_json
//! prints them. So key order and whitespace in the client's body never change a fingerprint, while
//! any change to a declared value does.
//!
//! Every part is prefixed with its length (u64, big-endian), so no two different inputs share an
//! encoding: the tag `idempotent-fingerprint/v1`, the scope, then per field `field`, its name and
//! its canonical JSON (or `body` and the whole body's canonical JSON). The encoding
//! starts with a version tag so a future change of the encoding can never collide with this one.

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt;

const VERSION_TAG: &[u8] = b"idempotent-fingerprint/v1";

/// SHA-256 of a request's canonical encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The digest as lowercase hex.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
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

/// Error raised when a declared field cannot be serialized to JSON.
#[derive(Debug, thiserror::Error)]
#[error("field `{field}` cannot be fingerprinted: {source}")]
pub struct FingerprintError {
    /// The declared field path.
    pub field: String,
    /// What serde_json said.
    #[source]
    pub source: serde_json::Error,
}

/// Builds a fingerprint incrementally: the scope first, then each declared field in declaration
/// order (or one whole-body part).
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

    /// Adds one declared field and its value.
    pub fn field<T: Serialize + ?Sized>(mut self, name: &str, value: &T) -> Result<Self, FingerprintError> {
        let value =
            serde_json::to_value(value).map_err(|source| FingerprintError { field: name.to_owned(), source })?;
        put(&mut self.hasher, b"field");
        put(&mut self.hasher, name.as_bytes());
        put(&mut self.hasher, canonical_json(&value).as_bytes());
        Ok(self)
    }

    /// Adds the whole body (used when a route declares no fields).
    pub fn body<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, FingerprintError> {
        let value =
            serde_json::to_value(value).map_err(|source| FingerprintError { field: "<body>".to_owned(), source })?;
        put(&mut self.hasher, b"body");
        put(&mut self.hasher, canonical_json(&value).as_bytes());
        Ok(self)
    }

    /// Finishes the digest.
    pub fn finish(self) -> Fingerprint {
        Fingerprint(self.hasher.finalize().into())
    }
}

fn put(hasher: &mut Sha256, part: &[u8]) {
    hasher.update((part.len() as u64).to_be_bytes());
    hasher.update(part);
}

/// Renders `value` as canonical JSON: object keys sorted, no whitespace.
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
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
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
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn fp_body(scope: &str, text: &str) -> Fingerprint {
        let v: Value = serde_json::from_str(text).unwrap();
        FingerprintBuilder::new(scope).body(&v).unwrap().finish()
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
    }

    #[test]
    fn canonical_json_sorts_and_strips() {
        assert_eq!(
            canonical_json(&json!({"b": [1, {"d": 1, "c": 2}], "a": "x y"})),
            r#"{"a":"x y","b":[1,{"c":2,"d":1}]}"#
        );
    }

    #[test]
    fn fingerprint_is_stable_across_releases() {
        // Changing this value means every stored record in production mismatches: bump the
        // version tag instead.
        let fp = FingerprintBuilder::new("payments.create").field("amount", &100).unwrap().finish();
        // SHA-256 of the documented encoding, computed independently of this crate.
        assert_eq!(fp.to_hex(), "39ab8edd7b13d5711b2c237e34a1de40002827d8e107126e3af5f023157edf98");
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-z ]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
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

    proptest! {
        #[test]
        fn permuted_keys_and_whitespace_give_the_same_fingerprint(v in arb_json(), ws in "[ \t\n]{0,3}") {
            let original = serde_json::to_string(&v).unwrap();
            let other = scrambled(&v, &ws);
            prop_assert_eq!(fp_body("scope", &original), fp_body("scope", &other));
        }
    }
}
