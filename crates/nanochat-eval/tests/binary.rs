//! The `nanochat-eval` binary on a real (random, tiny) GPT checkpoint and a byte-level
//! nanochat tokenizer: the stage contract, base and chat (categorical) modes, bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use nanochat_model::{CheckpointMeta, Gpt, GptConfig};
use nanochat_tokenizer::Tokenizer;

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

/// A model artifact dir (`model/` + `tokenizer/`, the layout contract) for a depth-1 random
/// model.
fn make_model(root: &Path) -> PathBuf {
    let tok = Tokenizer::nanochat("bytes", (0u8..=255).map(|b| vec![b]).collect()).unwrap();
    let vocab = tok.vocab_size() as usize;
    let model_dir = root.join("model");
    tok.save(&model_dir.join("tokenizer")).unwrap();
    let gpt = Gpt::new(GptConfig::from_depth(1, vocab, 64).unwrap(), 7).unwrap();
    nanochat_model::save_checkpoint(&gpt, &model_dir.join("model"), &CheckpointMeta::new(3))
        .unwrap();
    std::fs::write(
        model_dir.join("train_config.toml"),
        "data = [\"chat/gsm_symbolic_train.jsonl.gz\"]\n",
    )
    .unwrap();
    model_dir
}

fn run_stage(config: &str, model: &Path, out: &Path, work: &Path) -> std::process::Output {
    run_stage_env(config, model, out, work, &[])
}

