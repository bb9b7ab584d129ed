//! The speedrun's stage graph, run for real at CI size, and the reproducibility rule of
//! docs/artifacts.md ("Results only"): `pipelines/speedrun-ci.yaml` is `pipelines/speedrun.yaml`
//! with tiny configs (checked: same stages, binaries, inputs and serve target; the tiny
//! pipeline too). It runs end to end with the real stage binaries on the embedded sample; then
//! every stage is rerun with `--force`, and each rerun must publish the same object id while
//! every other stage stays cached. The same check on `pipelines/tiny.yaml` itself (same graph,
//! real tiny configs: minutes of training) is an ignored test that scripts/slow-tests.sh runs.
//!
//! Needs the stage binaries built next to `nanochat-run` (`cargo test --workspace` builds
//! them). About a minute in the dev profile on 2 cores.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use nanochat_artifacts::ArtifactStore;

mod common;

const STAGES: [&str; 7] = [
    "nanochat-data",
    "nanochat-tokenizer",
    "nanochat-pretrain",
    "nanochat-midtrain",
    "nanochat-sft",
    "nanochat-eval",
    "nanochat-report",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

fn bin_dir() -> PathBuf {
    let run = PathBuf::from(env!("CARGO_BIN_EXE_nanochat-run"));
    let dir = run.parent().unwrap().to_path_buf();
    for b in STAGES {
        assert!(
            dir.join(b).is_file(),
            "{} is not built: run `cargo test --workspace` (or `cargo build --bins`)",
            dir.join(b).display()
        );
    }
    dir
}

/// (stage -> (binary, inputs), serve stage) of a pipeline file.
type Graph = (BTreeMap<String, (String, BTreeMap<String, String>)>, String);

fn graph(file: &str) -> Graph {
    let text = std::fs::read_to_string(repo().join("pipelines").join(file)).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut stages = BTreeMap::new();
    for (name, s) in v["stages"].as_mapping().unwrap() {
        let inputs = match &s["inputs"] {
            serde_yaml::Value::Mapping(m) => m
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    )
                })
                .collect(),
            serde_yaml::Value::Null => BTreeMap::new(),
            other => panic!("{file}: inputs as {other:?}"),
        };
        stages.insert(
            name.as_str().unwrap().to_string(),
            (s["run"].as_str().unwrap().to_string(), inputs),
        );
    }
    let serve = v["serve"]["stage"].as_str().unwrap_or("").to_string();
    (stages, serve)
}

#[test]
fn the_speedrun_names_every_stage_and_its_ci_copy_and_the_tiny_and_gpu_pipelines_share_its_graph() {
    let speedrun = graph("speedrun.yaml");
    let names: Vec<&str> = speedrun.0.keys().map(String::as_str).collect();
    for stage in [
        "data",
        "tokenizer",
        "pretrain",
        "midtrain",
        "sft",
        "base_eval",
        "mid_eval",
        "sft_eval",
        "report",
    ] {
        assert!(names.contains(&stage), "speedrun.yaml lacks {stage}");
    }
    assert_eq!(speedrun.1, "sft", "the speedrun serves its SFT model");
    assert_eq!(graph("speedrun-ci.yaml"), speedrun);
    assert_eq!(graph("tiny.yaml").0, speedrun.0);
    assert_eq!(graph("gpu-smoke.yaml").0, speedrun.0);
}

struct Ci {
    pipeline: &'static str,
    store: tempfile::TempDir,
    bins: PathBuf,
}

impl Ci {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_nanochat-run"));
        c.current_dir(repo())
            .env("NANOCHAT_BIN_DIR", &self.bins)
            .env("NANOCHAT_ARTIFACTS", self.store.path())
            .env("RUST_LOG", "nanochat_run=info")
            .arg(self.pipeline)
            .args(args);
        c
    }
    fn run_ok(&self, args: &[&str]) -> String {
        common::run_ok(self.cmd(args), args)
    }
    fn ids(&self) -> BTreeMap<String, String> {
        let store = ArtifactStore::open(self.store.path()).unwrap();
        store
            .list_refs()
            .unwrap()
            .into_iter()
            .filter_map(|(name, id)| {
                let stage = name.strip_prefix(&format!("runs/{}/", self.pipeline))?;
                Some((stage.to_string(), id.to_string()))
            })
            .collect()
    }
}

/// stage -> status of the summary table nanochat-run prints.
fn statuses(stdout: &str) -> BTreeMap<String, String> {
    common::statuses(stdout).into_iter().collect()
}

#[test]
fn every_stage_rerun_with_force_publishes_the_same_object_and_nothing_downstream_reruns() {
    rerun_every_stage("speedrun-ci");
}

/// The same on the tiny pipeline itself (same graph, minutes of training: a slow test).
#[test]
#[ignore = "slow: trains the tiny models, then retrains each (scripts/slow-tests.sh)"]
fn every_stage_of_the_tiny_pipeline_rerun_with_force_publishes_the_same_object() {
    rerun_every_stage("tiny");
}

