mod common;

use nanochat_tokenizer::{OpenAiEncoding, Tokenizer};

#[derive(serde::Deserialize)]
struct Sample {
    text: String,
    ids: Vec<u32>,
}

#[test]
fn fixture_sample_matches_tiktoken() {
    let tok = common::fixture_tokenizer();
    assert_eq!(tok.vocab_size(), 2048 + 9);
    assert_eq!(tok.bos_id(), 2048);
    assert_eq!(tok.special_id("<|output_end|>"), Some(2056));
    let s: Sample = serde_json::from_slice(&common::read_maybe_gz(&common::data(
        "sample20k_ids.json.gz",
    )))
    .unwrap();
    let ids = tok.encode(&s.text);
    assert_eq!(ids, s.ids);
    assert_eq!(tok.decode(&ids), s.text);
}

#[test]
fn shared_fixture_sample_ids() {
    let Some(shared) = common::shared("shared_fixture_sample_ids") else {
        return;
    };
    let dir = shared.join("fixtures/tokenizer_rustbpe");
    let text = std::fs::read_to_string(dir.join("sample.txt")).unwrap();
    let want: Vec<u32> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sample_ids.json")).unwrap())
            .unwrap();
    let tok = common::fixture_tokenizer();
    assert_eq!(tok.encode(&text), want);
}

#[test]
fn cl100k_reference_sentence() {
    let Some(shared) = common::shared("cl100k_reference_sentence") else {
        return;
    };
    let tok = Tokenizer::from_openai_file(
        &shared.join("data/tokenizer/cl100k_base.tiktoken.gz"),
        OpenAiEncoding::Cl100kBase,
    )
    .unwrap();
    assert_eq!(
        tok.encode("Hello world, the quick brown fox!"),
        vec![9906, 1917, 11, 279, 4062, 14198, 39935, 0]
    );
    assert_eq!(tok.vocab_size(), 100277);
    assert_eq!(tok.bos_id(), 100257);
    assert_eq!(tok.token_bytes()[100256], 0);
}

#[test]
fn save_load_round_trip() {
    let tok = common::fixture_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    tok.save(dir.path()).unwrap();
    let back = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.token_bytes(), tok.token_bytes());
    assert_eq!(back.specials(), tok.specials());
    assert_eq!(back.pattern(), tok.pattern());
    let text = "Round trip: naïve café, 12345 — 🌍!";
    assert_eq!(back.encode(text), tok.encode(text));
    // The ranks file is byte-identical to rustbpe's output format.
    let written = std::fs::read(dir.path().join("tokenizer.tiktoken")).unwrap();
    assert_eq!(
        written,
        common::read_maybe_gz(&common::data("rustbpe_2048.tiktoken.gz"))
    );
    // A mismatched sidecar is rejected.
    let json = std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        json.replace("\"vocab_size\":2057", "\"vocab_size\":2058"),
    )
    .unwrap();
    assert!(Tokenizer::load(dir.path()).is_err());
}

#[test]
fn decode_never_panics_and_specials_are_text() {
    let tok = common::fixture_tokenizer();
    assert_eq!(tok.decode(&[u32::MAX, 5000, 2048]), "<|bos|>");
    assert!(tok.try_decode_bytes(&[5000]).is_err());
    // Special-token text in the input is ordinary text.
    let ids = tok.encode("<|bos|>");
    assert!(!ids.contains(&tok.bos_id()));
    assert_eq!(
        tok.encode_with_specials("a<|bos|>b", None),
        [tok.encode("a"), vec![2048], tok.encode("b")].concat()
    );
    // A split multi-byte character decodes lossily, and exactly as bytes.
    let ids = tok.encode("é");
    let bytes = tok.decode_bytes(&ids);
    assert_eq!(bytes, "é".as_bytes());
    assert_eq!(tok.decode(&ids[..1]).chars().count(), 1);
}

#[derive(serde::Deserialize)]
struct OpenAiGolden {
    texts: Vec<String>,
    cl100k_base: Vec<Vec<u32>>,
    o200k_base: Vec<Vec<u32>>,
    r50k_base: Vec<Vec<u32>>,
}

/// Ids from tiktoken 0.14 on samples of the shared corpus/chat/eval data (shipped golden file);
/// the vocabularies themselves come from ../shared.
#[test]
fn openai_vocabularies_match_tiktoken() {
    let Some(shared) = common::shared("openai_vocabularies_match_tiktoken") else {
        return;
    };
    let golden: OpenAiGolden = serde_json::from_slice(&common::read_maybe_gz(&common::data(
        "openai_golden.json.gz",
    )))
    .unwrap();
    for (enc, want) in [
        (OpenAiEncoding::Cl100kBase, &golden.cl100k_base),
        (OpenAiEncoding::O200kBase, &golden.o200k_base),
        (OpenAiEncoding::R50kBase, &golden.r50k_base),
    ] {
        let tok = Tokenizer::from_openai_file(
            &shared.join(format!("data/tokenizer/{}.tiktoken.gz", enc.name())),
            enc,
        )
        .unwrap();
        for (text, ids) in golden.texts.iter().zip(want) {
            assert_eq!(
                &tok.encode(text),
                ids,
                "{} on {:?}",
                enc.name(),
                text.chars().take(60).collect::<String>()
            );
            assert_eq!(&tok.decode(ids), text);
        }
        assert_eq!(&tok.encode_batch(&golden.texts), want);
    }
}
