//! Multi-rank stages: `nanochat-run` starting local ranks (`ranks: N`) and `srun`
//! (`launcher: { kind: slurm }`, with a stand-in `srun` that starts the tasks the way Slurm
//! does), running the `dist_toy_stage` example, whose ranks all-reduce through nanochat-dist.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nanochat_artifacts::ArtifactStore;

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let p = profile_dir.join("examples").join(name);
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
        fs::copy(example("dist_toy_stage"), bin.join("dist-toy-stage")).unwrap();
        fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        Env { dir }
    }
    fn root(&self) -> &Path {
        self.dir.path()
    }
    fn store(&self) -> ArtifactStore {
        ArtifactStore::open(self.root().join("artifacts")).unwrap()
    }
    fn pipeline(&self, yaml: &str) {
        fs::write(self.root().join("pipelines/p.yaml"), yaml).unwrap();
    }
    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nanochat-run"));
        c.current_dir(self.root())
            .env("NANOCHAT_BIN_DIR", self.root().join("bin"))
            .env("NANOCHAT_DIST_CONNECT_TIMEOUT", "60")
            .env_remove("NANOCHAT_ARTIFACTS")
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .env("RUST_LOG", "nanochat_run=info")
            .args(["p"]);
        for v in [
            "RANK",
            "WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "SLURM_PROCID",
        ] {
            c.env_remove(v);
        }
        c
    }
    fn run(&self, cmd: &mut Command) -> (Output, String) {
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        (out, stdout)
    }
    fn latest(&self, stage: &str) -> Option<PathBuf> {
        let s = self.store();
        s.get_ref(&format!("latest/{stage}"))
            .unwrap()
            .map(|id| s.object_data(&id))
    }
    fn log(&self, stage: &str) -> String {
        let s = self.store();
        let id = s.resolve_ref(&format!("logs/p/{stage}")).unwrap();
        fs::read_to_string(s.object_data(&id).join(format!("{stage}.log"))).unwrap()
    }
}

fn status_of(stdout: &str, stage: &str) -> String {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("STAGE"))
        .skip(1)
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(stage)).then(|| it.next().unwrap_or("").to_string())
        })
        .unwrap_or_else(|| panic!("no row for {stage} in\n{stdout}"))
}

#[test]
fn local_ranks_are_one_job_only_rank_0_is_published_and_ranks_are_in_the_key() {
    let env = Env::new();
    let yaml = |ranks: u32| {
        format!("stages:\n  train:\n    run: dist-toy-stage\n    ranks: {ranks}\n    config: {{ steps: 3 }}\n")
    };
    env.pipeline(&yaml(3));
    let (out, stdout) = env.run(&mut env.cmd());
    assert!(out.status.success());
    assert_eq!(status_of(&stdout, "train"), "ran");
    let data = env.latest("train").unwrap();
    assert_eq!(
        fs::read_to_string(data.join("result.txt")).unwrap(),
        "world 3 sum 6 steps 3\n"
    );
    // Rank 0's --out only: the other ranks wrote into scratch directories.
    assert!(data.join("rank0.txt").is_file());
    assert!(!data.join("rank1.txt").exists() && !data.join("rank2.txt").exists());
    let log = env.log("train");
    for r in 0..3 {
        assert!(
            log.contains(&format!("[rank {r}] dist_toy_stage: rank {r} of 3")),
            "{log}"
        );
    }
    assert!(
        log.contains("# launch: 3 local ranks, rendezvous at 127.0.0.1:"),
        "{log}"
    );

    // The world size is part of the stage key.
    env.pipeline(&yaml(2));
    let (out, stdout) = env.run(&mut env.cmd());
    assert!(out.status.success());
    assert_eq!(status_of(&stdout, "train"), "ran");
    assert!(stdout.contains("ranks changed (3 -> 2)"), "{stdout}");
    let data = env.latest("train").unwrap();
    assert_eq!(
        fs::read_to_string(data.join("result.txt")).unwrap(),
        "world 2 sum 3 steps 3\n"
    );
    env.pipeline(&yaml(3));
    let (_, stdout) = env.run(&mut env.cmd());
    assert_eq!(status_of(&stdout, "train"), "cached");
}

