//! The artifact layout contract (docs/artifacts.md §11) and the one resolver of "a model
//! reference": what every stage, the CLI and the server call to find a checkpoint and its
//! tokenizer.
//!
//! A **model artifact** (the output of pretrain, midtrain and SFT) is a directory holding
//! `model/` (the checkpoint: `model.safetensors`, `config.json`, `meta.json`) and
//! `tokenizer/` (`tokenizer.tiktoken`, `tokenizer.json`); a **tokenizer artifact** holds the
//! tokenizer files at its root. A model reference is any of:
//!
//! 1. a model artifact directory, e.g. a store object's `data/`;
//! 2. a store object directory (`objects/ab/cdef…`, holding `manifest.json` and `data/`);
//! 3. a checkpoint directory itself (holding `model.safetensors`); its tokenizer is looked up
//!    beside it (`../tokenizer/`) or inside it;
//! 4. a ref (`latest/sft`, `runs/speedrun/sft`) or an object id in the store, verified (sizes
//!    and manifest) before use.
//!
//! An explicit tokenizer directory, when given, wins over the one in the artifact; without one
//! and without a tokenizer in the artifact, the tokenizer object the checkpoint records
//! (`meta.json` `tokenizer_id`) is looked up in the store.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::ids::ObjectId;
use crate::store::{ArtifactStore, VerifyMode, DATA_DIR, MANIFEST_FILE};

/// Sub-directory of a model artifact holding the checkpoint.
pub const MODEL_DIR: &str = "model";
/// Sub-directory of a model artifact holding the tokenizer it was trained with.
pub const TOKENIZER_DIR: &str = "tokenizer";
/// The file that marks a checkpoint directory (nanochat-model's weights file).
pub const CHECKPOINT_MARKER: &str = "model.safetensors";
/// The file that marks a tokenizer directory (nanochat-tokenizer's ranks file).
pub const TOKENIZER_MARKER: &str = "tokenizer.tiktoken";

/// Where a model reference points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLocation {
    /// The checkpoint directory (holds [`CHECKPOINT_MARKER`]).
    pub checkpoint: PathBuf,
    /// The tokenizer directory (holds [`TOKENIZER_MARKER`]).
    pub tokenizer: PathBuf,
    /// The store object the reference named, when it went through the store.
    pub object: Option<ObjectId>,
}

fn model_error(reference: &Path, reason: impl Into<String>) -> Error {
    Error::ModelReference {
        reference: reference.display().to_string(),
        reason: reason.into(),
    }
}

/// Resolves a model reference (see the module docs) to its checkpoint and tokenizer.
///
/// `tokenizer`, when given, is used instead of the artifact's own (it must hold
/// [`TOKENIZER_MARKER`]). `store` is consulted only when `reference` is not an existing
/// directory: as a ref name, then as an object id.
pub fn resolve_model(
    reference: &Path,
    tokenizer: Option<&Path>,
    store: Option<&ArtifactStore>,
) -> Result<ModelLocation> {
    let (root, object) = if reference.is_dir() {
        (reference.to_path_buf(), None)
    } else if reference.exists() {
        return Err(model_error(
            reference,
            "not a directory (give the model artifact's or the checkpoint's directory)",
        ));
    } else {
        let (data, id) = lookup_in_store(reference, store)?;
        (data, Some(id))
    };
    // A store object directory: its content is in data/.
    let root = if root.join(MANIFEST_FILE).is_file() && root.join(DATA_DIR).is_dir() {
        root.join(DATA_DIR)
    } else {
        root
    };
    let checkpoint = [root.clone(), root.join(MODEL_DIR)]
        .into_iter()
        .find(|d| d.join(CHECKPOINT_MARKER).is_file())
        .ok_or_else(|| {
            model_error(
                reference,
                format!(
                    "no {CHECKPOINT_MARKER} in {} or its {MODEL_DIR}/ (give a model artifact — \
                     the output of pretrain, midtrain or sft — or a checkpoint directory)",
                    root.display()
                ),
            )
        })?;
    let tokenizer = match tokenizer {
        Some(dir) if dir.join(TOKENIZER_MARKER).is_file() => dir.to_path_buf(),
        Some(dir) => {
            return Err(model_error(
                reference,
                format!(
                    "the tokenizer directory {} has no {TOKENIZER_MARKER}",
                    dir.display()
                ),
            ))
        }
        None => artifact_tokenizer(&root, &checkpoint)
            .or_else(|| recorded_tokenizer(&checkpoint, store))
            .ok_or_else(|| {
            model_error(
                reference,
                format!(
                    "no tokenizer with the model (looked for {TOKENIZER_MARKER} in {root}/{TOKENIZER_DIR}, \
                     {root} and beside the checkpoint); pass the tokenizer directory explicitly",
                    root = root.display()
                ),
            )
        })?,
    };
    Ok(ModelLocation {
        checkpoint,
        tokenizer,
        object,
    })
}

