//! End-to-end tests: real `nanochat-run` processes running real stage processes (the
//! `toy_stage` example) against a real store on disk.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nanochat_artifacts::{ArtifactStore, ObjectId, ProducerRecord, VerifyMode};

mod common;

/// The `toy_stage` example binary, built by `cargo test` next to the test executables.
fn toy_stage() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let p = profile_dir.join("examples").join("toy_stage");
    assert!(
        p.is_file(),
        "{} missing: run these tests with `cargo test -p nanochat-run` (which builds examples)",
        p.display()
    );
    p
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        fs::copy(toy_stage(), bin.join("toy-stage")).unwrap();
        fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        Env { dir }
    }
    fn root(&self) -> &Path {
        self.dir.path()
    }
    fn store(&self) -> ArtifactStore {
        ArtifactStore::open(self.root().join("artifacts")).unwrap()
    }
    fn write_pipeline(&self, name: &str, yaml: &str) -> PathBuf {
        let p = self.root().join("pipelines").join(name);
        fs::write(&p, yaml).unwrap();
        p
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nanochat-run"));
        c.current_dir(self.root())
            .env("NANOCHAT_BIN_DIR", self.root().join("bin"))
            .env_remove("NANOCHAT_ARTIFACTS")
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .env("RUST_LOG", "nanochat_run=info")
            .args(args);
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        common::run(self.cmd(args), args)
    }
    fn run_ok(&self, args: &[&str]) -> String {
        common::run_ok(self.cmd(args), args)
    }
    fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
    fn result(&self, stage: &str) -> String {
        let s = self.store();
        let id = s.resolve_ref(&format!("latest/{stage}")).unwrap();
        fs::read_to_string(s.object_data(&id).join("result.txt")).unwrap()
    }
}

use common::statuses;

fn status_of(stdout: &str, stage: &str) -> String {
    statuses(stdout)
        .into_iter()
        .find(|(s, _)| s == stage)
        .map(|(_, st)| st)
        .unwrap_or_else(|| panic!("no row for {stage} in\n{stdout}"))
}

const DIAMOND: &str = "\
name: diamond
stages:
  a:
    run: toy-stage
    config: { text: alpha, steps: 2 }
  b:
    run: toy-stage
    config: { text: beta, steps: 1 }
    inputs: [a]
  c:
    run: toy-stage
    config: { text: gamma }
    inputs: { first: a, second: b }
  d:
    run: toy-stage
    config: { text: delta }
";

#[test]
fn second_run_does_nothing_and_a_config_change_reruns_only_dependents() {
    let env = Env::new();
    env.write_pipeline("diamond.yaml", DIAMOND);
    let out = env.run_ok(&["pipelines/diamond.yaml", "--jobs", "2"]);
    for s in ["a", "b", "c", "d"] {
        assert_eq!(status_of(&out, s), "ran", "{out}");
    }
    assert_eq!(
        env.result("c"),
        "alpha\nstep 0\nstep 1\nalpha\nstep 0\nstep 1\nbeta\nstep 0\ngamma\n"
    );

    // Found by name in pipelines/; nothing runs the second time.
    let out = env.run_ok(&["diamond"]);
    for s in ["a", "b", "c", "d"] {
        assert_eq!(status_of(&out, s), "cached", "{out}");
    }
    assert!(out.contains("0 ran, 4 cached"), "{out}");

    // Change b's config: dry run explains, then only b and c run.
    env.write_pipeline("diamond.yaml", &DIAMOND.replace("text: beta", "text: BETA"));
    let dry = env.run_ok(&["diamond.yaml", "--dry-run"]);
    assert!(
        dry.contains("config changed: text (\"beta\" -> \"BETA\")"),
        "{dry}"
    );
    assert!(dry.contains("input from b will be rebuilt first"), "{dry}");
    assert!(
        !dry.lines()
            .any(|l| l.starts_with("a ") && l.contains("would run")),
        "{dry}"
    );
    let out = env.run_ok(&["diamond.yaml"]);
    assert_eq!(status_of(&out, "a"), "cached");
    assert_eq!(status_of(&out, "b"), "ran");
    assert_eq!(status_of(&out, "c"), "ran");
    assert_eq!(status_of(&out, "d"), "cached");
    assert!(env.result("c").contains("BETA"));

    // The run records and refs reflect this.
    let store = env.store();
    let records = store.run_records().unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(records[2].pipeline, "diamond");
    assert!(store.get_ref("runs/diamond/c").unwrap().is_some());
    assert!(store.get_ref("logs/diamond/c").unwrap().is_some());

    // status shows everything cached; after changing d's config it is stale, with the reason.
    let st = env.run_ok(&["status", "diamond"]);
    assert!(statuses(&st).iter().all(|(_, s)| s == "cached"), "{st}");
    env.write_pipeline(
        "diamond.yaml",
        &DIAMOND
            .replace("text: beta", "text: BETA")
            .replace("text: delta", "text: DELTA"),
    );
    let st = env.run_ok(&["status", "diamond"]);
    assert_eq!(status_of(&st, "d"), "stale", "{st}");
    assert!(st.contains("config changed: text"), "{st}");
}

