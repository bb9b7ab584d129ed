//! The on-disk store: objects, atomic publish, verification, action cache, refs, work dirs,
//! run records and garbage collection. Layout and formats: docs/artifacts.md.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{fsync_dir, write_atomic};
use crate::ids::{ObjectId, StageKey};
use crate::manifest::{hash_file, walk, Manifest};

/// File name of the manifest inside an object directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Name of the content directory inside an object directory.
pub const DATA_DIR: &str = "data";
/// Name of the run directory beside `data/`: what varies between runs of the stage that first
/// published the object (durations, throughput, host, dates). Not part of the manifest or the id.
pub const RUN_DIR: &str = "run";
/// The record `nanochat-run` writes into an object's run directory.
pub const RUN_RECORD_FILE: &str = "record.json";

/// How thoroughly [`ArtifactStore::verify`] checks an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyMode {
    /// Manifest hash, file set and sizes: catches missing, extra and truncated files; cheap.
    Fast,
    /// Everything in `Fast` plus a re-hash of every file: also catches flipped bytes.
    Full,
}

/// One thing wrong with a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The object's `manifest.json` is missing or unreadable.
    ManifestUnreadable(String),
    /// The manifest no longer hashes to the object id.
    ManifestAltered {
        /// What the manifest hashes to now.
        actual: String,
    },
    /// A file listed in the manifest is absent.
    Missing {
        /// Path relative to the data directory.
        path: String,
    },
    /// A file has the wrong size.
    SizeMismatch {
        /// Path relative to the data directory.
        path: String,
        /// Size in the manifest.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// A file has the right size but different bytes.
    Altered {
        /// Path relative to the data directory.
        path: String,
        /// sha256 in the manifest.
        expected: String,
        /// sha256 on disk.
        actual: String,
    },
    /// A file is present that the manifest does not list.
    Extra {
        /// Path relative to the data directory.
        path: String,
    },
    /// A file could not be read.
    Unreadable {
        /// Path relative to the data directory.
        path: String,
        /// The I/O error.
        error: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::ManifestUnreadable(e) => write!(f, "{MANIFEST_FILE}: unreadable ({e})"),
            Problem::ManifestAltered { actual } => write!(
                f,
                "{MANIFEST_FILE}: altered (now hashes to {actual}, not the object id)"
            ),
            Problem::Missing { path } => write!(f, "{path}: missing"),
            Problem::SizeMismatch {
                path,
                expected,
                actual,
            } => {
                let what = if actual < expected {
                    "truncated"
                } else {
                    "grown"
                };
                write!(
                    f,
                    "{path}: {what} (expected {expected} bytes, found {actual})"
                )
            }
            Problem::Altered {
                path,
                expected,
                actual,
            } => write!(f, "{path}: altered (sha256 {actual}, expected {expected})"),
            Problem::Extra { path } => write!(f, "{path}: unexpected extra file"),
            Problem::Unreadable { path, error } => write!(f, "{path}: unreadable ({error})"),
        }
    }
}

/// A private directory under `tmp/` that a stage fills before it is published.
///
/// Dropping an unpublished staging area deletes it.
#[derive(Debug)]
pub struct Staging {
    root: PathBuf,
    data: PathBuf,
    run: PathBuf,
}

impl Staging {
    /// The directory to write the object's content into (the stage's `--out`).
    pub fn dir(&self) -> &Path {
        &self.data
    }

