//! The eval stage end to end with scripted models, then the report card and its comparison.

use std::io::Write;
use std::path::{Path, PathBuf};

use nanochat_eval::report;
use nanochat_eval::stage::{
    run_eval, run_eval_resumable, EvalConfig, EvalInputs, ModelInfo, OverlapPolicy,
};
use nanochat_eval::testing::{ByteTokenizer, OracleModel, ScriptedGenerator};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

fn gz_copy(src: &Path, dst: &Path) {
    let data = std::fs::read(src).unwrap();
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(dst).unwrap(),
        flate2::Compression::fast(),
    );
    enc.write_all(&data).unwrap();
    enc.finish().unwrap();
}

fn base_config() -> EvalConfig {
    toml::from_str(&format!(
        "mode = \"base\"\ncore_dir = {:?}\nbatch_size = 4\n",
        testdata("core_sample")
    ))
    .unwrap()
}

#[test]
fn config_rejects_unknown_keys() {
    let err = toml::from_str::<EvalConfig>("mode = \"base\"\nbatchsize = 4\n").unwrap_err();
    assert!(err.to_string().contains("batchsize"), "{err}");
    let err = toml::from_str::<EvalConfig>("mode = \"rl\"\n").unwrap_err();
    assert!(err.to_string().contains("rl"), "{err}");
}

#[test]
fn config_device_defaults_to_cpu_and_names_the_accepted_devices() {
    use nanochat_model::Device;
    assert_eq!(base_config().device, Device::Cpu);
    for (text, device) in [
        ("cpu", Device::Cpu),
        ("cuda", Device::Cuda(None)),
        ("gpu", Device::Cuda(None)),
        ("cuda:2", Device::Cuda(Some(2))),
    ] {
        let cfg: EvalConfig =
            toml::from_str(&format!("mode = \"base\"\ndevice = {text:?}\n")).unwrap();
        assert_eq!(cfg.device, device, "{text}");
    }
    let err = toml::from_str::<EvalConfig>("mode = \"base\"\ndevice = \"tpu\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tpu") && err.contains("\"cpu\", \"cuda\" or \"cuda:N\""),
        "{err}"
    );
}

fn eval_base(out: &Path) -> nanochat_eval::stage::EvalMetrics {
    let model = OracleModel::new(|t| t.ends_with("alpha"));
    let inputs = EvalInputs {
        model: &model,
        generator: None,
        tokenizer: &ByteTokenizer,
        token_bytes: None,
        model_info: ModelInfo {
            description: "oracle".into(),
            trained_on: vec![],
            ..Default::default()
        },
        interrupted: &|| false,
    };
    run_eval(&base_config(), &inputs, out).unwrap()
}

