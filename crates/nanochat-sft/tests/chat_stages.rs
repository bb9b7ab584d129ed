//! Mid-training and SFT as processes on the embedded sample (data/sample/chat), starting from a
//! tiny random base model: a few steps each, outputs published, bad task files named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nanochat_model::{save_checkpoint, CheckpointMeta, Gpt, GptConfig};
use nanochat_tokenizer::Tokenizer;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Binaries of sibling crates live next to this test's own binary's target dir.
fn bin(name: &str) -> PathBuf {
    let sft = PathBuf::from(env!("CARGO_BIN_EXE_nanochat-sft"));
    sft.with_file_name(name)
}

fn setup(dir: &Path) {
    let tok = Tokenizer::nanochat("bytes", (0..=255u8).map(|b| vec![b]).collect()).unwrap();
    tok.save(&dir.join("tokenizer")).unwrap();
    let cfg = GptConfig::from_depth(1, tok.vocab_size() as usize, 64).unwrap();
    let model = Gpt::new(cfg, 3).unwrap();
    save_checkpoint(&model, &dir.join("base/model"), &CheckpointMeta::new(0)).unwrap();
}

const TASKS: &str = r#"
[[tasks]]
kind = "smoltalk"
path = "smoltalk_train.jsonl.gz"
stop = 40
[[tasks]]
kind = "gsm8k"
path = "gsm8k_train.jsonl.gz"
stop = 20
[[tasks]]
kind = "mmlu"
path = "mmlu_dev.jsonl.gz"
stop = 20
[[tasks]]
kind = "arc"
path = "arc_easy_validation.jsonl.gz"
stop = 20
[[tasks]]
kind = "custom_json"
path = "identity.jsonl"
[[tasks]]
kind = "simple_spelling"
words = "words.txt.gz"
size = 20
[[tasks]]
kind = "spelling_bee"
words = "words.txt.gz"
size = 20
"#;

fn run(dir: &Path, binary: &str, config: &str, model: &str, out: &str) -> Output {
    // `cargo test --workspace` builds every stage binary (nanochat-midtrain has its own test
    // target); `cargo test -p nanochat-sft` alone does not build the sibling.
    assert!(
        bin(binary).exists(),
        "{} is not built: run `cargo build -p {binary}` (or `cargo test --workspace`)",
        bin(binary).display()
    );
    let cfg = dir.join(format!("{out}.toml"));
    std::fs::write(&cfg, config).unwrap();
    std::fs::create_dir_all(dir.join(out)).unwrap();
    Command::new(bin(binary))
        .arg("--config")
        .arg(&cfg)
        .arg("--input")
        .arg(format!("model={}", dir.join(model).display()))
        .arg("--input")
        .arg(format!("tokenizer={}", dir.join("tokenizer").display()))
        .arg("--input")
        .arg(format!(
            "chat={}",
            repo().join("data/sample/chat").display()
        ))
        .arg("--out")
        .arg(dir.join(out))
        .arg("--work")
        .arg(dir.join(format!("{out}-work")))
        .output()
        .unwrap()
}

#[test]
fn midtrain_then_sft_on_the_sample_mixture() {
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    let mid_cfg = format!(
        "threads = 1\n[train]\ndevice_batch_size = 2\ntotal_batch_size = 128\nnum_iterations = 3\neval_batches = 1\n{TASKS}"
    );
    let o = run(d.path(), "nanochat-midtrain", &mid_cfg, "base", "mid");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.path().join("mid/model/model.safetensors").exists());

    let sft_cfg = format!(
        "threads = 1\nmax_tokens = 256\n[train]\ndevice_batch_size = 2\ntotal_batch_size = 4\nnum_iterations = 3\neval_batches = 1\n{TASKS}"
    );
    let o = run(d.path(), "nanochat-sft", &sft_cfg, "mid", "sft");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("sft/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["step"], 3);
    assert!(summary["val_bpb"].as_f64().unwrap().is_finite());
    // The artifact is self-contained: the tokenizer it was trained with loads from it.
    let tok = nanochat_tokenizer::Tokenizer::load(&d.path().join("sft/tokenizer")).unwrap();
    assert!(tok.special_id("<|assistant_end|>").is_some());
}