    /// The run directory published beside `data/` and outside the hash (the stage's
    /// `$NANOCHAT_RUN_DIR`): telemetry of this run. Kept only if this publish creates the
    /// object; an object that already exists keeps the run directory of its first publisher.
    pub fn run_dir(&self) -> &Path {
        &self.run
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.root.exists() {
            make_writable(&self.root);
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// What the action cache records for a stage key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The stage key (sha256 of `fingerprint`'s canonical JSON).
    pub key: StageKey,
    /// Stage name, for humans.
    pub stage: String,
    /// The published output object.
    pub object: ObjectId,
    /// The captured stdout/stderr of the run that produced it, if any.
    #[serde(default)]
    pub log: Option<ObjectId>,
    /// The fingerprint the key was computed from, kept to explain later cache misses.
    pub fingerprint: serde_json::Value,
    /// When the entry was written (seconds since the Unix epoch).
    pub created_unix: u64,
}

/// One stage's outcome inside a [`RunRecord`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// Stage name.
    pub stage: String,
    /// Stage key.
    pub key: Option<StageKey>,
    /// `cached`, `ran`, `failed`, `skipped` or `interrupted`.
    pub status: String,
    /// Exit code of the stage process, when one ran.
    pub exit_code: Option<i32>,
    /// Wall-clock seconds spent (0 for cached stages).
    pub duration_s: f64,
    /// Output object.
    pub object: Option<ObjectId>,
    /// Log object.
    pub log: Option<ObjectId>,
    /// Why the stage ran (or why it failed/was skipped).
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// A record of one `nanochat-run` invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Pipeline name.
    pub pipeline: String,
    /// Start time, RFC 3339 UTC.
    pub started: String,
    /// Total wall-clock seconds.
    pub duration_s: f64,
    /// Host name.
    pub host: String,
    /// `git rev-parse HEAD` of the working directory, if available.
    pub git_rev: Option<String>,
    /// The command line.
    pub argv: Vec<String>,
    /// Per-stage outcomes in execution order.
    pub stages: Vec<StageRecord>,
}

/// The machine a stage ran on, as far as the OS tells (best effort; empty when unknown).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineInfo {
    /// Host name.
    pub host: String,
    /// `linux-x86_64` etc.
    pub platform: String,
    /// CPU model name.
    pub cpu: String,
    /// Logical CPUs available to the process.
    pub cpus: usize,
    /// Total memory in GiB.
    pub memory_gib: f64,
}

impl MachineInfo {
    /// This machine, from `/proc` and the standard library.
    pub fn current() -> Self {
        let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / (1024.0 * 1024.0));
        MachineInfo {
            host: read("/proc/sys/kernel/hostname").trim().to_string(),
            platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib,
        }
    }
}

/// `run/record.json` beside an object: which run first produced it, when, where and how long
/// it took. Written by `nanochat-run`; never part of the object's hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProducerRecord {
    /// Pipeline name.
    pub pipeline: String,
    /// Stage name.
    pub stage: String,
    /// Stage key of the run.
    pub key: StageKey,
    /// Start of the (last) attempt, RFC 3339 UTC.
    pub started: String,
    /// Wall-clock seconds of the (last) attempt.
    pub duration_s: f64,
    /// Whether the attempt resumed from an interrupted one's work dir.
    pub resumed: bool,
    /// The stage's inputs: name -> object id (what it was made from).
    #[serde(default)]
    pub inputs: BTreeMap<String, ObjectId>,
    /// The log object of the attempt (its captured output and a copy of the run directory).
    pub log: Option<ObjectId>,
    /// Where it ran.
    pub machine: MachineInfo,
    /// `git rev-parse HEAD` of the working directory, if any.
    #[serde(default)]
    pub git_rev: Option<String>,
}

impl ProducerRecord {
    /// Reads `record.json` from a run directory; `Ok(None)` when there is none.
    pub fn read(run_dir: &Path) -> Result<Option<Self>> {
        read_json_opt(&run_dir.join(RUN_RECORD_FILE))
    }

    /// Writes `record.json` into a run directory (atomically).
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        write_json(&run_dir.join(RUN_RECORD_FILE), self)
    }
}

/// Options for [`ArtifactStore::gc`].
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Actually delete (otherwise only report).
    pub delete: bool,
    /// Objects and temp dirs younger than this are kept even if unreachable, so a concurrent
    /// run's freshly published object survives until its cache entry is written.
    pub grace: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            delete: false,
            grace: Duration::from_secs(3600),
        }
    }
}

