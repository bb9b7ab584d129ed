//! SIGKILL of the real pretraining process under the orchestrator: `nanochat-run` runs
//! data → tokenizer → pretrain (real stage binaries, not the toy stage); the test kills the
//! `nanochat-pretrain` child with SIGKILL right after its first periodic checkpoint, reruns
//! `nanochat-run`, and checks that the resumed run publishes the same pretrain object (same id:
//! weights, metrics and summary byte-identical; telemetry lives outside the hash) as an
//! uninterrupted run (same thread count). The same with `ranks: 2`, killing rank 1 only: rank 0
//! fails within seconds, nothing is published, and the rerun resumes both ranks.
//!
//! Needs the sibling stage binaries built next to `nanochat-run` (`cargo test --workspace`
//! builds them; `cargo build -p nanochat-data -p nanochat-tokenizer-stage -p nanochat-pretrain`
//! otherwise). A few seconds in the dev profile.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nanochat_artifacts::ArtifactStore;

fn bin_dir() -> PathBuf {
    let run = PathBuf::from(env!("CARGO_BIN_EXE_nanochat-run"));
    let dir = run.parent().unwrap().to_path_buf();
    for b in ["nanochat-data", "nanochat-tokenizer", "nanochat-pretrain"] {
        assert!(
            dir.join(b).is_file(),
            "{} is not built: run `cargo build -p nanochat-data -p nanochat-tokenizer-stage -p nanochat-pretrain` \
             (or `cargo test --workspace`)",
            dir.join(b).display()
        );
    }
    dir
}

const STEPS: u64 = 100;
const SAVE_EVERY: u64 = 4;

/// A fresh store and a three-stage pipeline over a small generated corpus.
fn setup(root: &Path) {
    setup_ranks(root, 1);
}

/// [`setup`] with the pretrain stage run as `ranks` data-parallel ranks.
fn setup_ranks(root: &Path, ranks: u32) {
    let corpus = root.join("source/corpus");
    fs::create_dir_all(&corpus).unwrap();
    for (s, name) in ["a.jsonl", "b.jsonl", "val.jsonl"].iter().enumerate() {
        let mut f = fs::File::create(corpus.join(name)).unwrap();
        for i in 0..80 {
            let text = format!(
                "Shard {s} line {i}: the quick brown fox jumps over the lazy dog; \
                 pack my box with five dozen liquor jugs."
            );
            writeln!(f, "{}", serde_json::json!({ "text": text })).unwrap();
        }
    }
    fs::create_dir_all(root.join("pipelines")).unwrap();
    let yaml = format!(
        "name: killtest
stages:
  data:
    run: nanochat-data
    config: {{ source: {source} }}
  tokenizer:
    run: nanochat-tokenizer
    config: {{ vocab_size: 300 }}
    inputs: {{ corpus: data }}
  pretrain:
    run: nanochat-pretrain
{ranks_line}    config:
      seed: 3
      threads: 1
      model: {{ depth: 1, sequence_len: 32 }}
      train:
        device_batch_size: 2
        total_batch_size: 128
        num_iterations: {STEPS}
        save_every: {SAVE_EVERY}
        eval_every: 0
        eval_batches: 1
        warmdown_ratio: 0.2
    inputs: {{ corpus: data, tokenizer: tokenizer }}
",
        source = root.join("source").display(),
        ranks_line = if ranks > 1 {
            format!("    ranks: {ranks}\n")
        } else {
            String::new()
        }
    );
    fs::write(root.join("pipelines/killtest.yaml"), yaml).unwrap();
}

fn nanochat_run(root: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nanochat-run"));
    c.current_dir(root)
        .env("NANOCHAT_BIN_DIR", bin_dir())
        .env_remove("NANOCHAT_ARTIFACTS")
        .env("RUST_LOG", "info")
        .arg("killtest");
    c
}

fn show(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn published_id(root: &Path) -> nanochat_artifacts::ObjectId {
    let store = ArtifactStore::open(root.join("artifacts")).unwrap();
    store.resolve_ref("latest/pretrain").unwrap()
}

fn published_weights(root: &Path) -> Vec<u8> {
    let store = ArtifactStore::open(root.join("artifacts")).unwrap();
    let id = store.resolve_ref("latest/pretrain").unwrap();
    fs::read(store.object_data(&id).join("model/model.safetensors")).unwrap()
}

/// Pids of the live children of `parent` whose command name starts with `name`.
fn children_named(parent: u32, name: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces, so split after the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().unwrap_or("");
        let ppid: u32 = rest.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        // /proc truncates names to 15 bytes ("nanochat-pretra").
        if ppid == parent && state != "Z" && name.starts_with(comm) && comm.len() >= 8 {
            pids.push(pid);
        }
    }
    pids
}

/// A `ckpt-*` directory in any stage work dir of the store.
fn first_checkpoint(root: &Path) -> Option<PathBuf> {
    for w in fs::read_dir(root.join("artifacts/work")).ok()?.flatten() {
        // The work root also holds the stages' resolved `<key>.toml` configs.
        let Ok(entries) = fs::read_dir(w.path()) else {
            continue;
        };
        for c in entries.flatten() {
            if c.file_name().to_string_lossy().starts_with("ckpt-") {
                return Some(c.path());
            }
        }
    }
    None
}