#[test]
fn missing_task_file_is_named() {
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    let cfg = "[train]\ndevice_batch_size = 1\ntotal_batch_size = 1\nnum_iterations = 1\n\
               [[tasks]]\nkind = \"smoltalk\"\npath = \"no_such_file.jsonl\"\n";
    let o = run(d.path(), "nanochat-sft", cfg, "base", "sft");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no_such_file.jsonl"), "{err}");
}

/// Runs `binary` with an explicit work dir and extra environment (crash-resume tests).
fn run_in(
    dir: &Path,
    binary: &str,
    config: &str,
    out: &str,
    work: &str,
    env: &[(&str, &str)],
) -> Output {
    let cfg = dir.join(format!("{out}.toml"));
    std::fs::write(&cfg, config).unwrap();
    std::fs::create_dir_all(dir.join(out)).unwrap();
    Command::new(bin(binary))
        .arg("--config")
        .arg(&cfg)
        .arg("--input")
        .arg(format!("model={}", dir.join("base").display()))
        .arg("--input")
        .arg(format!("tokenizer={}", dir.join("tokenizer").display()))
        .arg("--input")
        .arg(format!(
            "chat={}",
            repo().join("data/sample/chat").display()
        ))
        .arg("--out")
        .arg(dir.join(out))
        .arg("--work")
        .arg(dir.join(work))
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Runs `binary` uninterrupted, then again aborting right after step 3 (checkpoints every 2
/// steps, so step 2's is the newest), then once more in the crashed run's work dir; checks that
/// the rerun resumed from step 2 and published byte-identical weights and a metrics file whose
/// training steps run 1..=steps once each.
fn crash_at_step_3_then_resume_is_bit_identical(binary: &str, cfg: &str, steps: u64) {
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    let full = run_in(d.path(), binary, cfg, "full", "full-work", &[]);
    assert!(
        full.status.success(),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );
    let abort = [("NANOCHAT_TEST_ABORT_AT_STEP", "3")];
    let crashed = run_in(d.path(), binary, cfg, "crashed", "work", &abort);
    assert!(!crashed.status.success(), "the abort hook did not fire");
    assert!(d
        .path()
        .join("work/ckpt-00000002/train_state.json")
        .is_file());
    assert!(
        !d.path().join("crashed/model").exists(),
        "nothing published by a crashed run"
    );
    let resumed = run_in(d.path(), binary, cfg, "resumed", "work", &[]);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{err}");
    assert!(
        err.contains("resuming from checkpoint") && err.contains("ckpt-00000002"),
        "{err}"
    );
    let w = |o: &str| std::fs::read(d.path().join(o).join("model/model.safetensors")).unwrap();
    assert!(
        w("full") == w("resumed"),
        "resumed weights differ from the uninterrupted run"
    );
    let metrics = std::fs::read_to_string(d.path().join("resumed/metrics.jsonl")).unwrap();
    let logged: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(logged, (1..=steps).collect::<Vec<_>>());
}

#[test]
fn sft_killed_mid_run_resumes_to_identical_weights() {
    let cfg = format!(
        "threads = 1\nmax_tokens = 256\n[train]\ndevice_batch_size = 2\ntotal_batch_size = 4\nnum_iterations = 4\nsave_every = 2\neval_batches = 1\n{TASKS}"
    );
    crash_at_step_3_then_resume_is_bit_identical("nanochat-sft", &cfg, 4);
}

#[test]
fn midtrain_killed_mid_run_resumes_to_identical_weights() {
    let cfg = format!(
        "threads = 1\n[train]\ndevice_batch_size = 2\ntotal_batch_size = 256\nnum_iterations = 5\nsave_every = 2\neval_batches = 1\n{TASKS}"
    );
    crash_at_step_3_then_resume_is_bit_identical("nanochat-midtrain", &cfg, 5);
}
