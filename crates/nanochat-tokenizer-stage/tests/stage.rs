//! The `nanochat-tokenizer` stage binary end to end on a tiny corpus.

use std::process::Command;

fn run(config: &str, corpus: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    let dir = out.parent().unwrap();
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, config).unwrap();
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(out).unwrap();
    Command::new(env!("CARGO_BIN_EXE_nanochat-tokenizer"))
        .arg("--config")
        .arg(&cfg)
        .arg("--input")
        .arg(format!("corpus={}", corpus.display()))
        .arg("--out")
        .arg(out)
        .arg("--work")
        .arg(&work)
        .output()
        .unwrap()
}

#[test]
fn trains_saves_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let mut lines = String::new();
    for i in 0..200 {
        let text =
            format!("Document {i}: the quick brown fox jumps over the lazy dog. It's {i} o'clock!");
        lines.push_str(&serde_json::json!({ "text": text }).to_string());
        lines.push('\n');
    }
    std::fs::write(corpus.join("shard_00000.jsonl"), &lines).unwrap();
    std::fs::write(corpus.join("notes.md"), "ignored").unwrap();
    std::fs::write(
        corpus.join("val.jsonl"),
        "{\"text\":\"held out zebra quagga\"}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let res = run("vocab_size = 320\ndoc_cap = 1000\n", &corpus, &out);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let tok = nanochat_tokenizer::Tokenizer::load(&out).unwrap();
    assert_eq!(tok.vocab_size(), 320);
    assert_eq!(tok.bos_id(), 311);
    let text = "the quick brown fox";
    assert_eq!(tok.decode(&tok.encode(text)), text);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tok_eval.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 7, "5 built-in texts + train + val");
    assert_eq!(rows[6]["name"], "val");
    assert!(out.join("train_report.json").is_file());

    // Unknown config keys are rejected and nothing is claimed to succeed.
    let out2 = dir.path().join("out2");
    let res = run("vocab_size = 320\nvocab = 1\n", &corpus, &out2);
    assert!(!res.status.success());
    // An empty corpus is a clear error.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let res = run("vocab_size = 320\n", &empty, &dir.path().join("out3"));
    assert!(!res.status.success());
    assert!(String::from_utf8_lossy(&res.stderr).contains("no corpus files"));
}

/// A parquet shard (nanochat's FineWeb format) trains exactly the tokenizer that the same
/// documents give as JSONL: the stage reads the `text` column row group by row group (nulls
/// skipped).
#[test]
fn parquet_shards_train_like_jsonl() {
    #[derive(serde::Deserialize)]
    struct Row {
        text: Option<String>,
    }
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nanochat-data/tests/data");
    let rows: Vec<Row> =
        nanochat_data::tasks::read_jsonl(&data.join("docs_expected.jsonl.gz")).unwrap();
    let mut jsonl = String::new();
    for text in rows.into_iter().filter_map(|r| r.text) {
        jsonl.push_str(&serde_json::json!({ "text": text }).to_string());
        jsonl.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    let train = |name: &str, file: &str, contents: Option<&str>| {
        let corpus = dir.path().join(name).join("corpus");
        std::fs::create_dir_all(&corpus).unwrap();
        match contents {
            Some(c) => std::fs::write(corpus.join(file), c).unwrap(),
            None => {
                std::fs::copy(data.join(file), corpus.join(file)).unwrap();
            }
        }
        let out = dir.path().join(name).join("out");
        let res = run("vocab_size = 400\n", &corpus, &out);
        assert!(
            res.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        std::fs::read(out.join("tokenizer.tiktoken")).unwrap()
    };
    let from_jsonl = train("jsonl", "docs.jsonl", Some(&jsonl));
    let from_parquet = train("parquet", "docs_dict_v1.parquet", None);
    assert!(!from_jsonl.is_empty());
    assert!(
        from_parquet == from_jsonl,
        "the parquet shard trained a different tokenizer than its JSONL twin"
    );
    // The data-page-v2 file (no null) trains too.
    assert!(!train("parquet_v2", "docs_plain_v2.parquet", None).is_empty());
}

#[test]
fn corrupt_parquet_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::write(
        corpus.join("shard_00000.parquet"),
        b"PAR1 not really parquet PAR1",
    )
    .unwrap();
    let out = dir.path().join("out");
    let res = run("vocab_size = 300\n", &corpus, &out);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("shard_00000.parquet"), "{err}");
}
