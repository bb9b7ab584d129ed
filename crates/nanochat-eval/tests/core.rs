//! CORE: bundle reading, rendering, scoring with scripted models, parity goldens.

use std::path::{Path, PathBuf};

use nanochat_eval::core::{
    bundle::load_bundle, centered_accuracy, custom::load_custom_task, evaluate_task, load_task,
    pick_option, plan_task, render, CoreItem, CoreOptions, ScoringPath, TaskType,
};
use nanochat_eval::testing::{ByteTokenizer, OracleModel};

fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/core_sample")
}

fn shared_core() -> Option<PathBuf> {
    nanochat_eval::testing::shared_dir().map(|s| s.join("data/core"))
}

fn last_block(text: &str) -> &str {
    text.rsplit("\n\n").next().unwrap_or(text)
}

#[test]
fn bundle_reads_upstream_layout_and_baselines() {
    let specs = load_bundle(&sample_dir()).unwrap();
    let labels: Vec<&str> = specs.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(labels, ["mini_mc", "mini_schema", "mini_lm"]);
    assert_eq!(specs[0].task_type, TaskType::MultipleChoice);
    assert_eq!(specs[0].num_fewshot, 2);
    assert_eq!(specs[0].continuation_delimiter, "\nAnswer: ");
    assert_eq!(specs[0].random_baseline, 25.0);
    assert_eq!(specs[1].continuation_delimiter, " ");
    // the schema file only exists gzipped
    assert!(specs[1]
        .data_path
        .to_string_lossy()
        .ends_with("mini_schema.jsonl.gz"));
}

#[test]
fn malformed_lines_are_reported_and_skipped() {
    let specs = load_bundle(&sample_dir()).unwrap();
    let task = load_task(&specs[0]).unwrap();
    assert_eq!(task.items.len(), 10);
    let lines: Vec<usize> = task.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, [4, 7]);
    assert!(
        task.skipped[0].reason.contains("out of range"),
        "{:?}",
        task.skipped[0]
    );
    assert!(
        task.skipped[1].reason.contains("invalid JSON"),
        "{:?}",
        task.skipped[1]
    );
    assert_eq!(task.skipped[0].task, "mini_mc");
}

#[test]
fn scripted_model_gets_exactly_the_expected_scores() {
    let specs = load_bundle(&sample_dir()).unwrap();
    let opts = CoreOptions::default();
    let tok = ByteTokenizer;

    // Always picks the "alpha" option: gold is "alpha" in exactly 3 of 10 items.
    let mc = load_task(&specs[0]).unwrap();
    let model = OracleModel::new(|t| t.ends_with("alpha"));
    let (score, results) = evaluate_task(&model, &tok, &mc, &opts, None).unwrap();
    assert_eq!((score.items, score.correct, score.skipped), (10, 3, 2));
    assert_eq!(score.accuracy, 0.3);
    assert_eq!(score.centered, (0.3 - 0.25) / (1.0 - 0.25));
    for r in &results {
        let item_alpha = r
            .scores
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(r.got, item_alpha.to_string());
        assert_eq!(r.fewshot.len(), 2);
    }

    // Always picks the context containing "because alpha": gold is option 0 in 3 of 4.
    let schema = load_task(&specs[1]).unwrap();
    let model = OracleModel::new(|t| last_block(t).contains("because alpha"));
    let (score, _) = evaluate_task(&model, &tok, &schema, &opts, None).unwrap();
    assert_eq!((score.items, score.correct), (4, 3));
    assert_eq!(score.centered, 0.5);

    // Greedy decoding is right exactly on the rows whose item mentions alpha (2 of 4).
    let lm = load_task(&specs[2]).unwrap();
    let model = OracleModel::new(|t| last_block(t).contains("alpha"));
    let (score, results) = evaluate_task(&model, &tok, &lm, &opts, None).unwrap();
    assert_eq!((score.items, score.correct), (4, 2));
    assert_eq!(score.centered, 0.5);
    assert!(results.iter().all(|r| r.error.is_none()));
}

#[test]
fn batching_does_not_change_results() {
    let specs = load_bundle(&sample_dir()).unwrap();
    let mc = load_task(&specs[0]).unwrap();
    let model = OracleModel::new(|t| t.ends_with("gamma"));
    let one = CoreOptions {
        batch_rows: 1,
        ..Default::default()
    };
    let many = CoreOptions {
        batch_rows: 64,
        ..Default::default()
    };
    let (a, ra) = evaluate_task(&model, &ByteTokenizer, &mc, &one, None).unwrap();
    let (b, rb) = evaluate_task(&model, &ByteTokenizer, &mc, &many, None).unwrap();
    assert_eq!(a.correct, b.correct);
    assert_eq!(ra, rb);
}

