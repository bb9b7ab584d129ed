//! Durable file-system primitives: atomic writes and directory fsync.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{IoContext, Result};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A sibling temp path unique to this process and call, so concurrent writers never share one.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Flushes a directory entry table to disk so a preceding rename/create survives power loss.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    // Opening a directory read-only and calling fsync is the POSIX way to persist its entries.
    File::open(dir)
        .and_then(|f| f.sync_all())
        .io("syncing directory", dir)
}

/// Writes `bytes` to `path` atomically: readers see either the old content or all of the new.
///
/// The data goes to a unique temp file in the same directory, is fsynced, renamed over `path`,
/// and the directory is fsynced. Parent directories are created if missing.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).io("creating directory", &parent)?;
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .io("creating", &tmp)?;
        f.write_all(bytes).io("writing", &tmp)?;
        f.sync_all().io("syncing", &tmp)?;
        drop(f);
        fs::rename(&tmp, path).io("renaming into place", path)?;
        fsync_dir(&parent)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_creates_parents_and_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/c.txt");
        write_atomic(&p, b"first").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"first");
        write_atomic(&p, b"second, longer").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second, longer");
        // No temp files are left behind.
        let names: Vec<_> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("c.txt")]);
    }

    #[test]
    fn write_atomic_into_a_file_parent_fails_with_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"x").unwrap();
        let err = write_atomic(&blocker.join("child"), b"y").unwrap_err();
        assert!(err.to_string().contains("file"), "{err}");
    }
}
