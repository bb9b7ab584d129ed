//! The canonical manifest of an object: every file's relative path, size and sha256.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::ids::{canonical_json, ObjectId};

/// Version of the manifest format; part of every manifest so a future format hashes differently.
pub const MANIFEST_VERSION: u32 = 1;

/// One file of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Path relative to the object's data directory, `/`-separated, UTF-8, no `.`/`..` parts.
    pub path: String,
    /// Lowercase hex sha256 of the file's bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The list of files making up an object, sorted by path bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Files sorted by the bytes of `path`.
    pub files: Vec<ManifestEntry>,
    /// Always [`MANIFEST_VERSION`].
    pub version: u32,
}

impl Manifest {
    /// Builds the manifest of a directory by hashing every regular file under it.
    ///
    /// Symlinks and special files are rejected (an object must be self-contained); empty
    /// directories are not represented. Each file is fsynced as it is hashed, so the manifest
    /// describes bytes that are durable.
    pub fn of_dir(dir: &Path) -> Result<Self> {
        let mut files = Vec::new();
        walk(dir, dir, &mut files)?;
        let mut entries = Vec::with_capacity(files.len());
        for (rel, abs) in files {
            let (sha256, size) = hash_file(&abs, true)?;
            entries.push(ManifestEntry {
                path: rel,
                sha256,
                size,
            });
        }
        entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        Ok(Self {
            files: entries,
            version: MANIFEST_VERSION,
        })
    }

    /// The canonical bytes: compact JSON, keys sorted, files sorted by path.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        canonical_json(&value)
    }

    /// The object id this manifest addresses.
    pub fn id(&self) -> ObjectId {
        ObjectId::of_bytes(&self.canonical_bytes())
    }

    /// Total size of all files in bytes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Parses manifest bytes, rejecting anything that is not in canonical form.
    pub fn parse(bytes: &[u8], origin: &Path) -> Result<Self> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|source| Error::Record {
            path: origin.to_path_buf(),
            source,
        })?;
        Ok(m)
    }
}

/// Lists regular files under `dir` as (relative `/` path, absolute path).
pub(crate) fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let rd = fs::read_dir(dir).io("listing", dir)?;
    for entry in rd {
        let entry = entry.io("listing", dir)?;
        let path = entry.path();
        let ft = entry.file_type().io("inspecting", &path)?;
        if ft.is_dir() {
            walk(root, &path, out)?;
        } else if ft.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let mut parts = Vec::new();
            for c in rel.components() {
                let s = c.as_os_str().to_str().ok_or_else(|| Error::Unpublishable {
                    path: path.clone(),
                    reason: "file name is not valid UTF-8".into(),
                })?;
                parts.push(s);
            }
            out.push((parts.join("/"), path));
        } else {
            return Err(Error::Unpublishable {
                path,
                reason: "only regular files and directories can be stored (found a symlink or special file)".into(),
            });
        }
    }
    Ok(())
}

/// Streams a file through sha256; returns (hex digest, size). Optionally fsyncs it first.
pub(crate) fn hash_file(path: &Path, sync: bool) -> Result<(String, u64)> {
    let mut f = File::open(path).io("opening", path)?;
    if sync {
        f.sync_all().io("syncing", path)?;
    }
    let mut hasher = Sha256::new();
    // 1 MiB keeps syscall overhead negligible while staying cache-friendly.
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).io("reading", path)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_is_canonical_and_order_independent() {
        let a = tempfile::tempdir().unwrap();
        fs::create_dir_all(a.path().join("sub/deeper")).unwrap();
        fs::write(a.path().join("z.txt"), b"zz").unwrap();
        fs::write(a.path().join("sub/deeper/x.bin"), b"").unwrap();
        fs::write(a.path().join("sub/a.txt"), b"abc").unwrap();
        let m = Manifest::of_dir(a.path()).unwrap();
        let paths: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["sub/a.txt", "sub/deeper/x.bin", "z.txt"]);
        assert_eq!(m.total_size(), 5);
        let text = String::from_utf8(m.canonical_bytes()).unwrap();
        assert!(
            text.starts_with(r#"{"files":[{"path":"sub/a.txt","sha256":"ba7816bf"#),
            "{text}"
        );
        assert!(text.ends_with(r#"],"version":1}"#), "{text}");
        // Same content written in another order, plus an empty dir: same id.
        let b = tempfile::tempdir().unwrap();
        fs::create_dir_all(b.path().join("empty")).unwrap();
        fs::write(b.path().join("z.txt"), b"zz").unwrap();
        fs::create_dir_all(b.path().join("sub/deeper")).unwrap();
        fs::write(b.path().join("sub/a.txt"), b"abc").unwrap();
        fs::write(b.path().join("sub/deeper/x.bin"), b"").unwrap();
        assert_eq!(Manifest::of_dir(b.path()).unwrap().id(), m.id());
        let parsed = Manifest::parse(&m.canonical_bytes(), Path::new("m")).unwrap();
        assert_eq!(parsed, m);
        assert!(Manifest::parse(b"{}", Path::new("m")).is_err());
    }

    #[test]
    fn symlinks_are_rejected() {
        let a = tempfile::tempdir().unwrap();
        fs::write(a.path().join("t"), b"x").unwrap();
        std::os::unix::fs::symlink("t", a.path().join("link")).unwrap();
        let e = Manifest::of_dir(a.path()).unwrap_err().to_string();
        assert!(e.contains("link") && e.contains("symlink"), "{e}");
    }
}