/// The run dir holds what differs between runs: a forced rerun of a deterministic stage
/// publishes the same object, keeps its first producer's run dir, and leaves downstream cached;
/// the rerun's own telemetry is in its log object.
#[test]
fn telemetry_lives_beside_the_object_so_a_forced_rerun_keeps_the_id() {
    let env = Env::new();
    env.write_pipeline("diamond.yaml", DIAMOND);
    env.run_ok(&["diamond"]);
    let store = env.store();
    let a = store.resolve_ref("latest/a").unwrap();
    let run = store.object_run_dir(&a);
    let record = ProducerRecord::read(&run)
        .unwrap()
        .expect("record.json beside a");
    assert_eq!(
        (record.pipeline.as_str(), record.stage.as_str()),
        ("diamond", "a")
    );
    assert!(!record.resumed);
    let first_log = store.resolve_ref("logs/diamond/a").unwrap();
    assert_eq!(record.log.as_ref(), Some(&first_log));
    let telemetry = fs::read_to_string(run.join("telemetry.json")).unwrap();
    assert!(telemetry.contains("pid"), "{telemetry}");
    assert!(
        !store
            .manifest(&a)
            .unwrap()
            .files
            .iter()
            .any(|f| f.path.contains("telemetry")),
        "telemetry must stay out of the hash"
    );

    let dry = env.run_ok(&["diamond", "--force", "a", "--dry-run"]);
    assert!(dry.contains("--force a"), "{dry}");
    let out = env.run_ok(&["diamond", "--force", "a"]);
    assert_eq!(status_of(&out, "a"), "ran", "{out}");
    for downstream in ["b", "c"] {
        assert_eq!(status_of(&out, downstream), "cached", "{out}");
    }
    assert_eq!(
        store.resolve_ref("latest/a").unwrap(),
        a,
        "same result, same id"
    );
    assert_eq!(
        fs::read_to_string(run.join("telemetry.json")).unwrap(),
        telemetry,
        "the object keeps its first producer's run dir"
    );
    let rerun_log = store.resolve_ref("logs/diamond/a").unwrap();
    assert_ne!(rerun_log, first_log);
    let rerun_telemetry =
        fs::read_to_string(store.object_data(&rerun_log).join("run/telemetry.json")).unwrap();
    assert_ne!(
        rerun_telemetry, telemetry,
        "each run's own telemetry is in its log"
    );
}