#[test]
fn base_stage_writes_metrics_results_and_failures() {
    let out = tempfile::tempdir().unwrap();
    let m = eval_base(out.path());
    let core = m.core.as_ref().unwrap();
    assert_eq!(core.tasks.len(), 3);
    assert_eq!(core.tasks[0].accuracy, 0.3);
    let want = core.tasks.iter().map(|t| t.centered).sum::<f64>() / 3.0;
    assert_eq!(core.core_metric, Some(want));
    assert!(!core.complete, "mini_mc has skipped lines");
    assert_eq!(m.failures.skipped_by_task["mini_mc"], 2);
    for f in [
        "metrics.json",
        "summary.md",
        "skipped.jsonl",
        "results/mini_mc.jsonl",
    ] {
        assert!(out.path().join(f).is_file(), "{f}");
    }
    let lines = std::fs::read_to_string(out.path().join("results/mini_mc.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 10);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for k in ["prompt", "expected", "got", "correct", "line"] {
        assert!(first.get(k).is_some(), "{k} missing in {first}");
    }
    let summary = std::fs::read_to_string(out.path().join("summary.md")).unwrap();
    assert!(
        summary.contains("mini_mc: 2 malformed lines skipped"),
        "{summary}"
    );
}

fn chat_eval_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    gz_copy(
        &testdata("chat_sample/arc.jsonl"),
        &dir.path().join("arc_easy_test.jsonl.gz"),
    );
    gz_copy(
        &testdata("chat_sample/arc.jsonl"),
        &dir.path().join("arc_challenge_test.jsonl.gz"),
    );
    gz_copy(
        &testdata("chat_sample/mmlu.jsonl"),
        &dir.path().join("mmlu_test.jsonl.gz"),
    );
    gz_copy(
        &testdata("chat_sample/gsm8k.jsonl"),
        &dir.path().join("gsm8k_test.jsonl.gz"),
    );
    std::fs::write(
        dir.path().join("humaneval.jsonl.gz.src"),
        serde_json::json!({
            "task_id": "HumanEval/0",
            "prompt": "def inc(x):\n    \"\"\"Add one.\"\"\"\n",
            "canonical_solution": "    return x + 1\n",
            "test": "def check(candidate):\n    assert candidate(1) == 2\n",
            "entry_point": "inc"
        })
        .to_string(),
    )
    .unwrap();
    gz_copy(
        &dir.path().join("humaneval.jsonl.gz.src"),
        &dir.path().join("humaneval.jsonl.gz"),
    );
    // SpellingBee's word list, under nanochat's file name
    std::fs::write(dir.path().join("words_alpha.txt"), "zzzz\n").unwrap();
    std::fs::write(
        dir.path().join("gsm8k_test_gsm_symbolic_overlap.json"),
        r#"{"rows": [{"row": 2, "question": "Tom has 3 apples and eats one. How many are left?"}]}"#,
    )
    .unwrap();
    dir
}

fn eval_chat(
    out: &Path,
    eval_dir: &Path,
    label: &str,
    trained_on: Vec<String>,
) -> nanochat_eval::stage::EvalMetrics {
    let cfg: EvalConfig = toml::from_str(&format!(
        "mode = \"chat\"\nlabel = {label:?}\neval_dir = {eval_dir:?}\nbatch_size = 2\n[sandbox]\ntimeout_s = 5.0\n"
    ))
    .unwrap();
    assert_eq!(cfg.exclude_gsm8k_overlap, OverlapPolicy::Auto);
    let model = OracleModel::new(|_| false);
    let gen = ScriptedGenerator::new(|p| {
        if p.contains("def inc") {
            "```python\ndef inc(x):\n    return x + 1\n```".into()
        } else if p.contains("zzzz") {
            // right whenever the question asks about `z` (~90%: the letter is drawn from the
            // word), wrong for the random other letters
            "#### 4".into()
        } else {
            "#### 18".into()
        }
    });
    let inputs = EvalInputs {
        model: &model,
        generator: Some(&gen),
        tokenizer: &ByteTokenizer,
        token_bytes: None,
        model_info: ModelInfo {
            description: "scripted".into(),
            trained_on,
            ..Default::default()
        },
        interrupted: &|| false,
    };
    run_eval(&cfg, &inputs, out).unwrap()
}