#[test]
fn max_per_task_crops_after_the_shuffle() {
    let specs = load_bundle(&sample_dir()).unwrap();
    let mc = load_task(&specs[0]).unwrap();
    let (order, fewshot) = plan_task(&mc.items, 2, Some(4));
    assert_eq!(order.len(), 4);
    // few-shot examples come from the cropped set and never include the item itself
    for (i, f) in fewshot.iter().enumerate() {
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|&j| j < 4 && j != i));
    }
    let opts = CoreOptions {
        max_per_task: Some(4),
        ..Default::default()
    };
    let (score, _) = evaluate_task(
        &OracleModel::new(|t| t.ends_with("alpha")),
        &ByteTokenizer,
        &mc,
        &opts,
        None,
    )
    .unwrap();
    assert_eq!(score.items, 4);
}

#[test]
fn renderer_goldens_on_hand_made_items() {
    let mc = CoreItem::MultipleChoice {
        query: "Q1".into(),
        choices: vec!["a".into(), "b".into()],
        gold: 1,
    };
    let shot = CoreItem::MultipleChoice {
        query: "Q0".into(),
        choices: vec!["x".into(), "y".into()],
        gold: 0,
    };
    assert_eq!(
        render::render_prompts(&mc, "\nAnswer: ", &[&shot, &shot]),
        [
            "Q0\nAnswer: x\n\nQ0\nAnswer: x\n\nQ1\nAnswer: a",
            "Q0\nAnswer: x\n\nQ0\nAnswer: x\n\nQ1\nAnswer: b"
        ]
    );
    let schema = CoreItem::Schema {
        context_options: vec!["He".into(), "She".into()],
        continuation: "ran.".into(),
        gold: 0,
    };
    assert_eq!(
        render::render_prompts(&schema, " ", &[]),
        ["He ran.", "She ran."]
    );
    assert_eq!(
        render::render_prompts(&schema, " ", &[&schema]),
        ["He ran.\n\nHe ran.", "He ran.\n\nShe ran."]
    );
    let lm = CoreItem::LanguageModeling {
        context: " \tThe end \n".into(),
        continuation: "now".into(),
    };
    let shot = CoreItem::LanguageModeling {
        context: "A\u{1f}".into(),
        continuation: "B".into(),
    };
    // contexts are trimmed (Python whitespace includes U+001F); the prompt without the
    // continuation is stripped, the one with it is not
    assert_eq!(
        render::render_prompts(&lm, "\nAnswer: ", &[&shot]),
        [
            "A\nAnswer: B\n\nThe end\nAnswer:",
            "A\nAnswer: B\n\nThe end\nAnswer: now"
        ]
    );
}

#[test]
fn prefix_choice_gives_an_empty_span_and_python_min_semantics() {
    // piqa-like: the first choice is a token-prefix of the second.
    let item = CoreItem::MultipleChoice {
        query: "Q".into(),
        choices: vec!["in".into(), "into".into()],
        gold: 1,
    };
    let prompts = render::render_prompts(&item, " ", &[]);
    let s = render::tokenize_spans(&ByteTokenizer, &item, &prompts).unwrap();
    assert_eq!(s.starts, [s.ends[0], s.ends[0]]);
    assert_eq!(s.starts[0], s.ends[0], "empty span for the prefix choice");
    // NaN first: nothing is less than NaN, so option 0 wins; NaN later: never chosen.
    assert_eq!(pick_option(&[f64::NAN, 1.0, 0.5]), 0);
    assert_eq!(pick_option(&[2.0, f64::NAN, 1.0]), 2);
    assert_eq!(pick_option(&[1.0, 1.0, 2.0]), 0);
    // end to end: the model loves "into", but the NaN of option 0 decides
    let task = nanochat_eval::core::LoadedTask {
        spec: nanochat_eval::core::TaskSpec {
            label: "prefix".into(),
            task_type: TaskType::MultipleChoice,
            num_fewshot: 0,
            continuation_delimiter: " ".into(),
            random_baseline: 50.0,
            data_path: PathBuf::new(),
            fields: Default::default(),
            note: None,
        },
        items: vec![(1, item)],
        skipped: vec![],
    };
    let model = OracleModel::new(|t| t.ends_with("into"));
    let (score, results) =
        evaluate_task(&model, &ByteTokenizer, &task, &CoreOptions::default(), None).unwrap();
    assert_eq!(score.correct, 0);
    assert!(results[0].scores[0].is_nan());
    assert_eq!(results[0].got, "0");
}