/// The tokenizer object a checkpoint records (`meta.json` `tokenizer_id`, `sha256:<id>` or a
/// bare id), when it is in `store`.
fn recorded_tokenizer(checkpoint: &Path, store: Option<&ArtifactStore>) -> Option<PathBuf> {
    let store = store?;
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(checkpoint.join("meta.json")).ok()?).ok()?;
    let id = meta.get("tokenizer_id")?.as_str()?;
    let id: ObjectId = id.strip_prefix("sha256:").unwrap_or(id).parse().ok()?;
    let data = store.object_data(&id);
    [data.join(TOKENIZER_DIR), data]
        .into_iter()
        .find(|d| d.join(TOKENIZER_MARKER).is_file())
}

/// The tokenizer that travels with a model artifact: `root/tokenizer/`, `root` itself, or
/// `tokenizer/` beside a checkpoint directory given directly.
fn artifact_tokenizer(root: &Path, checkpoint: &Path) -> Option<PathBuf> {
    let mut candidates = vec![root.join(TOKENIZER_DIR), root.to_path_buf()];
    if checkpoint == root {
        if let Some(parent) = root.parent() {
            candidates.push(parent.join(TOKENIZER_DIR));
        }
    }
    candidates
        .into_iter()
        .find(|d| d.join(TOKENIZER_MARKER).is_file())
}