/// What [`ArtifactStore::gc`] found (and deleted, if asked).
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Objects reachable from a ref or cache entry.
    pub reachable: usize,
    /// Unreachable objects with their sizes in bytes.
    pub unreachable: Vec<(ObjectId, u64)>,
    /// Unreachable objects kept because they are younger than the grace period.
    pub young: usize,
    /// Abandoned temp directories (older than the grace period).
    pub stale_tmp: Vec<PathBuf>,
    /// Whether anything was deleted.
    pub deleted: bool,
}

impl GcReport {
    /// Total bytes in unreachable objects.
    pub fn unreachable_bytes(&self) -> u64 {
        self.unreachable.iter().map(|(_, b)| b).sum()
    }
}

/// An exclusive lock on a stage key's work directory; released on drop.
#[derive(Debug)]
pub struct WorkLock {
    _file: File,
    dir: PathBuf,
}

impl WorkLock {
    /// The work directory this lock guards.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A content-addressed artifact store rooted at a directory (usually `./artifacts`).
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    root: PathBuf,
}

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn make_writable(dir: &Path) {
    // Published files are read-only; restore write permission so a directory can be removed
    // or repaired. Failures are ignored: removal will report them.
    let mut files = Vec::new();
    if walk(dir, dir, &mut files).is_ok() {
        for (_, p) in files {
            let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o644));
        }
    }
}

fn set_read_only(dir: &Path) -> Result<()> {
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    for (_, p) in files {
        fs::set_permissions(&p, fs::Permissions::from_mode(0o444)).io("making read-only", &p)?;
    }
    Ok(())
}

fn fsync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).io("listing", dir)? {
        let entry = entry.io("listing", dir)?;
        if entry.file_type().io("inspecting", entry.path())?.is_dir() {
            fsync_tree(&entry.path())?;
        }
    }
    fsync_dir(dir)
}

fn dir_is_empty(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

fn is_lost_rename_race(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::AlreadyExists | ErrorKind::DirectoryNotEmpty
    )
}

