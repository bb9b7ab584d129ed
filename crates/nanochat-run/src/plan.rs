//! Planning: binary discovery, resolved configs, fingerprints, and cached-or-run decisions.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, Context, Result};
use nanochat_artifacts::{
    ArtifactStore, CacheEntry, Error as StoreError, ObjectId, StageFingerprint, StageKey,
    VerifyMode, FINGERPRINT_SCHEMA,
};

use crate::pipeline::{ConfigSource, Pipeline, Stage};

/// Finds a stage binary: an explicit path (contains `/`) as given; otherwise in
/// `$NANOCHAT_BIN_DIR` if set, then next to this executable (a `cargo build` puts all
/// workspace binaries together), then on PATH.
pub fn find_binary(run: &str) -> Result<PathBuf> {
    if run.contains('/') {
        let p = PathBuf::from(run);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(anyhow!("stage binary {run} does not exist"))
        };
    }
    let mut searched = Vec::new();
    if let Some(dir) = std::env::var_os("NANOCHAT_BIN_DIR") {
        let cand = Path::new(&dir).join(run);
        if is_executable(&cand) {
            return Ok(cand);
        }
        searched.push(format!("$NANOCHAT_BIN_DIR={}", Path::new(&dir).display()));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        let cand = dir.join(run);
        if is_executable(&cand) {
            return Ok(cand);
        }
        searched.push(dir.display().to_string());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let cand = dir.join(run);
            if is_executable(&cand) {
                return Ok(cand);
            }
        }
        searched.push("PATH".into());
    }
    Err(anyhow!(
        "stage binary `{run}` not found (searched {}); build the stage binaries with \
         `cargo build --release --bins` and run target/release/nanochat-run, or put `{run}` on PATH",
        searched.join(", ")
    ))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Per-invocation memo of binary paths and hashes (hashing a large binary once is enough).
#[derive(Default)]
pub struct Binaries {
    memo: Mutex<HashMap<String, (PathBuf, String)>>,
}

impl Binaries {
    /// Path and identity (`sha256:<hex>`) of a stage binary.
    pub fn get(&self, run: &str) -> Result<(PathBuf, String)> {
        if let Some(hit) = self.memo.lock().ok().and_then(|m| m.get(run).cloned()) {
            return Ok(hit);
        }
        let path = find_binary(run)?;
        let (hex, _) = nanochat_artifacts::sha256_file(&path)
            .with_context(|| format!("hashing stage binary {}", path.display()))?;
        let v = (path, format!("sha256:{hex}"));
        if let Ok(mut m) = self.memo.lock() {
            m.insert(run.to_string(), v.clone());
        }
        Ok(v)
    }
}

/// The stage's config as a TOML table (from its file or inline).
pub fn resolved_config(stage: &Stage) -> Result<toml::Table> {
    match &stage.config {
        ConfigSource::Empty => Ok(toml::Table::new()),
        ConfigSource::Inline(t) => Ok(t.clone()),
        ConfigSource::File(p) => Ok(nanochat_artifacts::stage::load_toml::<toml::Table>(p)
            .with_context(|| format!("config of stage {}", stage.name))?),
    }
}

/// What to do with a stage.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Its key is cached and the output verifies.
    Cached { key: StageKey, entry: CacheEntry },
    /// It must run, for these reasons.
    Run {
        key: StageKey,
        fingerprint: StageFingerprint,
        config: toml::Table,
        reasons: Vec<String>,
    },
}

/// Config keys that are not part of the stage key: they change how a stage computes, not
/// what it computes beyond floating-point reduction order. `[train] shard_optimizer`: a sharded
/// optimizer step sums the gradients (reduce-scatter instead of all-reduce) and the global norm
/// (per-shard f64 sums) in another order and otherwise runs the same kernels on the same values;
/// its checkpoints are the unsharded format.
const UNKEYED: &[(&str, &str)] = &[("train", "shard_optimizer")];

fn strip_unkeyed(config: &mut serde_json::Value) {
    for (table, key) in UNKEYED {
        if let Some(t) = config.get_mut(*table).and_then(|t| t.as_object_mut()) {
            t.remove(*key);
        }
    }
}

/// Builds the fingerprint of `stage` given its inputs' object ids.
pub fn fingerprint(
    stage: &Stage,
    binaries: &Binaries,
    inputs: &BTreeMap<String, ObjectId>,
) -> Result<(StageFingerprint, toml::Table)> {
    let (_, identity) = binaries.get(&stage.run)?;
    let config = resolved_config(stage)?;
    let mut config_json =
        serde_json::to_value(&config).context("converting the config to JSON for hashing")?;
    strip_unkeyed(&mut config_json);
    Ok((
        StageFingerprint {
            stage: stage.name.clone(),
            binary: identity,
            config: config_json,
            inputs: inputs.clone(),
            env: stage.env.clone(),
            schema: FINGERPRINT_SCHEMA,
            world_size: stage.launch.world_size(),
        },
        config,
    ))
}

/// Decides whether `stage` (with these input objects) is cached or must run, and why.
/// `forced_by` names the flag that asks for a rerun even when cached (`--force`, `--only`,
/// `--from`); it is the reason shown.
pub fn decide(
    store: &ArtifactStore,
    pipeline: &Pipeline,
    stage: &Stage,
    binaries: &Binaries,
    inputs: &BTreeMap<String, ObjectId>,
    forced_by: Option<&str>,
    mode: VerifyMode,
) -> Result<Decision> {
    let (fp, config) = fingerprint(stage, binaries, inputs)?;
    let key = fp.key();
    let run = |reasons: Vec<String>| Decision::Run {
        key: key.clone(),
        fingerprint: fp.clone(),
        config: config.clone(),
        reasons,
    };
    if let Some(flag) = forced_by {
        return Ok(run(vec![flag.to_string()]));
    }
    if let Some(entry) = store.cache_get(&key)? {
        return Ok(match store.verify(&entry.object, mode) {
            Ok(()) => Decision::Cached { key, entry },
            Err(StoreError::ObjectNotFound(_)) => {
                run(vec!["missing output (object deleted)".into()])
            }
            Err(StoreError::Corrupt { problems, .. }) => run(vec![format!(
                "cached output failed verification: {}",
                problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )]),
            Err(e) => return Err(e.into()),
        });
    }
    let reasons = match store.last_key(&pipeline.name, &stage.name)? {
        None => vec!["never run".to_string()],
        Some(prev) => match store.cache_get(&prev)? {
            Some(prev_entry) => fp.explain_change(&prev_entry.fingerprint),
            None => vec!["no cached output for this configuration".to_string()],
        },
    };
    Ok(run(reasons))
}

#[cfg(test)]
mod tests {
    use super::strip_unkeyed;

    #[test]
    fn shard_optimizer_is_not_part_of_the_key_and_other_train_keys_are() {
        let mut a = serde_json::json!({"train": {"matrix_lr": 0.02, "shard_optimizer": false}});
        strip_unkeyed(&mut a);
        assert_eq!(a, serde_json::json!({"train": {"matrix_lr": 0.02}}));
        let mut b = serde_json::json!({"seed": 1});
        strip_unkeyed(&mut b);
        assert_eq!(b, serde_json::json!({"seed": 1}));
    }
}
