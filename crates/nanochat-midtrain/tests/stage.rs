//! The `nanochat-midtrain` binary rejects bad configs before touching its inputs. (The full
//! midtrain → SFT run lives in nanochat-sft's tests; this test target also makes
//! `cargo test --workspace` build the midtrain binary those tests launch.)

use std::process::Command;

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