fn run_stage_env(
    config: &str,
    model: &Path,
    out: &Path,
    work: &Path,
    env: &[(&str, &str)],
) -> std::process::Output {
    let cfg = out.with_extension("toml");
    std::fs::write(&cfg, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_nanochat-eval"))
        .envs(env.iter().copied())
        .arg("--config")
        .arg(&cfg)
        .arg("--input")
        .arg(format!("model={}", model.display()))
        .arg("--out")
        .arg(out)
        .arg("--work")
        .arg(work)
        .output()
        .unwrap()
}

#[test]
fn eval_binary_base_and_chat_modes() {
    let root = tempfile::tempdir().unwrap();
    let model = make_model(root.path());
    let val = root.path().join("val.jsonl");
    std::fs::write(
        &val,
        "{\"text\": \"The quick brown fox jumps over the lazy dog. \"}\n".repeat(20),
    )
    .unwrap();
    let out = root.path().join("base_out");
    let cfg = format!(
        "mode = \"base\"\ncore_dir = {:?}\nbatch_size = 8\nval_data = {:?}\nbpb_tokens = 256\nbpb_seq_len = 32\n",
        testdata("core_sample"),
        val
    );
    let o = run_stage(&cfg, &model, &out, &root.path().join("work1"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["kind"], "eval");
    assert_eq!(m["core"]["tasks"].as_array().unwrap().len(), 3);
    let core = m["core"]["core_metric"].as_f64().unwrap();
    assert!(core.is_finite());
    // a random model over 260 tokens: about 8 bits per byte
    let bpb = m["bpb"]["bpb"].as_f64().unwrap();
    assert!((6.0..11.0).contains(&bpb), "bpb {bpb}");
    assert!(out.join("results/mini_mc.jsonl").is_file());

    // chat mode, categorical task only (MMLU sample, gzipped under the expected name)
    let eval_dir = root.path().join("eval");
    std::fs::create_dir_all(&eval_dir).unwrap();
    let data = std::fs::read(testdata("chat_sample/mmlu.jsonl")).unwrap();
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(eval_dir.join("mmlu_test.jsonl.gz")).unwrap(),
        flate2::Compression::fast(),
    );
    std::io::Write::write_all(&mut enc, &data).unwrap();
    enc.finish().unwrap();
    let data = std::fs::read(testdata("chat_sample/gsm8k.jsonl")).unwrap();
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(eval_dir.join("gsm8k_test.jsonl.gz")).unwrap(),
        flate2::Compression::fast(),
    );
    std::io::Write::write_all(&mut enc, &data).unwrap();
    enc.finish().unwrap();
    let out = root.path().join("chat_out");
    let cfg = format!(
        "mode = \"chat\"\nlabel = \"sft\"\neval_dir = {eval_dir:?}\ntasks = [\"MMLU\", \"GSM8K\"]\n\
         max_new_tokens = 8\nexclude_gsm8k_overlap = \"never\"\n"
    );
    let o = run_stage(&cfg, &model, &out, &root.path().join("work2"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["chat"]["tasks"][0]["items"], 4);
    assert_eq!(m["label"], "sft");
    // GSM8K through the real engine (random model: generates, grades, almost surely wrong)
    assert_eq!(m["chat"]["tasks"][1]["task"], "GSM8K");
    assert_eq!(m["chat"]["tasks"][1]["items"], 3);
    assert_eq!(m["chat"]["tasks"][1]["errors"], 0);
    assert!(
        m["chat"]["chatcore"].is_null(),
        "ChatCORE needs all six tasks"
    );

    // unknown config key: clear error, non-zero exit
    let o = run_stage(
        "mode = \"base\"\nbatch = 3\n",
        &model,
        &root.path().join("bad_out"),
        &root.path().join("w3"),
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("batch"));
}

/// The process crashes after its first checkpointed task (test hook); the rerun with the same
/// --work dir restores that task, evaluates the rest and publishes the same metrics and results
/// as a run that was never interrupted.
#[test]
fn crashed_eval_stage_resumes_from_its_work_dir() {
    let root = tempfile::tempdir().unwrap();
    let model = make_model(root.path());
    // one scoring path: `auto` picks by timing, whose losses may differ in the last bits
    let cfg = format!(
        "mode = \"base\"\ncore_dir = {:?}\nbatch_size = 8\nscoring = \"padded\"\n",
        testdata("core_sample")
    );
    // The artifact holds results only (wall times go to the run dir), so the resumed run's
    // bytes equal the uninterrupted run's.
    let read = |out: &Path| {
        let m = std::fs::read_to_string(out.join("metrics.json")).unwrap();
        assert!(!m.contains("seconds"), "telemetry in the artifact: {m}");
        let results: Vec<String> = ["mini_mc", "mini_schema", "mini_lm"]
            .iter()
            .map(|t| std::fs::read_to_string(out.join(format!("results/{t}.jsonl"))).unwrap())
            .collect();
        (m, results)
    };

    let clean = root.path().join("clean");
    let o = run_stage(&cfg, &model, &clean, &root.path().join("work_clean"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let work = root.path().join("work");
    let crashed = root.path().join("crashed");
    let o = run_stage_env(
        &cfg,
        &model,
        &crashed,
        &work,
        &[("NANOCHAT_EVAL_TEST_ABORT_AFTER_TASKS", "1")],
    );
    assert!(!o.status.success(), "the abort hook did not fire");
    assert!(
        !crashed.join("metrics.json").exists(),
        "no partial artifact"
    );

    let resumed = root.path().join("resumed");
    let o = run_stage(&cfg, &model, &resumed, &work);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(
        err.matches("restored from the work dir").count(),
        1,
        "{err}"
    );
    assert_eq!(read(&resumed), read(&clean));
}

/// `device` in the config: `cpu` evaluates as the default does; a GPU in a build without the
/// `cuda` feature fails before anything is evaluated, saying how to rebuild; a name that is no
/// device is a config error listing the accepted ones.
#[test]
fn eval_binary_takes_the_device_from_its_config() {
    let root = tempfile::tempdir().unwrap();
    let model = make_model(root.path());
    let base = format!(
        "mode = \"base\"\ncore_dir = {:?}\nbatch_size = 8\nscoring = \"padded\"\n",
        testdata("core_sample")
    );
    let default = root.path().join("default");
    let o = run_stage(&base, &model, &default, &root.path().join("w1"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cpu = root.path().join("cpu");
    let o = run_stage(
        &format!("{base}device = \"cpu\"\n"),
        &model,
        &cpu,
        &root.path().join("w2"),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("evaluating on cpu"),
        "the log names the device: {err}"
    );
    let metrics = |d: &Path| std::fs::read_to_string(d.join("metrics.json")).unwrap();
    assert_eq!(metrics(&cpu), metrics(&default));

    let bad = root.path().join("bad");
    let o = run_stage(
        &format!("{base}device = \"tpu\"\n"),
        &model,
        &bad,
        &root.path().join("w3"),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("tpu") && err.contains("\"cpu\", \"cuda\" or \"cuda:N\""),
        "{err}"
    );

    if cfg!(feature = "cuda") {
        return; // with the feature, whether a GPU opens depends on the machine
    }
    let gpu = root.path().join("gpu");
    let o = run_stage(
        &format!("{base}device = \"cuda\"\n"),
        &model,
        &gpu,
        &root.path().join("w4"),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("device cuda") && err.contains("--features cuda"),
        "{err}"
    );
    assert!(!gpu.join("metrics.json").exists(), "nothing evaluated");
}
