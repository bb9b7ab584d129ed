//! Content addresses: object ids, stage keys, and the canonical JSON they are computed from.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::error::Error;

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

macro_rules! digest_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Wraps a hex sha256 string, checking its form.
            pub fn new(hex: impl Into<String>) -> Result<Self, Error> {
                let s = hex.into();
                if is_sha256_hex(&s) {
                    Ok(Self(s))
                } else {
                    Err(Error::InvalidObjectId(s))
                }
            }
            /// The sha256 of `bytes`.
            pub fn of_bytes(bytes: &[u8]) -> Self {
                Self(crate::sha256_hex(bytes))
            }
            /// The 64 hex digits.
            pub fn as_str(&self) -> &str {
                &self.0
            }
            /// The first 12 hex digits, for humans.
            pub fn short(&self) -> &str {
                &self.0[..12]
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }
        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::new(s.trim())
            }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

digest_newtype!(
    /// The address of an object: sha256 (hex) of its canonical manifest bytes.
    ObjectId
);
digest_newtype!(
    /// The address of a stage execution: sha256 (hex) of its canonical fingerprint.
    StageKey
);

/// Serializes a JSON value canonically: object keys sorted by their UTF-8 bytes, no
/// insignificant whitespace, serde_json's number and string escaping.
///
/// Sorting is done here rather than relying on `serde_json::Map` being a `BTreeMap`, because a
/// feature elsewhere in the build (`preserve_order`) would silently change that.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(k.clone()), out);
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Vec<u8>) {
    // Serializing a scalar `Value` into a Vec cannot fail.
    if let Ok(bytes) = serde_json::to_vec(value) {
        out.extend_from_slice(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_nested_keys_and_is_compact() {
        let v = json!({"b": 1, "a": {"z": [3, {"y": true, "x": null}], "c": "é\n"}});
        assert_eq!(
            String::from_utf8(canonical_json(&v)).unwrap(),
            r#"{"a":{"c":"é\n","z":[3,{"x":null,"y":true}]},"b":1}"#
        );
    }

    #[test]
    fn ids_validate_and_round_trip() {
        let id = ObjectId::of_bytes(b"abc");
        assert_eq!(id.short(), "ba7816bf8f01");
        let parsed: ObjectId = format!(" {id}\n").parse().unwrap();
        assert_eq!(parsed, id);
        assert!(ObjectId::new("ABC").is_err());
        assert!(ObjectId::new("g".repeat(64)).is_err());
        assert!(StageKey::new("A".repeat(64)).is_err());
        let j = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<ObjectId>(&j).unwrap(), id);
        assert!(serde_json::from_str::<ObjectId>("\"nope\"").is_err());
        assert!(format!("{id:?}").contains("ba7816bf8f01"));
        assert_eq!(id.as_str().len(), 64);
    }
}