#[test]
fn chat_stage_runs_all_tasks_and_computes_chatcore() {
    if std::process::Command::new("python3")
        .arg("-c")
        .arg("pass")
        .status()
        .is_err()
    {
        eprintln!("NOTICE: no python3; skipping");
        return;
    }
    let eval_dir = chat_eval_dir();
    let out = tempfile::tempdir().unwrap();
    let m = eval_chat(
        out.path(),
        eval_dir.path(),
        "sft",
        vec!["chat/gsm_symbolic_train.jsonl.gz".into()],
    );
    let chat = m.chat.as_ref().unwrap();
    let names: Vec<&str> = chat.tasks.iter().map(|t| t.task.as_str()).collect();
    assert_eq!(
        names,
        [
            "ARC-Easy",
            "ARC-Challenge",
            "MMLU",
            "GSM8K",
            "HumanEval",
            "SpellingBee"
        ]
    );
    let bee = chat.tasks.iter().find(|t| t.task == "SpellingBee").unwrap();
    assert_eq!(bee.items, 256);
    assert_eq!(bee.centered, bee.accuracy, "generative: baseline 0");
    let results = std::fs::read_to_string(out.path().join("results/SpellingBee.jsonl")).unwrap();
    let want = results
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["expected"] == "4")
        .count();
    assert_eq!(bee.correct, want);
    assert!(200 < want && want < 256, "{want}");
    let he = chat.tasks.iter().find(|t| t.task == "HumanEval").unwrap();
    assert_eq!((he.items, he.correct), (1, 1));
    // the sandbox that ran it is recorded, and the fallback is noted
    let sb = nanochat_eval::sandbox::Sandbox::new(Default::default()).unwrap();
    assert_eq!(chat.sandbox_isolation, Some(sb.isolation()));
    assert_eq!(chat.sandbox_process_limit, Some(sb.process_limit()));
    assert_eq!(chat.sandbox_network_isolated, Some(sb.network_isolated()));
    let seatbelt_noted = m.notes.iter().any(|n| n.contains("seatbelt"));
    assert_eq!(
        seatbelt_noted,
        sb.isolation() == nanochat_eval::sandbox::Isolation::Seatbelt,
        "{:?}",
        m.notes
    );
    let gsm = chat.tasks.iter().find(|t| t.task == "GSM8K").unwrap();
    assert_eq!((gsm.items, gsm.excluded, gsm.correct), (2, 1, 1));
    assert!(chat.gsm8k_overlap_excluded);
    let want = chat.tasks.iter().map(|t| t.centered).sum::<f64>() / 6.0;
    assert_eq!(chat.chatcore, Some(want));
    // not trained on gsm_symbolic: nothing excluded
    let out2 = tempfile::tempdir().unwrap();
    let m2 = eval_chat(out2.path(), eval_dir.path(), "mid", vec![]);
    let gsm = m2
        .chat
        .as_ref()
        .unwrap()
        .tasks
        .iter()
        .find(|t| t.task == "GSM8K")
        .unwrap()
        .clone();
    assert_eq!((gsm.items, gsm.excluded), (3, 0));
}