fn lookup_in_store(reference: &Path, store: Option<&ArtifactStore>) -> Result<(PathBuf, ObjectId)> {
    let name = reference.to_string_lossy();
    let Some(store) = store else {
        return Err(model_error(
            reference,
            "no such directory (and no artifact store to look it up in as a ref)",
        ));
    };
    let id = match name.parse::<ObjectId>() {
        Ok(id) if store.contains(&id) => Some(id),
        // Not a valid ref name either: reported below as "not a ref", what the user most
        // likely meant.
        _ => store.get_ref(&name).unwrap_or_default(),
    };
    let Some(id) = id else {
        return Err(model_error(
            reference,
            format!(
                "no such directory, and not a ref or object id in the store at {} \
                 (`nanochat-run refs` lists refs; e.g. latest/sft)",
                store.root().display()
            ),
        ));
    };
    store.verify(&id, VerifyMode::Fast)?;
    Ok((store.object_data(&id), id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn touch(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, b"x").unwrap();
    }

    /// A model artifact as the training stages write it: model/ + tokenizer/.
    fn model_artifact(dir: &Path) {
        touch(&dir.join("model").join(CHECKPOINT_MARKER));
        touch(&dir.join("tokenizer").join(TOKENIZER_MARKER));
    }

    #[test]
    fn resolves_an_artifact_its_checkpoint_dir_and_an_object_dir_alike() {
        let d = tempfile::tempdir().unwrap();
        let art = d.path().join("art");
        model_artifact(&art);
        let want = ModelLocation {
            checkpoint: art.join("model"),
            tokenizer: art.join("tokenizer"),
            object: None,
        };
        assert_eq!(resolve_model(&art, None, None).unwrap(), want);
        assert_eq!(resolve_model(&art.join("model"), None, None).unwrap(), want);

        let store = ArtifactStore::open(d.path().join("store")).unwrap();
        let id = store.publish_dir(&art).unwrap();
        let data = store.object_data(&id);
        let in_store = ModelLocation {
            checkpoint: data.join("model"),
            tokenizer: data.join("tokenizer"),
            object: None,
        };
        assert_eq!(
            resolve_model(&store.object_dir(&id), None, None).unwrap(),
            in_store
        );
        assert_eq!(resolve_model(&data, None, None).unwrap(), in_store);
    }

    #[test]
    fn resolves_refs_and_ids_through_the_store_and_verifies_them() {
        let d = tempfile::tempdir().unwrap();
        let art = d.path().join("art");
        model_artifact(&art);
        let store = ArtifactStore::open(d.path().join("store")).unwrap();
        let id = store.publish_dir(&art).unwrap();
        store.set_ref("latest/sft", &id).unwrap();
        let loc = resolve_model(Path::new("latest/sft"), None, Some(&store)).unwrap();
        assert_eq!(loc.object.as_ref(), Some(&id));
        assert_eq!(loc.checkpoint, store.object_data(&id).join("model"));
        let by_id = resolve_model(Path::new(id.as_str()), None, Some(&store)).unwrap();
        assert_eq!(by_id, loc);

        let e = resolve_model(Path::new("latest/nope"), None, Some(&store)).unwrap_err();
        assert!(e.to_string().contains("nanochat-run refs"), "{e}");
        let e = resolve_model(Path::new("latest/nope"), None, None).unwrap_err();
        assert!(e.to_string().contains("no such directory"), "{e}");

        // A damaged object is refused, naming the file.
        let weights = loc.checkpoint.join(CHECKPOINT_MARKER);
        let mut perms = fs::metadata(&weights).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        fs::set_permissions(&weights, perms).unwrap();
        fs::write(&weights, b"truncated?").unwrap();
        let e = resolve_model(Path::new("latest/sft"), None, Some(&store)).unwrap_err();
        assert!(e.to_string().contains("model/model.safetensors"), "{e}");
    }

    #[test]
    fn a_checkpoint_alone_finds_the_tokenizer_object_its_meta_records() {
        let d = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(d.path().join("store")).unwrap();
        let tok = d.path().join("tok");
        touch(&tok.join(TOKENIZER_MARKER));
        let tok_id = store.publish_dir(&tok).unwrap();
        let ckpt = d.path().join("ckpt");
        touch(&ckpt.join(CHECKPOINT_MARKER));
        fs::write(
            ckpt.join("meta.json"),
            format!("{{\"step\":0,\"tokenizer_id\":\"sha256:{tok_id}\"}}"),
        )
        .unwrap();
        let loc = resolve_model(&ckpt, None, Some(&store)).unwrap();
        assert_eq!(loc.tokenizer, store.object_data(&tok_id));
        // Without the store it cannot be found, and says so.
        let e = resolve_model(&ckpt, None, None).unwrap_err();
        assert!(e.to_string().contains("no tokenizer"), "{e}");
        // A file is not a model reference.
        let e = resolve_model(&ckpt.join("meta.json"), None, Some(&store)).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[test]
    fn an_explicit_tokenizer_wins_and_must_be_one() {
        let d = tempfile::tempdir().unwrap();
        let ckpt = d.path().join("ckpt");
        touch(&ckpt.join(CHECKPOINT_MARKER));
        let e = resolve_model(&ckpt, None, None).unwrap_err();
        assert!(e.to_string().contains("no tokenizer"), "{e}");
        let tok = d.path().join("tok");
        touch(&tok.join(TOKENIZER_MARKER));
        let loc = resolve_model(&ckpt, Some(&tok), None).unwrap();
        assert_eq!((loc.checkpoint, loc.tokenizer), (ckpt.clone(), tok));
        let e = resolve_model(&ckpt, Some(d.path()), None).unwrap_err();
        assert!(e.to_string().contains("has no tokenizer.tiktoken"), "{e}");
    }

    #[test]
    fn a_directory_without_a_checkpoint_says_what_to_give() {
        let d = tempfile::tempdir().unwrap();
        let e = resolve_model(d.path(), None, None).unwrap_err();
        assert!(
            e.to_string().contains("no model.safetensors") && e.to_string().contains("model/"),
            "{e}"
        );
    }
}