#[test]
fn sigkill_of_pretrain_under_nanochat_run_then_rerun_gives_identical_weights() {
    // Reference: the same pipeline, uninterrupted.
    let clean = tempfile::tempdir().unwrap();
    setup(clean.path());
    let out = nanochat_run(clean.path()).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let expected = published_weights(clean.path());
    let expected_id = published_id(clean.path());

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup(root);
    let mut run = nanochat_run(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let (ckpt, pid) = loop {
        assert!(
            Instant::now() < deadline,
            "pretrain never wrote a checkpoint"
        );
        if let Some(ckpt) = first_checkpoint(root) {
            let pids = children_named(run.id(), "nanochat-pretrain");
            assert_eq!(pids.len(), 1, "expected one pretrain child, found {pids:?}");
            break (ckpt, pids[0]);
        }
        assert!(
            run.try_wait().unwrap().is_none(),
            "nanochat-run exited before pretrain checkpointed"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: a plain syscall on the stage process this test started through nanochat-run.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed = run.wait_with_output().unwrap();
    assert!(!killed.status.success(), "{}", show(&killed));
    let store = ArtifactStore::open(root.join("artifacts")).unwrap();
    assert!(
        store.get_ref("latest/pretrain").unwrap().is_none(),
        "a killed stage must publish nothing"
    );
    let work = ckpt.parent().unwrap().to_path_buf();
    let steps_done: Vec<String> = fs::read_dir(&work)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("ckpt-"))
        .collect();
    assert!(
        !steps_done.iter().any(|n| n == &format!("ckpt-{STEPS:08}")),
        "killed too late: {steps_done:?}"
    );

    let rerun = nanochat_run(root).output().unwrap();
    let text = show(&rerun);
    assert!(rerun.status.success(), "{text}");
    let log = store.resolve_ref("logs/killtest/pretrain").unwrap();
    let log_text = fs::read_to_string(store.object_data(&log).join("pretrain.log")).unwrap();
    assert!(
        log_text.contains("resuming from checkpoint"),
        "the rerun did not resume: {log_text}"
    );
    assert!(
        published_weights(root) == expected,
        "weights after SIGKILL + rerun differ from the uninterrupted run"
    );
    let id = published_id(root);
    if id != expected_id {
        let files = |r: &Path, id: &nanochat_artifacts::ObjectId| {
            let store = ArtifactStore::open(r.join("artifacts")).unwrap();
            store.manifest(id).unwrap().files
        };
        let (a, b) = (files(clean.path(), &expected_id), files(root, &id));
        let differ: Vec<&str> = b
            .iter()
            .filter(|f| !a.contains(f))
            .map(|f| f.path.as_str())
            .collect();
        panic!("the resumed pretrain object differs from the uninterrupted one in {differ:?}");
    }
}

/// The value of `name` in the environment of process `pid`.
fn env_of(pid: i32, name: &str) -> Option<String> {
    let environ = fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ.split(|&b| b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{name}="))
            .map(std::string::ToString::to_string)
    })
}

#[test]
fn sigkill_of_one_rank_of_two_fails_the_stage_and_the_rerun_gives_identical_weights() {
    let clean = tempfile::tempdir().unwrap();
    setup_ranks(clean.path(), 2);
    let out = nanochat_run(clean.path()).output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let expected = published_weights(clean.path());
    let expected_id = published_id(clean.path());

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    setup_ranks(root, 2);
    let mut run = nanochat_run(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let victim = loop {
        assert!(
            Instant::now() < deadline,
            "pretrain never wrote a checkpoint"
        );
        if first_checkpoint(root).is_some() {
            let pids = children_named(run.id(), "nanochat-pretrain");
            assert_eq!(pids.len(), 2, "expected two pretrain ranks, found {pids:?}");
            let rank1 = pids
                .iter()
                .copied()
                .find(|&p| env_of(p, "RANK").as_deref() == Some("1"));
            break rank1.expect("no child with RANK=1");
        }
        assert!(
            run.try_wait().unwrap().is_none(),
            "nanochat-run exited before pretrain checkpointed"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: a plain syscall on a stage process this test started through nanochat-run.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    let killed = run.wait_with_output().unwrap();
    // Rank 0 notices the dead peer at its next collective (milliseconds), not at a timeout.
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the stage took {:?} to fail",
        t0.elapsed()
    );
    let text = show(&killed);
    assert!(!killed.status.success(), "{text}");
    let store = ArtifactStore::open(root.join("artifacts")).unwrap();
    assert!(
        store.get_ref("latest/pretrain").unwrap().is_none(),
        "a killed stage must publish nothing"
    );
    let log = store.resolve_ref("logs/killtest/pretrain").unwrap();
    let log_text = fs::read_to_string(store.object_data(&log).join("pretrain.log")).unwrap();
    // Which exit nanochat-run reaps first is a race (rank 0 follows within milliseconds); rank
    // 0's own error says who it lost.
    assert!(
        log_text.lines().any(|l| l.starts_with("[rank 0] ")
            && l.contains("collective failed: rank 1 closed its connection")),
        "rank 0 must fail on its collective, naming rank 1: {log_text}"
    );

    let rerun = nanochat_run(root).output().unwrap();
    assert!(rerun.status.success(), "{}", show(&rerun));
    let log = store.resolve_ref("logs/killtest/pretrain").unwrap();
    let log_text = fs::read_to_string(store.object_data(&log).join("pretrain.log")).unwrap();
    for r in 0..2 {
        let prefix = format!("[rank {r}] ");
        assert!(
            log_text
                .lines()
                .any(|l| l.starts_with(&prefix) && l.contains("resuming from checkpoint")),
            "rank {r} did not resume: {log_text}"
        );
    }
    assert!(
        published_weights(root) == expected,
        "weights after SIGKILL of rank 1 + rerun differ from the uninterrupted 2-rank run"
    );
    assert_eq!(
        published_id(root),
        expected_id,
        "the resumed pretrain object differs"
    );
}