#[test]
fn report_card_from_artifacts_and_comparison() {
    let root = tempfile::tempdir().unwrap();
    // A training artifact as the store holds it: data/ (results) beside run/ (telemetry).
    let pretrain = root.path().join("pretrain/data");
    let run = root.path().join("pretrain/run");
    std::fs::create_dir_all(&pretrain).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        pretrain.join("summary.json"),
        r#"{"step": 200, "train_loss": 3.21, "val_bpb": 1.05, "min_val_bpb": 1.04, "config": {"total_batch_size": 2048}}"#,
    )
    .unwrap();
    std::fs::write(
        run.join("record.json"),
        r#"{"started": "2026-01-02T03:04:05Z", "duration_s": 99.0, "resumed": false,
            "inputs": {"corpus": "1a2b3c4d5e6f7a8b9c0d"},
            "machine": {"host": "box", "cpu": "Some CPU", "cpus": 2, "platform": "linux-x86_64", "memory_gib": 4.0}}"#,
    )
    .unwrap();
    std::fs::write(
        run.join("telemetry.json"),
        r#"{"train_seconds": 61.5, "mean_tok_per_s": 1234.4, "threads": 2, "matmul_precision": "f32"}"#,
    )
    .unwrap();
    let mut log = String::new();
    for step in 0..50 {
        let loss = 10.0 / (1.0 + step as f64);
        log.push_str(&format!(
            "{{\"step\": {step}, \"train_loss\": {loss}, \"lr\": {}, \"tok_per_s\": 1000}}\n",
            0.02 * (1.0 - step as f64 / 50.0)
        ));
        if step % 10 == 0 {
            log.push_str(&format!(
                "{{\"step\": {step}, \"val_bpb\": {}}}\n",
                2.0 - step as f64 / 100.0
            ));
        }
    }
    std::fs::write(pretrain.join("train_log.jsonl"), log).unwrap();
    let base_eval = root.path().join("base_eval");
    std::fs::create_dir_all(&base_eval).unwrap();
    eval_base(&base_eval);

    let out = root.path().join("report");
    let inputs = vec![
        ("pretrain".to_string(), pretrain.clone()),
        ("base_eval".to_string(), base_eval.clone()),
    ];
    let card = report::build_report("test card", &inputs, &out).unwrap();
    report::write_report(&card, &out).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    // A page a person reads: title, then the summary table before any section.
    assert!(md.starts_with("# test card\n\n| Metric |"), "{md}");
    assert!(md.find("| CORE |").unwrap() < md.find("## pretrain").unwrap());
    // The training section: what, how long, where, final numbers.
    assert!(
        md.contains("200 optimizer steps × total batch size 2,048."),
        "{md}"
    );
    assert!(
        md.contains("Final: train loss 3.2100, validation bpb 1.0500, best 1.0400."),
        "{md}"
    );
    assert!(
        md.contains("Took 1 min 02 s on box (Some CPU (2 CPUs), 2 threads, f32 matmuls), 1,234 tokens/s, started 2026-01-02T03:04:05Z."),
        "{md}"
    );
    assert!(md.contains("Inputs: corpus (`1a2b3c4d5e6f`)."), "{md}");
    // No flattened key dump in the page; the raw numbers stay in report.json.
    assert!(!md.contains("config.total_batch_size"), "{md}");
    assert_eq!(card.stages[0].metrics["config.total_batch_size"], 2048);
    assert_eq!(card.stages[0].kind, "training");
    // The eval section: its score and a per-task table.
    assert_eq!(card.stages[1].kind, "eval");
    assert!(md.contains("**CORE tasks**"), "{md}");
    assert!(
        md.contains("| Task | Type | Shots | Items | Accuracy | Centered |"),
        "{md}"
    );
    let core = card.summary["CORE"]["BASE"];
    assert!(md.contains(&format!("{core:.4}")));
    assert_eq!(
        card.stages[0].curves.len(),
        3,
        "{:?}",
        card.stages[0].curves
    );
    for c in &card.stages[0].curves {
        let svg = std::fs::read_to_string(out.join(c)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"), "{c}");
        assert!(
            svg.contains("<text") && svg.contains("train_loss") == c.ends_with("loss.svg"),
            "{c}: {svg}"
        );
        assert!(md.contains(&format!("]({c})")));
    }
    // Same inputs, same bytes (the card is a function of its inputs).
    let again = root.path().join("report-again");
    let card2 = report::build_report("test card", &inputs, &again).unwrap();
    report::write_report(&card2, &again).unwrap();
    assert_eq!(
        std::fs::read(again.join("report.md")).unwrap(),
        md.as_bytes()
    );
    assert_eq!(
        std::fs::read(again.join("report.json")).unwrap(),
        std::fs::read(out.join("report.json")).unwrap()
    );
    let loaded = report::load_report(&out.join("report.json")).unwrap();
    assert_eq!(loaded, card);

    // B: better CORE
    let mut b = card.clone();
    b.summary
        .get_mut("CORE")
        .unwrap()
        .insert("BASE".into(), core + 0.1);
    let cmp = report::compare_markdown(&card, &b, "a", "b");
    assert!(cmp.contains("+0.1000"), "{cmp}");
    assert!(
        cmp.contains("| pretrain | step | 200.0000 | 200.0000 | +0.0000 |"),
        "{cmp}"
    );

    // the binary: build and compare
    let exe = env!("CARGO_BIN_EXE_nanochat-report");
    let out2 = root.path().join("report2");
    let st = std::process::Command::new(exe)
        .args(["--input", &format!("pretrain={}", pretrain.display())])
        .args(["--input", &format!("base_eval={}", base_eval.display())])
        .arg("--out")
        .arg(&out2)
        .arg("--work")
        .arg(root.path().join("work"))
        .status()
        .unwrap();
    assert!(st.success());
    let cmp = std::process::Command::new(exe)
        .arg("--compare")
        .arg(&out)
        .arg(out2.join("report.json"))
        .output()
        .unwrap();
    assert!(cmp.status.success());
    let text = String::from_utf8(cmp.stdout).unwrap();
    assert!(
        text.contains("| CORE |") && text.contains("+0.0000"),
        "{text}"
    );
    let bad = std::process::Command::new(exe)
        .args(["--input", "x=/nonexistent"])
        .arg("--out")
        .arg(root.path().join("r3"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a directory"));
}

#[test]
fn tiny_pipeline_eval_configs_parse_and_point_at_shipped_data() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for name in ["base_eval", "mid_eval", "sft_eval"] {
        let path = root.join(format!("configs/tiny/{name}.toml"));
        let cfg: EvalConfig = toml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for dir in [&cfg.core_dir, &cfg.eval_dir].into_iter().flatten() {
            assert!(root.join(dir).is_dir(), "{name}: {} missing", dir.display());
        }
        if cfg.eval_dir.is_some() {
            // SpellingBee (part of ChatCORE) needs its word list from the repository
            let words = cfg.spelling_words.as_ref().expect("spelling_words");
            assert!(
                root.join(words).is_file(),
                "{name}: {} missing",
                words.display()
            );
        }
    }
    let specs =
        nanochat_eval::core::bundle::load_bundle(&root.join("data/eval-sample/core")).unwrap();
    assert_eq!(specs.len(), 22);
}

/// An [`OracleModel`] that counts its forward passes.
struct Counting {
    inner: OracleModel,
    calls: std::sync::atomic::AtomicUsize,
}

impl nanochat_eval::LogProbModel for Counting {
    fn logits(
        &self,
        tokens: &[u32],
        batch: usize,
        seq_len: usize,
    ) -> nanochat_eval::Result<nanochat_eval::LogitsBatch> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.logits(tokens, batch, seq_len)
    }
}

