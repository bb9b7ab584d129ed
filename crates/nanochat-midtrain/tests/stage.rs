//! The `nanochat-midtrain` binary rejects bad configs before touching its inputs. (The full
//! midtrain → SFT run lives in nanochat-sft's tests; this test target also makes
//! `cargo test --workspace` build the midtrain binary those tests launch.)

use std::path::Path;
use std::process::{Command, Output};

#[test]
fn unknown_config_key_names_the_file_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("midtrain.toml");
    std::fs::write(&cfg, "threads = 1\nlearning_rat = 0.1\n").unwrap();
    for d in ["model", "tokenizer", "chat", "out", "work"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let out = Command::new(env!("CARGO_BIN_EXE_nanochat-midtrain"))
        .arg("--config")
        .arg(&cfg)
        .arg("--input")
        .arg(format!("model={}", dir.path().join("model").display()))
        .arg("--input")
        .arg(format!(
            "tokenizer={}",
            dir.path().join("tokenizer").display()
        ))
        .arg("--input")
        .arg(format!("chat={}", dir.path().join("chat").display()))
        .arg("--out")
        .arg(dir.path().join("out"))
        .arg("--work")
        .arg(dir.path().join("work"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("midtrain.toml"), "{err}");
    assert!(err.contains("learning_rat"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path().join("out")).unwrap().count(),
        0,
        "a failed stage must write nothing to --out"
    );
}

/// A random depth-1 base model over a byte tokenizer in `dir/base` and `dir/tokenizer`.
fn base_model(dir: &Path) {
    let tok =
        nanochat_tokenizer::Tokenizer::nanochat("bytes", (0..=255u8).map(|b| vec![b]).collect())
            .unwrap();
    tok.save(&dir.join("tokenizer")).unwrap();
    let cfg = nanochat_model::GptConfig::from_depth(1, tok.vocab_size() as usize, 64).unwrap();
    let model = nanochat_model::Gpt::new(cfg, 5).unwrap();
    nanochat_model::save_checkpoint(
        &model,
        &dir.join("base/model"),
        &nanochat_model::CheckpointMeta::new(0),
    )
    .unwrap();
}

fn midtrain(dir: &Path, config: &str, out: &str, work: &str, env: &[(&str, &str)]) -> Output {
    let cfg = dir.join("midtrain.toml");
    std::fs::write(&cfg, config).unwrap();
    std::fs::create_dir_all(dir.join(out)).unwrap();
    let chat = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/sample/chat");
    Command::new(env!("CARGO_BIN_EXE_nanochat-midtrain"))
        .arg("--config")
        .arg(&cfg)
        .arg("--input")
        .arg(format!("model={}", dir.join("base").display()))
        .arg("--input")
        .arg(format!("tokenizer={}", dir.join("tokenizer").display()))
        .arg("--input")
        .arg(format!("chat={}", chat.display()))
        .arg("--out")
        .arg(dir.join(out))
        .arg("--work")
        .arg(dir.join(work))
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn midtrain_killed_mid_run_resumes_to_identical_weights() {
    let d = tempfile::tempdir().unwrap();
    base_model(d.path());
    // Two task kinds keep the mixture (and its seeded shuffle) non-trivial but quick to load.
    let cfg = "threads = 1\n[train]\ndevice_batch_size = 2\ntotal_batch_size = 256\n\
               num_iterations = 5\nsave_every = 2\neval_batches = 1\n\
               [[tasks]]\nkind = \"smoltalk\"\npath = \"smoltalk_train.jsonl.gz\"\nstop = 40\n\
               [[tasks]]\nkind = \"gsm8k\"\npath = \"gsm8k_train.jsonl.gz\"\nstop = 20\n";
    let full = midtrain(d.path(), cfg, "full", "full-work", &[]);
    assert!(
        full.status.success(),
        "{}",
        String::from_utf8_lossy(&full.stderr)
    );

    // Dies (abort, no cleanup) right after step 3: the checkpoint of step 2 is the newest.
    let crashed = midtrain(
        d.path(),
        cfg,
        "crashed",
        "work",
        &[("NANOCHAT_TEST_ABORT_AT_STEP", "3")],
    );
    assert!(!crashed.status.success(), "the abort hook did not fire");
    assert!(d
        .path()
        .join("work/ckpt-00000002/train_state.json")
        .is_file());
    assert!(
        !d.path().join("crashed/model").exists(),
        "nothing published by a crashed run"
    );

    let resumed = midtrain(d.path(), cfg, "resumed", "work", &[]);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{err}");
    assert!(
        err.contains("resuming from checkpoint") && err.contains("ckpt-00000002"),
        "{err}"
    );
    let weights =
        |o: &str| std::fs::read(d.path().join(o).join("model/model.safetensors")).unwrap();
    assert!(
        weights("full") == weights("resumed"),
        "resumed weights differ from the uninterrupted run"
    );
    // The metrics of the resumed run continue the crashed one's without duplicate steps.
    let metrics = std::fs::read_to_string(d.path().join("resumed/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["step"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4, 5]);
}