#[test]
fn long_prompts_are_cropped_from_the_left() {
    let item = CoreItem::MultipleChoice {
        query: "a long question that does not fit".into(),
        choices: vec!["yes".into(), "no".into()],
        gold: 0,
    };
    let task = nanochat_eval::core::LoadedTask {
        spec: nanochat_eval::core::TaskSpec {
            label: "crop".into(),
            task_type: TaskType::MultipleChoice,
            num_fewshot: 0,
            continuation_delimiter: " ".into(),
            random_baseline: 50.0,
            data_path: PathBuf::new(),
            fields: Default::default(),
            note: None,
        },
        items: vec![(1, item)],
        skipped: vec![],
    };
    let model = OracleModel::new(|t| t.ends_with("yes")).with_max_seq_len(8);
    let (score, _) =
        evaluate_task(&model, &ByteTokenizer, &task, &CoreOptions::default(), None).unwrap();
    assert_eq!(score.correct, 1);
    // a context too small for the answer span is an item error, not a crash
    let model = OracleModel::new(|t| t.ends_with("yes")).with_max_seq_len(3);
    let (score, results) =
        evaluate_task(&model, &ByteTokenizer, &task, &CoreOptions::default(), None).unwrap();
    assert_eq!((score.correct, score.errors), (0, 1));
    assert!(results[0].error.as_deref().unwrap().contains("context"));
}

#[test]
fn centered_accuracy_formula() {
    assert_eq!(centered_accuracy(0.25, 25.0), 0.0);
    assert_eq!(centered_accuracy(1.0, 62.0), 1.0);
    assert!((centered_accuracy(0.2566, 9.1) - 0.182178).abs() < 1e-6);
}

#[test]
fn custom_task_from_toml_with_renamed_fields() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("caps.jsonl"),
        "{\"question\": \"Capital of France?\", \"options\": [\"Paris\", \"Rome\"], \"answer\": 0}\n\
         {\"question\": \"Capital of Italy?\", \"options\": [\"Paris\", \"Rome\"], \"answer\": 1}\n\
         {\"question\": \"Broken\", \"options\": \"Paris\", \"answer\": 0}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("caps.toml"),
        "label = \"capitals\"\ntype = \"multiple_choice\"\ndata = \"caps.jsonl\"\nnum_fewshot = 1\n\
         continuation_delimiter = \"\\nAnswer: \"\nrandom_baseline = 50\n\
         [fields]\nquery = \"question\"\nchoices = \"options\"\ngold = \"answer\"\n",
    )
    .unwrap();
    let spec = load_custom_task(&dir.path().join("caps.toml")).unwrap();
    let task = load_task(&spec).unwrap();
    assert_eq!(task.items.len(), 2);
    assert_eq!(task.skipped.len(), 1);
    assert!(task.skipped[0].reason.contains("must be a list"));
    let model = OracleModel::new(|t| t.ends_with("Paris"));
    let (score, _) =
        evaluate_task(&model, &ByteTokenizer, &task, &CoreOptions::default(), None).unwrap();
    assert_eq!((score.items, score.correct, score.centered), (2, 1, 0.0));

    // unknown keys and bad types are rejected with the file named
    std::fs::write(
        dir.path().join("bad.toml"),
        "label = \"x\"\ntype = \"essay\"\ndata = \"caps.jsonl\"\nrandom_baseline = 0\n",
    )
    .unwrap();
    let err = load_custom_task(&dir.path().join("bad.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.toml") && err.contains("essay"), "{err}");
    std::fs::write(
        dir.path().join("typo.toml"),
        "label = \"x\"\ntype = \"schema\"\ndata = \"caps.jsonl\"\nrandom_baseline = 0\nshots = 3\n",
    )
    .unwrap();
    assert!(load_custom_task(&dir.path().join("typo.toml")).is_err());
}

#[test]
fn missing_bundle_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_bundle(dir.path()).unwrap_err().to_string();
    assert!(err.contains("core.yaml"), "{err}");
    std::fs::copy(sample_dir().join("core.yaml"), dir.path().join("core.yaml")).unwrap();
    std::fs::copy(
        sample_dir().join("eval_meta_data.csv"),
        dir.path().join("eval_meta_data.csv"),
    )
    .unwrap();
    let err = load_bundle(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("mini_mc") && err.contains("not found"),
        "{err}"
    );
}