/// Runs the base suite on the CORE sample with `work` as the work dir; `stop_after` polls of
/// the interrupt flag later, the run is interrupted. Returns the result and the forward count.
fn resumable_base(
    out: &Path,
    work: Option<&Path>,
    fingerprint: &str,
    cfg: &EvalConfig,
    stop_after: Option<usize>,
) -> (
    nanochat_eval::Result<nanochat_eval::stage::EvalMetrics>,
    usize,
) {
    let model = Counting {
        inner: OracleModel::new(|t| t.ends_with("alpha") || t.ends_with("lazy")),
        calls: Default::default(),
    };
    let polls = std::sync::atomic::AtomicUsize::new(0);
    let interrupted = || {
        let n = polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        stop_after.is_some_and(|s| n >= s)
    };
    let inputs = EvalInputs {
        model: &model,
        generator: None,
        tokenizer: &ByteTokenizer,
        token_bytes: None,
        model_info: ModelInfo {
            description: "oracle".into(),
            fingerprint: fingerprint.into(),
            ..Default::default()
        },
        interrupted: &interrupted,
    };
    let r = run_eval_resumable(cfg, &inputs, out, work);
    (r, model.calls.into_inner())
}

/// metrics.json and every results file, byte for byte: what must not change when a run is
/// resumed (wall times are telemetry and not in the artifact).
fn artifact_bytes(out: &Path) -> (String, Vec<(String, String)>) {
    let m = std::fs::read_to_string(out.join("metrics.json")).unwrap();
    assert!(!m.contains("seconds"), "telemetry in the artifact: {m}");
    let mut files: Vec<(String, String)> = std::fs::read_dir(out.join("results"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    files.push((
        "skipped.jsonl".into(),
        std::fs::read_to_string(out.join("skipped.jsonl")).unwrap(),
    ));
    (m, files)
}

#[test]
fn interrupted_eval_resumes_from_task_checkpoints() {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    let cfg = base_config();
    let dir = |n: &str| {
        let d = root.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        d
    };

    // the reference: one uninterrupted run without checkpoints
    let (clean, clean_calls) = resumable_base(&dir("clean"), None, "model-a", &cfg, None);
    clean.unwrap();
    assert!(clean_calls > 0);

    // interrupted after the first task (the flag is polled before each task)
    let (r, first_calls) = resumable_base(&dir("run1"), Some(&work), "model-a", &cfg, Some(1));
    assert!(r.unwrap_err().to_string().contains("interrupted"));
    assert!(first_calls > 0 && first_calls < clean_calls);
    let saved: Vec<_> = std::fs::read_dir(work.join("tasks")).unwrap().collect();
    assert_eq!(saved.len(), 2, "one task: its .json and its .results.jsonl");

    // the rerun skips the finished task and produces the same artifact
    let (r, rerun_calls) = resumable_base(&dir("run2"), Some(&work), "model-a", &cfg, None);
    r.unwrap();
    assert_eq!(rerun_calls, clean_calls - first_calls);
    assert_eq!(
        artifact_bytes(&root.path().join("run2")),
        artifact_bytes(&root.path().join("clean"))
    );

    // a finished run's checkpoints are all reused...
    let (r, calls) = resumable_base(&dir("run3"), Some(&work), "model-a", &cfg, None);
    r.unwrap();
    assert_eq!(calls, 0);
    // ...but not on another kind of device (its sums may differ in the last digits; the
    // library does not care where the model really runs),
    let mut on_gpu = cfg.clone();
    on_gpu.device = nanochat_model::Device::Cuda(None);
    let (r, calls) = resumable_base(&dir("run3b"), Some(&work), "model-a", &on_gpu, None);
    r.unwrap();
    assert_eq!(calls, clean_calls);
    // nor for another model,
    let (r, calls) = resumable_base(&dir("run4"), Some(&work), "model-b", &cfg, None);
    r.unwrap();
    assert_eq!(calls, clean_calls);
    // nor for other task settings (the item limit changes every task's key)
    let mut fewer = cfg.clone();
    fewer.max_per_task = 3;
    let (r, calls) = resumable_base(&dir("run5"), Some(&work), "model-b", &fewer, None);
    assert_eq!(r.unwrap().core.unwrap().tasks[0].items, 3);
    assert!(calls > 0);
    // and a corrupt checkpoint is recomputed, not trusted
    for e in std::fs::read_dir(work.join("tasks")).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".results.jsonl") {
            std::fs::write(&p, "{not json\n").unwrap();
        }
    }
    let (r, calls) = resumable_base(&dir("run6"), Some(&work), "model-b", &fewer, None);
    r.unwrap();
    assert!(calls > 0);
    // without a model fingerprint nothing is reused
    let (r, calls) = resumable_base(&dir("run7"), Some(&work), "", &cfg, None);
    r.unwrap();
    assert_eq!(calls, clean_calls);
}

