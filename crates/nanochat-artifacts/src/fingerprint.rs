//! Stage fingerprints: everything that determines a stage's output, hashed into its key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{canonical_json, ObjectId, StageKey};

/// Version of the fingerprint schema; bump it to invalidate every cached stage at once.
pub const FINGERPRINT_SCHEMA: u32 = 1;

/// The inputs of the action cache's key function. No absolute paths appear here, so the same
/// work on another machine or checkout has the same key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageFingerprint {
    /// Stage name in the pipeline.
    pub stage: String,
    /// Identity of the stage executable: `sha256:<hex of the file>`.
    pub binary: String,
    /// The resolved config (TOML converted to JSON).
    pub config: Value,
    /// Input name → object id.
    pub inputs: BTreeMap<String, ObjectId>,
    /// Extra environment variables the pipeline sets for the stage.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// [`FINGERPRINT_SCHEMA`].
    pub schema: u32,
    /// Number of ranks the stage runs as (data-parallel training): the reduction order and
    /// each rank's data slice depend on it. Left out of the JSON for one rank, so single-process
    /// stages keep the keys they had before multi-rank stages existed.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub world_size: u32,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl StageFingerprint {
    /// As a JSON value.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// sha256 of the canonical JSON of this fingerprint.
    pub fn key(&self) -> StageKey {
        StageKey::of_bytes(&canonical_json(&self.to_value()))
    }

    /// Human-readable reasons why this fingerprint differs from `previous` (a stored one).
    pub fn explain_change(&self, previous: &Value) -> Vec<String> {
        let Ok(prev) = serde_json::from_value::<StageFingerprint>(previous.clone()) else {
            return vec!["fingerprint format changed".into()];
        };
        let mut why = Vec::new();
        if prev.schema != self.schema {
            why.push(format!(
                "fingerprint schema changed ({} -> {})",
                prev.schema, self.schema
            ));
        }
        if prev.binary != self.binary {
            why.push("stage binary changed (executable hash differs)".into());
        }
        let mut cfg = Vec::new();
        diff_values("", &prev.config, &self.config, &mut cfg);
        if !cfg.is_empty() {
            why.push(format!("config changed: {}", cfg.join(", ")));
        }
        for (name, id) in &self.inputs {
            match prev.inputs.get(name) {
                None => why.push(format!("input {name} added")),
                Some(old) if old != id => why.push(format!(
                    "input {name} changed ({} -> {})",
                    old.short(),
                    id.short()
                )),
                Some(_) => {}
            }
        }
        for name in prev.inputs.keys() {
            if !self.inputs.contains_key(name) {
                why.push(format!("input {name} removed"));
            }
        }
        if prev.env != self.env {
            why.push("env changed".into());
        }
        if prev.world_size != self.world_size {
            why.push(format!(
                "ranks changed ({} -> {})",
                prev.world_size, self.world_size
            ));
        }
        if prev.stage != self.stage {
            why.push(format!("stage renamed ({} -> {})", prev.stage, self.stage));
        }
        if why.is_empty() {
            why.push("fingerprint changed".into());
        }
        why
    }
}

fn short_json(v: Option<&Value>) -> String {
    match v {
        None => "unset".into(),
        Some(v) => {
            let s = String::from_utf8_lossy(&canonical_json(v)).into_owned();
            if s.chars().count() > 40 {
                format!("{}…", s.chars().take(40).collect::<String>())
            } else {
                s
            }
        }
    }
}

fn diff_values(prefix: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff_values(&path, x, y, out),
                    (x, y) => out.push(format!("{path} ({} -> {})", short_json(x), short_json(y))),
                }
            }
        }
        (a, b) if a != b => {
            let path = if prefix.is_empty() { "<root>" } else { prefix };
            out.push(format!(
                "{path} ({} -> {})",
                short_json(Some(a)),
                short_json(Some(b))
            ));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fp() -> StageFingerprint {
        StageFingerprint {
            stage: "pretrain".into(),
            binary: "sha256:00".into(),
            config: json!({"steps": 3, "opt": {"lr": 0.1}}),
            inputs: [("tok".to_string(), ObjectId::of_bytes(b"t"))].into(),
            env: BTreeMap::new(),
            schema: FINGERPRINT_SCHEMA,
            world_size: 1,
        }
    }

    #[test]
    fn key_is_stable_and_sensitive_to_every_field() {
        let a = fp();
        assert_eq!(a.key(), fp().key());
        let mut variants = Vec::new();
        let mut b = fp();
        b.stage = "sft".into();
        variants.push(b);
        let mut b = fp();
        b.binary = "sha256:01".into();
        variants.push(b);
        let mut b = fp();
        b.config = json!({"steps": 4, "opt": {"lr": 0.1}});
        variants.push(b);
        let mut b = fp();
        b.inputs.insert("data".into(), ObjectId::of_bytes(b"d"));
        variants.push(b);
        let mut b = fp();
        b.env.insert("X".into(), "1".into());
        variants.push(b);
        let mut b = fp();
        b.schema += 1;
        variants.push(b);
        let mut b = fp();
        b.world_size = 2;
        variants.push(b);
        for v in variants {
            assert_ne!(v.key(), a.key(), "{v:?}");
        }
    }

    #[test]
    fn explains_what_changed() {
        let old = fp().to_value();
        let mut new = fp();
        new.config = json!({"steps": 4, "opt": {"lr": 0.1, "wd": 0}});
        new.inputs.insert("tok".into(), ObjectId::of_bytes(b"u"));
        new.inputs.insert("data".into(), ObjectId::of_bytes(b"d"));
        new.binary = "sha256:ff".into();
        let why = new.explain_change(&old).join("; ");
        assert!(
            why.contains("config changed: opt.wd (unset -> 0), steps (3 -> 4)"),
            "{why}"
        );
        assert!(why.contains("input tok changed"), "{why}");
        assert!(why.contains("input data added"), "{why}");
        assert!(why.contains("stage binary changed"), "{why}");
        assert_eq!(
            fp().explain_change(&json!({"bogus": 1})),
            ["fingerprint format changed"]
        );
        assert_eq!(fp().explain_change(&old), ["fingerprint changed"]);
        let mut gone = fp();
        gone.inputs.clear();
        gone.env.insert("A".into(), "b".into());
        gone.stage = "x".into();
        gone.schema = 9;
        let why = gone.explain_change(&old).join("; ");
        for s in [
            "input tok removed",
            "env changed",
            "stage renamed",
            "schema changed",
        ] {
            assert!(why.contains(s), "{why}");
        }
    }
}
