//! Pretraining packer: BOS placement, shapes, exact resume from a batch's state, and the
//! background loader producing the same batches as the synchronous packer.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nanochat_data::packer::{LoaderSpec, Packer};
use nanochat_data::{DocPosition, DocStream, PretrainLoader};
use nanochat_tokenizer::Tokenizer;

/// Byte-level tokenizer: ids 0..256 are bytes, specials follow.
fn byte_tokenizer() -> Arc<Tokenizer> {
    Arc::new(Tokenizer::nanochat("bytes", (0..=255u8).map(|b| vec![b]).collect()).unwrap())
}

fn shard(dir: &Path, name: &str, docs: &[String]) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    for d in docs {
        writeln!(f, "{}", serde_json::json!({ "text": d })).unwrap();
    }
    p
}

fn corpus(dir: &Path) -> Vec<PathBuf> {
    let docs: Vec<String> = (0..200)
        .map(|i| format!("document {i} {}", "x".repeat(i % 37)))
        .collect();
    vec![
        shard(dir, "a.jsonl", &docs[..120]),
        shard(dir, "b.jsonl", &docs[120..]),
    ]
}

#[test]
fn batches_are_shifted_windows_with_bos_before_each_document() {
    let d = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer();
    let bos = tok.bos_id();
    let docs = DocStream::new(corpus(d.path()), 0, 1, DocPosition::default()).unwrap();
    let mut p = Packer::new(docs, tok.clone(), 2, 16, Vec::new()).unwrap();
    let b = p.next_batch().unwrap();
    assert_eq!((b.inputs.len(), b.targets.len()), (32, 32));
    assert_eq!(b.inputs[0], bos);
    assert_eq!(
        &b.inputs[1..],
        &b.targets.iter().map(|&t| t as u32).collect::<Vec<_>>()[..31]
    );
    assert_eq!(tok.decode(&b.inputs[1..11]), "document 0");
    // the next document starts with BOS right after the first one's text
    let first_len = "document 0 ".len();
    assert_eq!(b.targets[first_len], bos as i32);
    assert_eq!(b.inputs[first_len + 1], bos);
}

#[test]
fn resuming_from_a_batch_state_gives_the_same_following_batches() {
    let d = tempfile::tempdir().unwrap();
    let shards = corpus(d.path());
    let tok = byte_tokenizer();
    let mut full = Packer::new(
        DocStream::new(shards.clone(), 0, 1, DocPosition::default()).unwrap(),
        tok.clone(),
        4,
        64,
        Vec::new(),
    )
    .unwrap();
    let batches: Vec<_> = (0..12).map(|_| full.next_batch().unwrap()).collect();
    let state = batches[4].state.clone();
    let mut resumed = Packer::new(
        DocStream::new(shards, 0, 1, state.next_doc).unwrap(),
        tok,
        4,
        64,
        state.carry,
    )
    .unwrap();
    for want in &batches[5..] {
        let got = resumed.next_batch().unwrap();
        assert_eq!(got.inputs, want.inputs);
        assert_eq!(got.targets, want.targets);
    }
}

#[test]
fn background_loader_matches_synchronous_packer_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let shards = corpus(d.path());
    let tok = byte_tokenizer();
    let spec = LoaderSpec {
        shards: shards.clone(),
        b: 2,
        t: 32,
        rank: 0,
        world_size: 1,
        prefetch: 3,
    };
    let mut sync = Packer::new(
        DocStream::new(shards, 0, 1, DocPosition::default()).unwrap(),
        tok.clone(),
        2,
        32,
        Vec::new(),
    )
    .unwrap();
    let want: Vec<_> = (0..40).map(|_| sync.next_batch().unwrap()).collect();
    let mut bg = PretrainLoader::start(spec.clone(), tok.clone(), None).unwrap();
    for w in &want[..20] {
        assert_eq!(bg.next_batch().unwrap().inputs, w.inputs);
    }
    drop(bg);
    let mut bg2 = PretrainLoader::start(spec, tok, Some(want[19].state.clone())).unwrap();
    for w in &want[20..] {
        assert_eq!(bg2.next_batch().unwrap().inputs, w.inputs);
    }
}

#[test]
fn loader_reports_a_bad_shard_by_name() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("broken.jsonl");
    std::fs::write(&p, "not json\n").unwrap();
    let spec = LoaderSpec {
        shards: vec![p],
        b: 1,
        t: 8,
        rank: 0,
        world_size: 1,
        prefetch: 1,
    };
    let mut l = PretrainLoader::start(spec, byte_tokenizer(), None).unwrap();
    let err = l.next_batch().unwrap_err().to_string();
    assert!(err.contains("broken.jsonl"), "{err}");
}
