//! The pretrain stage as a process: a few steps on a tiny corpus, exact resume after a crash,
//! a damaged newest checkpoint skipped with a warning, and clear config / data errors.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nanochat_tokenizer::Tokenizer;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus");
        std::fs::create_dir_all(&corpus).unwrap();
        for (s, name) in ["a.jsonl", "b.jsonl", "val.jsonl"].iter().enumerate() {
            let mut f = std::fs::File::create(corpus.join(name)).unwrap();
            for i in 0..60 {
                let text = format!(
                    "The quick brown fox {i} jumps over the lazy dog {s}. Pack my box with five dozen liquor jugs."
                );
                writeln!(f, "{}", serde_json::json!({ "text": text })).unwrap();
            }
        }
        let tok = Tokenizer::nanochat("bytes", (0..=255u8).map(|b| vec![b]).collect()).unwrap();
        tok.save(&dir.path().join("tokenizer")).unwrap();
        Env { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn config(&self, name: &str, steps: u64, save_every: u64) -> PathBuf {
        let p = self.path(name);
        std::fs::write(
            &p,
            format!(
                "seed = 1\nthreads = 1\n[model]\ndepth = 1\nsequence_len = 32\n\
                 [train]\ndevice_batch_size = 2\ntotal_batch_size = 128\nnum_iterations = {steps}\n\
                 save_every = {save_every}\neval_batches = 1\nwarmdown_ratio = 0.2\n\
                 embedding_lr = 0.05\nsample_prompts = [\"The quick\"]\nsample_tokens = 4\n"
            ),
        )
        .unwrap();
        p
    }

    fn run(&self, config: &Path, out: &str, work: &str, env: &[(&str, &str)]) -> Output {
        let out_dir = self.path(out);
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir_all(&out_dir).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nanochat-pretrain"));
        cmd.arg("--config")
            .arg(config)
            .arg("--input")
            .arg(format!("corpus={}", self.path("corpus").display()))
            .arg("--input")
            .arg(format!("tokenizer={}", self.path("tokenizer").display()))
            .arg("--out")
            .arg(&out_dir)
            .arg("--work")
            .arg(self.path(work));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model/model.safetensors")).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn few_steps_publish_a_model_and_falling_loss() {
    let env = Env::new();
    let cfg = env.config("c.toml", 12, 0);
    let o = env.run(&cfg, "out", "work", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(env.path("out/model/model.safetensors").exists());
    let metrics = std::fs::read_to_string(env.path("out/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 12);
    assert!(
        losses[11] < losses[0] - 0.5,
        "loss did not fall: {losses:?}"
    );
}

#[test]
fn crash_then_rerun_is_bit_identical_and_skips_a_damaged_checkpoint() {
    let env = Env::new();
    let cfg = env.config("c.toml", 8, 2);
    let full = env.run(&cfg, "full", "work-full", &[]);
    assert!(full.status.success(), "{}", stderr(&full));

    // Crash right after step 5 (checkpoints at 2 and 4 exist).
    let crashed = env.run(&cfg, "out", "work", &[("NANOCHAT_TEST_ABORT_AT_STEP", "5")]);
    assert!(!crashed.status.success());
    assert!(env.path("work/ckpt-00000004/train_state.json").exists());
    // Damage the newest checkpoint: the rerun must fall back to step 2 with a warning.
    let w = env.path("work/ckpt-00000004/model/model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let resumed = env.run(&cfg, "out", "work", &[]);
    let err = stderr(&resumed);
    assert!(resumed.status.success(), "{err}");
    assert!(err.contains("skipping unreadable checkpoint"), "{err}");
    assert!(err.contains("resuming from checkpoint"), "{err}");
    assert_eq!(weights(&env.path("full")), weights(&env.path("out")));
}

#[test]
fn unknown_config_key_and_bad_shard_name_the_file() {
    let env = Env::new();
    let cfg = env.path("bad.toml");
    std::fs::write(&cfg, "[model]\ndepth = 1\nsequence_len = 32\nwidth = 3\n[train]\ndevice_batch_size = 1\ntotal_batch_size = 32\nnum_iterations = 1\n").unwrap();
    let o = env.run(&cfg, "out", "work", &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("bad.toml") && err.contains("width"), "{err}");

    std::fs::write(env.path("corpus/a.jsonl"), "this is not json\n").unwrap();
    let good = env.config("c.toml", 2, 0);
    let o = env.run(&good, "out", "work2", &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("a.jsonl"), "{err}");
}

/// Documents (marker strings) in the order the training loop consumed them, from a
/// `NANOCHAT_PARITY_DUMP` batch file of a byte-tokenizer run: each micro-batch is `b·t` inputs
/// then `b·t` targets; the packer's stream is the inputs followed by the last target.
fn consumed_documents(batches: &Path, b: usize, t: usize, bos: u32) -> Vec<String> {
    let bytes = std::fs::read(batches).unwrap();
    let words: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut stream = Vec::new();
    for batch in words.chunks_exact(2 * b * t) {
        stream.extend_from_slice(&batch[..b * t]);
        stream.push(batch[2 * b * t - 1]);
    }
    // Whole documents only: the text between two BOS tokens.
    let mut docs = Vec::new();
    let mut starts = stream
        .iter()
        .enumerate()
        .filter(|(_, &x)| x == bos)
        .map(|(i, _)| i);
    let mut prev = starts.next().unwrap();
    for next in starts {
        let text: Vec<u8> = stream[prev + 1..next].iter().map(|&x| x as u8).collect();
        docs.push(String::from_utf8(text).unwrap());
        prev = next;
    }
    docs
}

#[test]
fn data_ranks_read_disjoint_documents_whose_union_is_the_single_rank_stream() {
    let env = Env::new();
    // Two training shards of 9 short, distinct documents (an odd count: rank 0 gets one more).
    let corpus = env.path("marked");
    std::fs::create_dir_all(&corpus).unwrap();
    for (name, tag) in [("s0.jsonl", "a"), ("s1.jsonl", "b"), ("val.jsonl", "v")] {
        let lines: Vec<String> = (0..9)
            .map(|i| serde_json::json!({ "text": format!("{tag}{i}") }).to_string())
            .collect();
        std::fs::write(corpus.join(name), lines.join("\n") + "\n").unwrap();
    }
    let bos = Tokenizer::load(&env.path("tokenizer")).unwrap().bos_id();
    let run = |name: &str, data: &str| -> Vec<String> {
        let cfg = env.path(&format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "threads = 1\n[model]\ndepth = 1\nsequence_len = 16\n[data]\n{data}\n\
                 [train]\ndevice_batch_size = 2\ntotal_batch_size = 32\nnum_iterations = 4\neval_batches = 1\n"
            ),
        )
        .unwrap();
        let dump = env.path(&format!("{name}-dump"));
        let out_dir = env.path(name);
        std::fs::create_dir_all(&out_dir).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_nanochat-pretrain"))
            .arg("--config")
            .arg(&cfg)
            .arg("--input")
            .arg(format!("corpus={}", corpus.display()))
            .arg("--input")
            .arg(format!("tokenizer={}", env.path("tokenizer").display()))
            .arg("--out")
            .arg(&out_dir)
            .arg("--work")
            .arg(env.path(&format!("{name}-work")))
            .env("NANOCHAT_PARITY_DUMP", &dump)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        consumed_documents(&dump.join("batches.bin"), 2, 16, bos)
    };
    let single = run("world1", "");
    let rank0 = run("rank0", "rank = 0\nworld_size = 2");
    let rank1 = run("rank1", "rank = 1\nworld_size = 2");
    // 4 steps of 2 × 33 tokens ≈ 88 three-token documents: several passes for every run.
    let epoch = |docs: &[String], n: usize| docs[..n].to_vec();
    let all: Vec<String> = (0..9)
        .map(|i| format!("a{i}"))
        .chain((0..9).map(|i| format!("b{i}")))
        .collect();
    assert_eq!(
        epoch(&single, 18),
        all,
        "single rank reads every shard in order"
    );
    // Rank r reads documents r, r + 2, … of every shard: the single-rank stream, interleaved.
    let of_rank = |r: usize| -> Vec<String> {
        all.iter()
            .filter(|d| d[1..].parse::<usize>().unwrap() % 2 == r)
            .cloned()
            .collect()
    };
    assert_eq!(epoch(&rank0, 10), of_rank(0));
    assert_eq!(epoch(&rank1, 8), of_rank(1));
    // Disjoint across every pass, and together exactly the single-rank documents.
    let set = |d: &[String]| d.iter().cloned().collect::<std::collections::BTreeSet<_>>();
    assert!(set(&rank0).is_disjoint(&set(&rank1)));
    let union: std::collections::BTreeSet<_> = set(&rank0).union(&set(&rank1)).cloned().collect();
    assert_eq!(union, set(&single));
}

#[test]
fn a_rank_outside_the_world_is_rejected_naming_the_config() {
    let env = Env::new();
    let cfg = env.path("ranks.toml");
    std::fs::write(
        &cfg,
        "[model]\ndepth = 1\nsequence_len = 32\n[data]\nrank = 2\nworld_size = 2\n\
         [train]\ndevice_batch_size = 1\ntotal_batch_size = 32\nnum_iterations = 1\n",
    )
    .unwrap();
    let o = env.run(&cfg, "out", "work", &[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("ranks.toml") && err.contains("rank = 2"),
        "{err}"
    );
}