#[test]
fn run_info_names_the_gpu_that_trained_a_model_before_the_host_cpu() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("pretrain/data");
    let run = root.path().join("pretrain/run");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("record.json"),
        r#"{"machine": {"host": "gpubox", "cpu": "Some CPU", "cpus": 16}}"#,
    )
    .unwrap();
    let telemetry = |device: &str| {
        std::fs::write(
            run.join("telemetry.json"),
            format!(
                r#"{{"mean_tok_per_s": 300000.0, "threads": 16, "matmul_precision": "bf16", "device": "{device}"}}"#
            ),
        )
        .unwrap();
        report::run_info(&data)
    };
    let gpu = telemetry("cuda:0 (NVIDIA H200, 140 GiB, sm_90, cuBLAS libcublas.so.13)");
    assert_eq!(
        gpu.device.as_deref(),
        Some("cuda:0 (NVIDIA H200, 140 GiB, sm_90, cuBLAS libcublas.so.13), Some CPU (16 CPUs), 16 threads, bf16 matmuls")
    );
    assert_eq!(gpu.tok_per_s, Some(300000.0));
    // A CPU run names the CPU once (the record's), not the backend's description too.
    let cpu = telemetry("cpu (Some CPU, 16 threads, avx2)");
    assert_eq!(
        cpu.device.as_deref(),
        Some("Some CPU (16 CPUs), 16 threads, bf16 matmuls")
    );
}