fn rerun_every_stage(pipeline: &'static str) {
    let ci = Ci {
        pipeline,
        store: tempfile::tempdir().unwrap(),
        bins: bin_dir(),
    };
    if pipeline == "speedrun-ci" {
        let dry = ci.run_ok(&["--dry-run"]);
        assert!(
            dry.contains("serve: `nanochat-run serve --pipeline"),
            "{dry}"
        );
    }
    let first = ci.run_ok(&[]);
    let st = statuses(&first);
    assert_eq!(st.len(), 9, "{first}");
    assert!(st.values().all(|s| s == "ran"), "{first}");
    let ids = ci.ids();
    assert_eq!(ids.len(), 9, "{ids:?}");

    // The report card reads as a page: the summary table first, a section per stage.
    let store = ArtifactStore::open(ci.store.path()).unwrap();
    let report = store.object_data(&ids["report"].parse().unwrap());
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("\n\n| Metric |"), "{md}");
    assert!(md.find("| Metric |") < md.find("## pretrain"), "{md}");
    assert!(md.contains("![curves/pretrain_loss.svg]"), "{md}");
    assert!(
        md.contains("Took "),
        "durations come from the run dirs: {md}"
    );
    let tok = store.object_data(&ids["tokenizer"].parse().unwrap());
    let tok_eval = std::fs::read_to_string(tok.join("tok_eval.md")).unwrap();
    assert!(
        tok_eval.contains("| Text Type |"),
        "tok_eval.md: {tok_eval:?}"
    );

    for stage in ids.keys() {
        let out = ci.run_ok(&["--force", stage]);
        let st = statuses(&out);
        for (s, status) in &st {
            let want = if s == stage { "ran" } else { "cached" };
            assert_eq!(status, want, "--force {stage}: {s} is {status}\n{out}");
        }
        assert_eq!(ci.ids(), ids, "--force {stage} changed an object id");
    }
}

/// The CI pipeline's training chain with every training stage at `ranks: 2`: pretrain,
/// midtrain and SFT each train as two CPU ranks over the TCP collective (their slices of the
/// documents and conversations, one gradient all-reduce per step) and publish rank 0's model.
#[test]
fn the_training_stages_run_as_two_ranks() {
    let repo = repo();
    let cfg = |name: &str| {
        repo.join("configs/speedrun-ci")
            .join(name)
            .display()
            .to_string()
    };
    let store = tempfile::tempdir().unwrap();
    let yaml = format!(
        "name: ranks-ci
stages:
  data:
    run: nanochat-data
    config: {data}
  tokenizer:
    run: nanochat-tokenizer
    config: {tokenizer}
    inputs: {{ corpus: data }}
  pretrain:
    run: nanochat-pretrain
    ranks: 2
    config: {pretrain}
    inputs: {{ corpus: data, tokenizer: tokenizer }}
  midtrain:
    run: nanochat-midtrain
    ranks: 2
    config: {midtrain}
    inputs: {{ model: pretrain, tokenizer: tokenizer, chat: data }}
  sft:
    run: nanochat-sft
    ranks: 2
    config: {sft}
    inputs: {{ model: midtrain, tokenizer: tokenizer, chat: data }}
",
        data = cfg("data.toml"),
        tokenizer = cfg("tokenizer.toml"),
        pretrain = cfg("pretrain.toml"),
        midtrain = cfg("midtrain.toml"),
        sft = cfg("sft.toml"),
    );
    let file = store.path().join("ranks-ci.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nanochat-run"));
    cmd.current_dir(&repo)
        .env("NANOCHAT_BIN_DIR", bin_dir())
        .env("NANOCHAT_ARTIFACTS", store.path().join("artifacts"))
        // The stages inherit it: the trainer's "data-parallel training" line is checked below.
        .env("RUST_LOG", "nanochat_run=info,nanochat_train=info")
        .arg(&file);
    let out = common::run_ok(cmd, &["ranks-ci.yaml"]);
    let st = statuses(&out);
    assert_eq!(st.len(), 5, "{out}");
    assert!(st.values().all(|s| s == "ran"), "{out}");
    let artifacts = ArtifactStore::open(store.path().join("artifacts")).unwrap();
    for stage in ["pretrain", "midtrain", "sft"] {
        let log = artifacts
            .resolve_ref(&format!("logs/ranks-ci/{stage}"))
            .unwrap();
        let text =
            std::fs::read_to_string(artifacts.object_data(&log).join(format!("{stage}.log")))
                .unwrap();
        for r in 0..2 {
            let prefix = format!("[rank {r}] ");
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&prefix) && l.contains("data-parallel training")),
                "{stage}: rank {r} did not train data-parallel:\n{text}"
            );
        }
        let data =
            artifacts.object_data(&artifacts.resolve_ref(&format!("latest/{stage}")).unwrap());
        assert!(data.join("model/model.safetensors").is_file(), "{stage}");
    }
}