/// Prompts of the real CORE tasks rendered exactly as nanochat renders them (sha256 goldens
/// from testdata/make_core_goldens.py, which calls the reference's own render functions).
#[test]
fn shared_core_rendering_matches_reference_goldens() {
    use sha2::{Digest, Sha256};
    let Some(core) = shared_core() else { return };
    let goldens: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/core_render_goldens.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let max = goldens["max_per_task"].as_u64().unwrap() as usize;
    let specs = load_bundle(&core).unwrap();
    assert_eq!(specs.len(), 22);
    assert!(specs
        .iter()
        .find(|s| s.label == "squad")
        .unwrap()
        .note
        .is_some());
    for g in goldens["tasks"].as_array().unwrap() {
        let label = g["label"].as_str().unwrap();
        let spec = specs.iter().find(|s| s.label == label).unwrap();
        let task = load_task(spec).unwrap();
        assert!(task.skipped.is_empty(), "{label}: {:?}", task.skipped);
        let (order, fewshot) = plan_task(&task.items, spec.num_fewshot, Some(max));
        let data: Vec<&CoreItem> = order.iter().map(|&i| &task.items[i].1).collect();
        for (idx, want) in g["items"].as_array().unwrap().iter().enumerate() {
            let want_few: Vec<usize> = serde_json::from_value(want["fewshot"].clone()).unwrap();
            assert_eq!(
                fewshot[idx], want_few,
                "{label} item {idx}: few-shot indices"
            );
            let shots: Vec<&CoreItem> = fewshot[idx].iter().map(|&j| data[j]).collect();
            let prompts = render::render_prompts(data[idx], &spec.continuation_delimiter, &shots);
            let got = hex::encode(Sha256::digest(prompts.join("\0").as_bytes()));
            assert_eq!(
                got,
                want["sha256"].as_str().unwrap(),
                "{label} item {idx}: prompt differs; ours begins {:?}, reference {:?}",
                &prompts[0].chars().take(120).collect::<String>(),
                want["first_prompt_head"]
            );
        }
    }
}

/// A `Gpt` seen only through `logits`: the padded full-forward path.
struct PaddedOnly<'a>(&'a nanochat_model::Gpt);

impl nanochat_eval::LogProbModel for PaddedOnly<'_> {
    fn max_seq_len(&self) -> Option<usize> {
        nanochat_eval::LogProbModel::max_seq_len(self.0)
    }
    fn logits(
        &self,
        tokens: &[u32],
        batch: usize,
        seq_len: usize,
    ) -> nanochat_eval::Result<nanochat_eval::LogitsBatch> {
        nanochat_eval::LogProbModel::logits(self.0, tokens, batch, seq_len)
    }
}

/// The KV-cached path (shared prefix once per item, vocabulary projection only on the tails)
/// must give the padded path's decisions and, up to float rounding, its losses, on every task
/// type, including rows cropped on the left.
#[test]
fn cached_tails_match_the_padded_forward() {
    use nanochat_model::{Gpt, GptConfig};
    let gpt = Gpt::new(GptConfig::from_depth(1, 260, 32).unwrap(), 3).unwrap();
    let specs = load_bundle(&sample_dir()).unwrap();
    for spec in &specs {
        let task = load_task(spec).unwrap();
        let opts = CoreOptions {
            batch_rows: 5,
            scoring: ScoringPath::Tails,
            ..Default::default()
        };
        let (a, ra) = evaluate_task(&gpt, &ByteTokenizer, &task, &opts, None).unwrap();
        let (b, rb) = evaluate_task(&PaddedOnly(&gpt), &ByteTokenizer, &task, &opts, None).unwrap();
        // and the per-task choice between both paths decides the same
        let auto = CoreOptions {
            scoring: ScoringPath::Auto,
            ..opts.clone()
        };
        let (c, _) = evaluate_task(&gpt, &ByteTokenizer, &task, &auto, None).unwrap();
        assert_eq!(c.correct, b.correct, "{}", spec.label);
        assert_eq!(
            (a.correct, a.errors),
            (b.correct, b.errors),
            "{}",
            spec.label
        );
        assert_eq!(ra.len(), rb.len());
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!((&x.got, x.correct, &x.error), (&y.got, y.correct, &y.error));
            assert_eq!(x.scores.len(), y.scores.len());
            for (p, q) in x.scores.iter().zip(&y.scores) {
                assert!(
                    (p.is_nan() && q.is_nan()) || (p - q).abs() < 1e-4,
                    "{}: {p} vs {q}",
                    spec.label
                );
            }
        }
    }
}