#[test]
fn a_failing_rank_fails_the_stage_within_seconds_and_nothing_is_published() {
    // After joining: its abort reaches the others' collectives.
    let env = Env::new();
    env.pipeline(
        "stages:\n  train:\n    run: dist-toy-stage\n    ranks: 3\n    config: { steps: 10000, sleep_ms: 20, fail_rank: 1, fail_step: 5 }\n",
    );
    let t0 = Instant::now();
    let (out, stdout) = env.run(&mut env.cmd());
    let took = t0.elapsed();
    assert!(!out.status.success());
    assert_eq!(status_of(&stdout, "train"), "failed");
    // Every rank exits within milliseconds of rank 1; the log says who started it.
    assert!(
        stdout.contains("was the first seen to fail (exit status: 1)"),
        "{stdout}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(env.latest("train").is_none(), "nothing published");
    let log = env.log("train");
    assert!(
        log.contains("[rank 1] Error: failing on purpose at step 5"),
        "{log}"
    );
    assert!(
        log.contains("rank 1 failed: failing on purpose (fail_rank)"),
        "{log}"
    );

    // Before joining: the others wait in the rendezvous until nanochat-run stops them.
    let env = Env::new();
    env.pipeline(
        "stages:\n  train:\n    run: dist-toy-stage\n    ranks: 3\n    config: { steps: 3, fail_before_join: 2 }\n",
    );
    let t0 = Instant::now();
    let (out, stdout) = env.run(&mut env.cmd());
    let took = t0.elapsed();
    assert!(!out.status.success());
    // The others were still waiting for rank 2: it is the one that failed.
    assert!(
        stdout.contains("rank 2 was the first seen to fail (exit status: 1)"),
        "{stdout}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(env.latest("train").is_none());
}

#[test]
fn ctrl_c_reaches_every_rank() {
    let env = Env::new();
    env.pipeline(
        "stages:\n  train:\n    run: dist-toy-stage\n    ranks: 2\n    config: { steps: 100000, sleep_ms: 10 }\n",
    );
    let child = env
        .cmd()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until both ranks are stepping (their pids are the stage's children).
    let store = env.store();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let joined = fs::read_dir(store.root().join("work"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|d| fs::read_dir(d.path()).ok())
            .flatten()
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().starts_with("joined-"))
            .count();
        if joined == 2 {
            std::thread::sleep(Duration::from_millis(300));
            break;
        }
        assert!(Instant::now() < deadline, "the stage never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: signalling the nanochat-run process this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let t0 = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert_eq!(out.status.code(), Some(130), "{stdout}");
    assert_eq!(status_of(&stdout, "train"), "interrupted", "{stdout}");
    let log = env.log("train");
    // Both ranks saw the signal (or the one that saw it first ended the job for the other).
    assert!(
        log.contains("[rank 0] dist_toy_stage: interrupted"),
        "{log}"
    );
    assert!(
        log.contains("[rank 1] dist_toy_stage: interrupted") || log.contains("[rank 1] Error"),
        "{log}"
    );
}

/// A stand-in for `srun`: reads `--ntasks` and starts that many copies of the command with the
/// variables Slurm gives each task (no MASTER_ADDR/MASTER_PORT: the stage derives them), then
/// exits with the first failing task's status.
const FAKE_SRUN: &str = r#"#!/usr/bin/env bash
set -u
echo "$@" > "$(dirname "$0")/srun-args.txt"
ntasks=1
while [ $# -gt 0 ]; do
  case "$1" in
    --ntasks=*) ntasks="${1#--ntasks=}"; shift ;;
    --*) shift ;;
    *) break ;;
  esac
done
job=$(( (RANDOM % 5000) + 4000 ))
pids=()
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_NTASKS=$ntasks SLURM_LOCALID=$i SLURM_NODEID=0 \
  SLURM_JOB_NODELIST=localhost SLURM_TASKS_PER_NODE=$ntasks SLURM_JOB_ID=$job SLURM_STEP_ID=0 \
    "$@" > >(sed "s/^/$i: /") 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"#;

#[test]
fn slurm_launcher_runs_the_stage_through_srun_with_slurm_variables() {
    let env = Env::new();
    let srun = env.root().join("bin/fake-srun");
    fs::write(&srun, FAKE_SRUN).unwrap();
    fs::set_permissions(&srun, fs::Permissions::from_mode(0o755)).unwrap();
    env.pipeline(
        "stages:\n  train:\n    run: dist-toy-stage\n    launcher: { kind: slurm, nodes: 1, ranks_per_node: 2, srun_args: [--partition=debug] }\n    config: { steps: 2 }\n",
    );
    let (out, stdout) = env.run(env.cmd().env("NANOCHAT_SRUN", &srun));
    assert!(out.status.success(), "{stdout}");
    let args = fs::read_to_string(env.root().join("bin/srun-args.txt")).unwrap();
    assert!(
        args.starts_with("--nodes=1 --ntasks=2 --ntasks-per-node=2 --kill-on-bad-exit=1 --label --partition=debug "),
        "{args}"
    );
    assert!(args.contains("dist-toy-stage --config"), "{args}");
    let data = env.latest("train").unwrap();
    assert_eq!(
        fs::read_to_string(data.join("result.txt")).unwrap(),
        "world 2 sum 3 steps 2\n"
    );
    let log = env.log("train");
    assert!(log.contains("1: dist_toy_stage: rank 1 of 2"), "{log}");
    assert!(log.contains("# launch: "), "{log}");
}