#[test]
fn only_from_force_and_keep_going() {
    let env = Env::new();
    env.write_pipeline("diamond.yaml", DIAMOND);
    // --only on an uncached upstream fails and says why.
    let out = env.run(&["diamond", "--only", "b"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(status_of(&stdout, "a"), "stale", "{stdout}");
    assert!(stdout.contains("not selected"), "{stdout}");

    env.run_ok(&["diamond"]);
    let dry = env.run_ok(&["diamond", "--only", "b", "--dry-run"]);
    assert!(
        dry.contains("--only b: rerun on its cached inputs"),
        "{dry}"
    );
    assert!(!dry.contains("forced"), "--only says only: {dry}");
    let out = env.run_ok(&["diamond", "--only", "b"]);
    assert_eq!(status_of(&out, "b"), "ran");
    assert_eq!(status_of(&out, "a"), "cached");
    assert!(!statuses(&out).iter().any(|(s, _)| s == "c"), "{out}");

    let out = env.run_ok(&["diamond", "--from", "b"]);
    assert_eq!(status_of(&out, "b"), "ran");
    // b is deterministic, so c's inputs are unchanged and it stays cached.
    assert_eq!(status_of(&out, "c"), "cached");
    assert!(!statuses(&out).iter().any(|(s, _)| s == "d"), "{out}");

    let out = env.run_ok(&["diamond", "--force", "d"]);
    assert_eq!(status_of(&out, "d"), "ran");
    assert_eq!(status_of(&out, "a"), "cached");

    let out = env.run(&["diamond", "--only", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--only nope: no such stage"));

    // A failing stage: dependents are skipped; --keep-going still runs independent stages.
    let failing = DIAMOND
        .replace("text: alpha, steps: 2", "text: alpha2, fail: true")
        .replace("text: delta", "text: delta2");
    env.write_pipeline("diamond.yaml", &failing);
    let out = env.run(&["diamond"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(status_of(&stdout, "a"), "failed", "{stdout}");
    assert_eq!(status_of(&stdout, "b"), "skipped", "{stdout}");
    assert_eq!(status_of(&stdout, "d"), "not-run", "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("failing on purpose"));
    let out = env.run(&["diamond", "--keep-going"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(status_of(&stdout, "d"), "ran", "{stdout}");
    assert_eq!(status_of(&stdout, "c"), "skipped", "{stdout}");
}

fn wait_for_progress(store: &ArtifactStore, min_steps: usize) -> (PathBuf, u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "stage never made progress");
        if let Ok(rd) = fs::read_dir(store.root().join("work")) {
            for e in rd.flatten() {
                let dir = e.path();
                let steps = fs::read_to_string(dir.join("progress.txt"))
                    .map(|t| t.lines().count())
                    .unwrap_or(0);
                let pid = fs::read_to_string(dir.join("pid"))
                    .ok()
                    .and_then(|p| p.parse().ok());
                if let (true, Some(pid)) = (steps >= min_steps, pid) {
                    return (dir, pid);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

const SLOW: &str = "\
stages:
  slow:
    run: toy-stage
    config: { text: slow, steps: 12, sleep_ms: 120 }
  after:
    run: toy-stage
    config: { text: after }
    inputs: [slow]
";

fn uninterrupted_object(stage: &str) -> ObjectId {
    let env = Env::new();
    env.write_pipeline("slow.yaml", SLOW);
    env.run_ok(&["slow"]);
    env.store().resolve_ref(&format!("latest/{stage}")).unwrap()
}

#[test]
fn sigkill_mid_stage_then_rerun_resumes_and_publishes_the_same_object() {
    let env = Env::new();
    env.write_pipeline("slow.yaml", SLOW);
    let store = env.store();
    let child = env.spawn(&["slow"]);
    let (work, pid) = wait_for_progress(&store, 3);
    // SAFETY: signalling the stage process this test started (via nanochat-run).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        store.get_ref("latest/slow").unwrap().is_none(),
        "nothing published"
    );
    assert!(work.join("progress.txt").is_file(), "work dir kept");
    let before = fs::read_to_string(work.join("progress.txt"))
        .unwrap()
        .lines()
        .count();
    assert!((3..12).contains(&before));

    let out = env.run_ok(&["slow"]);
    assert_eq!(status_of(&out, "slow"), "ran");
    assert!(out.contains("resumed from work dir"), "{out}");
    let log = store.resolve_ref("logs/slow/slow").unwrap();
    let log_text = fs::read_to_string(store.object_data(&log).join("slow.log")).unwrap();
    assert!(
        log_text.contains(&format!("resuming from step {before}")),
        "{log_text}"
    );
    assert!(!work.exists(), "work dir removed after publishing");
    let resumed = store.resolve_ref("latest/slow").unwrap();
    assert_eq!(resumed, uninterrupted_object("slow"));
    assert_eq!(
        store.resolve_ref("latest/after").unwrap(),
        uninterrupted_object("after")
    );
}

#[test]
fn ctrl_c_is_forwarded_and_the_stage_saves_before_exiting() {
    let env = Env::new();
    env.write_pipeline("slow.yaml", SLOW);
    let store = env.store();
    let child = env.spawn(&["slow"]);
    let (work, _) = wait_for_progress(&store, 2);
    // SAFETY: signalling the nanochat-run process this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}");
    assert_eq!(status_of(&stdout, "slow"), "interrupted", "{stdout}");
    assert_eq!(status_of(&stdout, "after"), "skipped", "{stdout}");
    let log = store.resolve_ref("logs/slow/slow").unwrap();
    let log_text = fs::read_to_string(store.object_data(&log).join("slow.log")).unwrap();
    assert!(log_text.contains("interrupted at step"), "{log_text}");
    assert!(work.join("progress.txt").is_file());
    let out = env.run_ok(&["slow"]);
    assert!(out.contains("resumed from work dir"), "{out}");
    assert_eq!(
        store.resolve_ref("latest/slow").unwrap(),
        uninterrupted_object("slow")
    );
}

#[test]
fn damaged_objects_are_named_and_rebuilt() {
    let env = Env::new();
    env.write_pipeline(
        "one.yaml",
        "stages:\n  a:\n    run: toy-stage\n    config: { text: hello, steps: 3 }\n",
    );
    env.run_ok(&["one"]);
    let store = env.store();
    let id = store.resolve_ref("latest/a").unwrap();
    let file = store.object_data(&id).join("result.txt");
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = fs::read(&file).unwrap();
    bytes[0] ^= 0x20;
    fs::write(&file, &bytes).unwrap();

    // Fast verification cannot see a same-size flip; the full one names the file.
    assert!(env.run(&["verify", "latest/a"]).status.success());
    let out = env.run(&["verify", "--full", "latest/a"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("result.txt: altered"), "{stdout}");

    // A full-verifying run notices and rebuilds it.
    let out = env.run_ok(&["one", "--verify-full"]);
    assert_eq!(status_of(&out, "a"), "ran", "{out}");
    assert!(
        out.contains("cached output failed verification: result.txt: altered"),
        "{out}"
    );
    store.verify(&id, VerifyMode::Full).unwrap();

    // Truncation is caught by the default (fast) check.
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&file, &bytes[..4]).unwrap();
    let out = env.run(&["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("result.txt: truncated"), "{stdout}");
    let out = env.run_ok(&["one"]);
    assert_eq!(status_of(&out, "a"), "ran", "{out}");
    env.run_ok(&["verify", "--full"]);
}

#[test]
fn malformed_pipelines_give_file_line_and_column() {
    let env = Env::new();
    let cases = [
        ("typo.yaml", "stages:\n  a:\n    run: toy-stage\n    confg: {}\n", "typo.yaml:4:5: stages.a: unknown field `confg`"),
        ("unknown.yaml", "stages:\n  a:\n    run: toy-stage\n    inputs: [zzz]\n", "unknown.yaml:4:14: stage a: input \"zzz\" refers to unknown stage"),
        ("cycle.yaml", "stages:\n  a:\n    run: toy-stage\n    inputs: [b]\n  b:\n    run: toy-stage\n    inputs: [a]\n", "cycle.yaml:2:1: stages form a cycle: a -> b"),
        ("noconfig.yaml", "stages:\n  a:\n    run: toy-stage\n    config: configs/missing.toml\n", "noconfig.yaml:4:5: stage a: config file \"configs/missing.toml\" not found"),
        ("syntax.yaml", "stages:\n  a:\n    run: toy-stage\n   bad indent: [\n", "syntax.yaml:4:"),
    ];
    for (name, yaml, expected) in cases {
        env.write_pipeline(name, yaml);
        let out = env.run(&[&format!("pipelines/{name}")]);
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("pipelines/{expected}")),
            "{name}: {stderr}"
        );
    }
    // A config file with a bad key: the stage rejects it and the log says where.
    fs::create_dir_all(env.root().join("configs")).unwrap();
    fs::write(
        env.root().join("configs/a.toml"),
        "text = \"x\"\nstepz = 3\n",
    )
    .unwrap();
    env.write_pipeline(
        "cfg.yaml",
        "stages:\n  a:\n    run: toy-stage\n    config: configs/a.toml\n",
    );
    let out = env.run(&["cfg"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(":2:1: unknown field `stepz`"), "{stderr}");
    assert!(
        stderr.contains("configs/a.toml"),
        "the log names the user's file: {stderr}"
    );
    // Missing pipelines list what exists.
    let out = env.run(&["nosuch"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pipeline \"nosuch\" not found") && stderr.contains("cfg.yaml"),
        "{stderr}"
    );
    // A missing stage binary says how to build it.
    env.write_pipeline(
        "nobin.yaml",
        "stages:\n  a:\n    run: nanochat-no-such-stage\n",
    );
    let out = env.run(&["nobin"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cargo build --release --bins"), "{stderr}");
}

#[test]
fn config_files_and_paths_win_over_names() {
    let env = Env::new();
    fs::create_dir_all(env.root().join("configs")).unwrap();
    fs::write(env.root().join("configs/a.toml"), "text = \"from file\"\n").unwrap();
    env.write_pipeline(
        "p.yaml",
        "stages:\n  a:\n    run: toy-stage\n    config: configs/a.toml\n",
    );
    // A file named p.yaml in the current directory wins over pipelines/p.yaml.
    fs::write(
        env.root().join("p.yaml"),
        "stages:\n  a:\n    run: toy-stage\n    config: { text: local }\n",
    )
    .unwrap();
    env.run_ok(&["p.yaml"]);
    assert_eq!(env.result("a"), "local\n");
    env.run_ok(&["pipelines/p.yaml"]);
    assert_eq!(env.result("a"), "from file\n");
    // --store and NANOCHAT_ARTIFACTS pick the store.
    let out = env
        .cmd(&["pipelines/p.yaml"])
        .env("NANOCHAT_ARTIFACTS", env.root().join("other"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(ArtifactStore::open(env.root().join("other"))
        .unwrap()
        .get_ref("latest/a")
        .unwrap()
        .is_some());
    env.run_ok(&["--store", "third", "pipelines/p.yaml"]);
    assert!(env.root().join("third/refs/latest/a").is_file());
    // A global --store works before or after a subcommand.
    for args in [
        ["--store", "third", "status", "p"],
        ["status", "--store", "third", "p"],
    ] {
        let st = env.run_ok(&args);
        assert_eq!(status_of(&st, "a"), "cached", "{st}");
    }
}

#[test]
fn concurrent_runs_on_one_store_do_not_corrupt_it() {
    let env = Env::new();
    env.write_pipeline(
        "par.yaml",
        "stages:\n  a:\n    run: toy-stage\n    config: { text: a, steps: 4, sleep_ms: 50 }\n  b:\n    run: toy-stage\n    config: { text: b, steps: 4, sleep_ms: 50 }\n  c:\n    run: toy-stage\n    inputs: [a, b]\n",
    );
    let children: Vec<Child> = (0..3).map(|_| env.spawn(&["par", "-j", "2"])).collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let store = env.store();
    // Each stage ran exactly once (the others waited on its work lock, then hit the cache).
    let ran: usize = store
        .run_records()
        .unwrap()
        .iter()
        .flat_map(|r| r.stages.iter())
        .filter(|s| s.status == "ran")
        .count();
    assert_eq!(ran, 3);
    env.run_ok(&["verify", "--full"]);
    assert_eq!(
        env.result("c"),
        "a\nstep 0\nstep 1\nstep 2\nstep 3\nb\nstep 0\nstep 1\nstep 2\nstep 3\n\n"
    );
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn gc_refs_and_serve() {
    let env = Env::new();
    env.write_pipeline(
        "one.yaml",
        "stages:\n  sft:\n    run: toy-stage\n    config: { text: v1 }\n",
    );
    env.run_ok(&["one"]);
    let store = env.store();
    let v1 = store.resolve_ref("latest/sft").unwrap();
    env.write_pipeline(
        "one.yaml",
        "stages:\n  sft:\n    run: toy-stage\n    config: { text: v2 }\n",
    );
    env.run_ok(&["one"]);
    // v1 is still reachable through its action-cache entry; drop that entry to orphan it.
    for e in store.cache_entries().unwrap() {
        if e.object == v1 {
            fs::remove_file(store.root().join("cache").join(format!("{}.json", e.key))).unwrap();
        }
    }
    let out = env.run_ok(&["gc", "--grace", "0"]);
    assert!(out.contains(&format!("unreachable {v1}")), "{out}");
    assert!(store.contains(&v1));
    let out = env.run_ok(&["gc", "--grace", "0", "--delete"]);
    assert!(out.contains(&format!("deleted {v1}")), "{out}");
    assert!(!store.contains(&v1));
    env.run_ok(&["verify", "--full"]);
    let refs = env.run_ok(&["refs"]);
    assert!(
        refs.contains("latest/sft") && refs.contains("runs/one/sft"),
        "{refs}"
    );

    // serve: launches nanochat-inference with the model dir and passthrough args.
    let fake = env.root().join("bin/nanochat-inference");
    let mut f = fs::File::create(&fake).unwrap();
    writeln!(f, "#!/bin/sh\necho \"inference args: $*\"").unwrap();
    drop(f);
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let out = env.run_ok(&["serve", "--ref", "latest/sft", "--", "--port", "8123"]);
    let v2 = store.resolve_ref("latest/sft").unwrap();
    assert!(
        out.contains(&format!(
            "inference args: --model {} --port 8123",
            store.object_data(&v2).display()
        )),
        "{out}"
    );
    let out = env.run(&["serve", "--ref", "latest/nothing"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ref or object"));
    // Without the binary anywhere, a clear error (skipped if a real one is built next to us).
    fs::remove_file(&fake).unwrap();
    let beside = Path::new(env!("CARGO_BIN_EXE_nanochat-run")).with_file_name("nanochat-inference");
    if beside.exists() {
        eprintln!("skipping missing-binary check: {} exists", beside.display());
    } else {
        let out = env
            .cmd(&["serve"])
            .env("PATH", "/nonexistent")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("`nanochat-inference` not found"),
            "{stderr}"
        );
    }
}

#[test]
fn help_is_complete() {
    let env = Env::new();
    let top = env.run_ok(&["--help"]);
    for needle in [
        "--jobs",
        "--force",
        "--only",
        "--from",
        "--dry-run",
        "--keep-going",
        "--store",
        "NANOCHAT_ARTIFACTS",
        "status",
        "gc",
        "serve",
        "verify",
        "report",
        "Examples:",
    ] {
        assert!(top.contains(needle), "--help lacks {needle}:\n{top}");
    }
    for (sub, needle) in [
        ("status", "PIPELINE"),
        ("gc", "--delete"),
        ("serve", "--ref"),
        ("verify", "--full"),
        ("refs", "List refs"),
        ("report", "--compare"),
    ] {
        let h = env.run_ok(&[sub, "--help"]);
        assert!(h.contains(needle), "{sub} --help lacks {needle}:\n{h}");
    }
}

/// A minimal report.json in the format `nanochat-report` writes (see nanochat-eval's report
/// module): one summary cell and one stage metric.
fn report_json(core: f64, loss: f64) -> String {
    format!(
        r#"{{"title":"t","system":{{"hostname":"h","platform":"linux-x86_64","cpu":"c","cpus":2,
"memory_gib":1.0,"git_commit":null,"nanochat_version":"0","generated_utc":"2026-01-01 00:00:00"}},
"stages":[{{"name":"pretrain","metrics":{{"val_bpb":{loss}}},"curves":[]}}],
"summary":{{"CORE":{{"BASE":{core}}}}},"columns":["BASE"],"notes":[]}}"#
    )
}

#[test]
fn report_compare_resolves_refs_ids_files_and_dirs() {
    let env = Env::new();
    // The real comparer, when `cargo test --workspace` (or `cargo build --bins`) built it.
    let real = Path::new(env!("CARGO_BIN_EXE_nanochat-run")).with_file_name("nanochat-report");
    if !real.is_file() {
        eprintln!(
            "skipping report --compare: {} not built (cargo build -p nanochat-eval)",
            real.display()
        );
        return;
    }
    fs::copy(&real, env.root().join("bin/nanochat-report")).unwrap();
    let a_dir = env.root().join("a");
    fs::create_dir_all(&a_dir).unwrap();
    fs::write(a_dir.join("report.json"), report_json(0.25, 1.5)).unwrap();
    let b_file = env.root().join("b.json");
    fs::write(&b_file, report_json(0.35, 1.25)).unwrap();

    // A directory against a file.
    let out = env.run_ok(&["report", "--compare", "a", "b.json"]);
    assert!(out.contains("# Report comparison"), "{out}");
    assert!(
        out.contains("| CORE | 0.2500 | 0.3500 | +0.1000 |"),
        "{out}"
    );
    assert!(
        out.contains("| pretrain | val_bpb | 1.5000 | 1.2500 | -0.2500 |"),
        "{out}"
    );

    // A stored report by ref against one by object id.
    let store = env.store();
    let a_id = store.publish_dir(&a_dir).unwrap();
    store.set_ref("runs/tiny/report", &a_id).unwrap();
    let b_dir = env.root().join("bdir");
    fs::create_dir_all(&b_dir).unwrap();
    fs::copy(&b_file, b_dir.join("report.json")).unwrap();
    let b_id = store.publish_dir(&b_dir).unwrap();
    let b_id_s = b_id.to_string();
    let out = env.run_ok(&["report", "--compare", "runs/tiny/report", &b_id_s]);
    assert!(
        out.contains("| CORE | 0.2500 | 0.3500 | +0.1000 |"),
        "{out}"
    );

    // Unknown target: a clear error, nothing printed on stdout.
    let out = env.run(&["report", "--compare", "runs/none/report", "b.json"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("neither a report.json") && stderr.contains("no ref or object"),
        "{stderr}"
    );
    // Not a report: the comparer's error, non-zero exit.
    fs::write(env.root().join("junk.json"), "{}").unwrap();
    let out = env.run(&["report", "--compare", "junk.json", "b.json"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a nanochat report.json"));
}