/// Checks a ref name: `/`-separated segments of `[A-Za-z0-9._-]`, none empty or starting with `.`.
pub fn validate_ref_name(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::InvalidRef {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    for seg in name.split('/') {
        if seg.is_empty() {
            return bad("empty path segment");
        }
        if seg.starts_with('.') {
            return bad("segments may not start with '.'");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return bad("use only letters, digits, '_', '-', '.' and '/'");
        }
    }
    Ok(())
}

impl ArtifactStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for sub in [
            "objects", "tmp", "cache", "refs", "work", "records", "state",
        ] {
            let d = root.join(sub);
            fs::create_dir_all(&d).io("creating store directory", &d)?;
        }
        Ok(Self { root })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `objects/ab/cdef…/`: the directory holding an object's manifest and data.
    pub fn object_dir(&self, id: &ObjectId) -> PathBuf {
        let s = id.as_str();
        self.root.join("objects").join(&s[..2]).join(&s[2..])
    }

    /// `objects/ab/cdef…/data/`: the object's content, as handed to stages.
    pub fn object_data(&self, id: &ObjectId) -> PathBuf {
        self.object_dir(id).join(DATA_DIR)
    }

    /// `objects/ab/cdef…/run/`: telemetry of the run that first published the object (absent
    /// for objects published without one). Outside the manifest: reading it never affects ids.
    pub fn object_run_dir(&self, id: &ObjectId) -> PathBuf {
        self.object_dir(id).join(RUN_DIR)
    }

    /// Whether an object directory exists (without verifying it).
    pub fn contains(&self, id: &ObjectId) -> bool {
        self.object_dir(id).join(MANIFEST_FILE).is_file()
    }

    /// Every object id present in `objects/`.
    pub fn list_objects(&self) -> Result<Vec<ObjectId>> {
        let objects = self.root.join("objects");
        let mut ids = Vec::new();
        for prefix in fs::read_dir(&objects).io("listing", &objects)? {
            let prefix = prefix.io("listing", &objects)?;
            let p = prefix.file_name().to_string_lossy().into_owned();
            if !prefix.path().is_dir() {
                continue;
            }
            for obj in fs::read_dir(prefix.path()).io("listing", prefix.path())? {
                let obj = obj.io("listing", prefix.path())?;
                let rest = obj.file_name().to_string_lossy().into_owned();
                if let Ok(id) = ObjectId::new(format!("{p}{rest}")) {
                    ids.push(id);
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Reads an object's manifest (without checking it against the id).
    pub fn manifest(&self, id: &ObjectId) -> Result<Manifest> {
        let path = self.object_dir(id).join(MANIFEST_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::ObjectNotFound(id.to_string()))
            }
            Err(e) => return Err(e).io("reading", &path),
        };
        Manifest::parse(&bytes, &path)
    }

    /// Creates a fresh staging directory under `tmp/`.
    pub fn staging(&self) -> Result<Staging> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let root = self
            .root
            .join("tmp")
            .join(format!("stage-{}-{n}-{nanos}", std::process::id()));
        let data = root.join(DATA_DIR);
        let run = root.join(RUN_DIR);
        for dir in [&data, &run] {
            fs::create_dir_all(dir).io("creating staging directory", dir)?;
        }
        Ok(Staging { root, data, run })
    }

    /// Publishes a filled staging directory: hashes and fsyncs every file, writes the manifest,
    /// and renames the whole directory into `objects/` in one step, so a crash never leaves a
    /// partial object visible. If the object already exists (another publisher won the race, or
    /// an earlier run produced the same bytes) this one is discarded and the same id returned;
    /// an existing copy that fails verification is replaced.
    pub fn publish(&self, staging: Staging) -> Result<ObjectId> {
        let manifest = Manifest::of_dir(&staging.data)?;
        let id = manifest.id();
        write_atomic(
            &staging.root.join(MANIFEST_FILE),
            &manifest.canonical_bytes(),
        )?;
        set_read_only(&staging.data)?;
        if dir_is_empty(&staging.run) {
            fs::remove_dir(&staging.run).io("removing empty run directory", &staging.run)?;
        } else {
            set_read_only(&staging.run)?;
        }
        fsync_tree(&staging.root)?;
        let dest = self.object_dir(&id);
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&parent).io("creating directory", &parent)?;
        if dest.exists() {
            // Same manifest, so the same bytes if intact; a full check (rare: only duplicate
            // publishes get here) lets a rerun repair a copy whose bytes were altered.
            if self.verify(&id, VerifyMode::Full).is_ok() {
                tracing::debug!(object = %id, "already in store; discarding duplicate");
                return Ok(id); // `staging` is removed on drop
            }
            // A damaged copy: move it aside so the fresh bytes can take its place.
            let aside = self.root.join("tmp").join(format!(
                "damaged-{}-{}",
                id.short(),
                STAGING_COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            tracing::warn!(object = %id, "replacing a damaged copy of the object");
            match fs::rename(&dest, &aside) {
                Ok(()) => {
                    make_writable(&aside);
                    let _ = fs::remove_dir_all(&aside);
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e).io("moving damaged object aside", &dest),
            }
        }
        match fs::rename(&staging.root, &dest) {
            Ok(()) => {}
            Err(e) if is_lost_rename_race(&e) => {
                tracing::debug!(object = %id, "concurrent publisher won the race");
                return Ok(id);
            }
            Err(e) => return Err(e).io("publishing object", &dest),
        }
        fsync_dir(&parent)?;
        Ok(id)
    }

    /// Publishes a copy of an existing directory.
    pub fn publish_dir(&self, src: &Path) -> Result<ObjectId> {
        let staging = self.staging()?;
        copy_tree(src, staging.dir())?;
        self.publish(staging)
    }

    /// Publishes a single file `name` with `bytes` as a one-file object.
    pub fn publish_file(&self, name: &str, bytes: &[u8]) -> Result<ObjectId> {
        let staging = self.staging()?;
        let path = staging.dir().join(name);
        fs::write(&path, bytes).io("writing", &path)?;
        self.publish(staging)
    }

    /// Lists everything wrong with an object (empty = healthy).
    pub fn check(&self, id: &ObjectId, mode: VerifyMode) -> Result<Vec<Problem>> {
        let dir = self.object_dir(id);
        if !dir.is_dir() {
            return Err(Error::ObjectNotFound(id.to_string()));
        }
        let mpath = dir.join(MANIFEST_FILE);
        let bytes = match fs::read(&mpath) {
            Ok(b) => b,
            Err(e) => return Ok(vec![Problem::ManifestUnreadable(e.to_string())]),
        };
        let actual = ObjectId::of_bytes(&bytes);
        if &actual != id {
            return Ok(vec![Problem::ManifestAltered {
                actual: actual.to_string(),
            }]);
        }
        let manifest = match Manifest::parse(&bytes, &mpath) {
            Ok(m) => m,
            Err(e) => return Ok(vec![Problem::ManifestUnreadable(e.to_string())]),
        };
        let data = dir.join(DATA_DIR);
        let mut on_disk = Vec::new();
        let mut problems = Vec::new();
        if data.is_dir() {
            if let Err(e) = walk(&data, &data, &mut on_disk) {
                problems.push(Problem::Unreadable {
                    path: DATA_DIR.into(),
                    error: e.to_string(),
                });
            }
        }
        let on_disk: BTreeMap<String, PathBuf> = on_disk.into_iter().collect();
        let listed: BTreeSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        for entry in &manifest.files {
            let Some(path) = on_disk.get(&entry.path) else {
                problems.push(Problem::Missing {
                    path: entry.path.clone(),
                });
                continue;
            };
            let size = match fs::metadata(path) {
                Ok(m) => m.len(),
                Err(e) => {
                    problems.push(Problem::Unreadable {
                        path: entry.path.clone(),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            if size != entry.size {
                problems.push(Problem::SizeMismatch {
                    path: entry.path.clone(),
                    expected: entry.size,
                    actual: size,
                });
                continue;
            }
            if mode == VerifyMode::Full {
                match hash_file(path, false) {
                    Ok((sha, _)) if sha != entry.sha256 => problems.push(Problem::Altered {
                        path: entry.path.clone(),
                        expected: entry.sha256.clone(),
                        actual: sha,
                    }),
                    Ok(_) => {}
                    Err(e) => problems.push(Problem::Unreadable {
                        path: entry.path.clone(),
                        error: e.to_string(),
                    }),
                }
            }
        }
        for path in on_disk.keys() {
            if !listed.contains(path.as_str()) {
                problems.push(Problem::Extra { path: path.clone() });
            }
        }
        Ok(problems)
    }

    /// Verifies an object; `Err(Error::Corrupt)` lists every missing, truncated, altered or
    /// extra file. Loaders call this (usually `Fast`, `Full` on request) before using an object.
    pub fn verify(&self, id: &ObjectId, mode: VerifyMode) -> Result<()> {
        let problems = self.check(id, mode)?;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Corrupt {
                id: id.to_string(),
                problems,
            })
        }
    }

    fn cache_path(&self, key: &StageKey) -> PathBuf {
        self.root.join("cache").join(format!("{key}.json"))
    }

    /// Looks a stage key up in the action cache.
    pub fn cache_get(&self, key: &StageKey) -> Result<Option<CacheEntry>> {
        read_json_opt(&self.cache_path(key))
    }

    /// Records (atomically) that a stage key produced an object.
    pub fn cache_put(&self, entry: &CacheEntry) -> Result<()> {
        write_json(&self.cache_path(&entry.key), entry)
    }

    /// Builds a cache entry stamped with the current time.
    pub fn new_cache_entry(
        key: StageKey,
        stage: &str,
        object: ObjectId,
        log: Option<ObjectId>,
        fingerprint: serde_json::Value,
    ) -> CacheEntry {
        CacheEntry {
            key,
            stage: stage.to_string(),
            object,
            log,
            fingerprint,
            created_unix: now_unix(),
        }
    }

    /// Every action-cache entry.
    pub fn cache_entries(&self) -> Result<Vec<CacheEntry>> {
        let dir = self.root.join("cache");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).io("listing", &dir)? {
            let p = e.io("listing", &dir)?.path();
            if p.extension().is_some_and(|x| x == "json") {
                if let Some(entry) = read_json_opt::<CacheEntry>(&p)? {
                    out.push(entry);
                }
            }
        }
        Ok(out)
    }

    /// Points ref `name` (e.g. `latest/sft`, `runs/speedrun/sft`) at `id`, atomically.
    pub fn set_ref(&self, name: &str, id: &ObjectId) -> Result<()> {
        validate_ref_name(name)?;
        write_atomic(
            &self.root.join("refs").join(name),
            format!("{id}\n").as_bytes(),
        )
    }

    /// Reads ref `name`; `Ok(None)` if it does not exist.
    pub fn get_ref(&self, name: &str) -> Result<Option<ObjectId>> {
        validate_ref_name(name)?;
        let path = self.root.join("refs").join(name);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.parse()?)),
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::IsADirectory) => Ok(None),
            Err(e) => Err(e).io("reading ref", &path),
        }
    }

    /// Resolves a ref or fails with [`Error::RefNotFound`].
    pub fn resolve_ref(&self, name: &str) -> Result<ObjectId> {
        self.get_ref(name)?
            .ok_or_else(|| Error::RefNotFound(name.to_string()))
    }

    /// Deletes a ref; returns whether it existed.
    pub fn delete_ref(&self, name: &str) -> Result<bool> {
        validate_ref_name(name)?;
        let path = self.root.join("refs").join(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).io("deleting ref", &path),
        }
    }

    /// All refs, sorted by name.
    pub fn list_refs(&self) -> Result<Vec<(String, ObjectId)>> {
        let dir = self.root.join("refs");
        let mut files = Vec::new();
        walk(&dir, &dir, &mut files)?;
        let mut out = Vec::new();
        for (name, path) in files {
            if name.split('/').any(|s| s.starts_with('.')) {
                continue; // a temp file of an in-flight write_atomic
            }
            let text = fs::read_to_string(&path).io("reading ref", &path)?;
            out.push((name, text.parse()?));
        }
        out.sort();
        Ok(out)
    }

    /// Remembers the stage key last completed for `stage` of `pipeline` (to explain reruns).
    pub fn set_last_key(&self, pipeline: &str, stage: &str, key: &StageKey) -> Result<()> {
        validate_ref_name(pipeline)?;
        validate_ref_name(stage)?;
        let path = self.root.join("state").join(pipeline).join(stage);
        write_atomic(&path, format!("{key}\n").as_bytes())
    }

    /// The stage key last completed for `stage` of `pipeline`, if any.
    pub fn last_key(&self, pipeline: &str, stage: &str) -> Result<Option<StageKey>> {
        validate_ref_name(pipeline)?;
        validate_ref_name(stage)?;
        let path = self.root.join("state").join(pipeline).join(stage);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.parse()?)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).io("reading", &path),
        }
    }

    /// `work/<key>/`: the persistent scratch directory for a stage key.
    pub fn work_dir(&self, key: &StageKey) -> PathBuf {
        self.root.join("work").join(key.as_str())
    }

    /// Takes the exclusive lock on a stage key's work dir (blocking until any other process
    /// running the same key finishes) and creates the directory.
    pub fn lock_work(&self, key: &StageKey) -> Result<WorkLock> {
        let lock_path = self.root.join("work").join(format!("{key}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .io("opening lock", &lock_path)?;
        file.lock().io("locking", &lock_path)?;
        let dir = self.work_dir(key);
        fs::create_dir_all(&dir).io("creating work directory", &dir)?;
        Ok(WorkLock { _file: file, dir })
    }

    /// Removes a stage key's work dir (after its output is safely published).
    pub fn remove_work(&self, lock: WorkLock) -> Result<()> {
        match fs::remove_dir_all(&lock.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).io("removing work directory", &lock.dir),
        }
    }

    /// Writes a run record to `records/`; returns its path.
    pub fn write_run_record(&self, record: &RunRecord) -> Result<PathBuf> {
        let name = format!(
            "{}-{}-{}.json",
            record.started.replace([':', '-'], ""),
            record.pipeline.replace('/', "_"),
            std::process::id()
        );
        let path = self.root.join("records").join(name);
        write_json(&path, record)?;
        Ok(path)
    }

    /// All run records, oldest first.
    pub fn run_records(&self) -> Result<Vec<RunRecord>> {
        let dir = self.root.join("records");
        let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
            .io("listing", &dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        paths.sort();
        let mut out = Vec::new();
        for p in paths {
            if let Some(r) = read_json_opt(&p)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Finds objects no ref or action-cache entry reaches and (if `opts.delete`) removes them,
    /// along with abandoned temp directories. Only one gc runs at a time.
    pub fn gc(&self, opts: &GcOptions) -> Result<GcReport> {
        let lock_path = self.root.join("gc.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .io("opening lock", &lock_path)?;
        lock.lock().io("locking", &lock_path)?;

        let mut reachable = BTreeSet::new();
        for (_, id) in self.list_refs()? {
            reachable.insert(id);
        }
        for entry in self.cache_entries()? {
            reachable.insert(entry.object);
            if let Some(log) = entry.log {
                reachable.insert(log);
            }
        }
        let now = SystemTime::now();
        let is_young = |p: &Path| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age < opts.grace)
        };
        let mut report = GcReport {
            deleted: opts.delete,
            ..GcReport::default()
        };
        for id in self.list_objects()? {
            if reachable.contains(&id) {
                report.reachable += 1;
                continue;
            }
            let dir = self.object_dir(&id);
            if is_young(&dir) {
                report.young += 1;
                continue;
            }
            let size = self.manifest(&id).map(|m| m.total_size()).unwrap_or(0);
            report.unreachable.push((id, size));
        }
        let tmp = self.root.join("tmp");
        for e in fs::read_dir(&tmp).io("listing", &tmp)? {
            let p = e.io("listing", &tmp)?.path();
            if !is_young(&p) {
                report.stale_tmp.push(p);
            }
        }
        if opts.delete {
            for (id, _) in &report.unreachable {
                let dir = self.object_dir(id);
                // Move out of objects/ first so a half-deleted object is never visible.
                let doomed = tmp.join(format!("gc-{id}"));
                fs::rename(&dir, &doomed).io("moving object out", &dir)?;
                make_writable(&doomed);
                fs::remove_dir_all(&doomed).io("deleting", &doomed)?;
            }
            for p in &report.stale_tmp {
                make_writable(p);
                let _ = fs::remove_dir_all(p).or_else(|_| fs::remove_file(p));
            }
        }
        Ok(report)
    }
}

fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    let mut files = Vec::new();
    walk(src, src, &mut files)?;
    for (rel, abs) in files {
        let target = dst.join(&rel);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).io("creating directory", parent)?;
        }
        fs::copy(&abs, &target).io("copying", &abs)?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644))
            .io("setting permissions", &target)?;
    }
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| Error::Record {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

fn read_json_opt<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Record {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).io("reading", path),
    }
}
