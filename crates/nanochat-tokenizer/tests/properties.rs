//! Property tests: the hand-written pre-tokenizers cut exactly like the regexes they replace,
//! encoding round-trips any text, and decoding never panics.

mod common;

use std::sync::LazyLock;

use nanochat_tokenizer::{
    Splitter, Tokenizer, CL100K_PATTERN, GPT4_PATTERN, NANOCHAT_PATTERN, R50K_PATTERN,
};
use proptest::prelude::*;

const PATTERNS: [&str; 4] = [NANOCHAT_PATTERN, GPT4_PATTERN, CL100K_PATTERN, R50K_PATTERN];

static SPLITTERS: LazyLock<Vec<(Splitter, Splitter)>> = LazyLock::new(|| {
    PATTERNS
        .iter()
        .map(|p| (Splitter::new(p).unwrap(), Splitter::new_regex(p).unwrap()))
        .collect()
});

static TOK: LazyLock<Tokenizer> = LazyLock::new(common::fixture_tokenizer);

/// Characters that exercise every branch of the patterns: contractions (including the
/// case-folded long s), letters of several scripts, digits of several scripts, punctuation,
/// every kind of whitespace and newline, emoji and combining marks.
fn tricky_text() -> impl Strategy<Value = String> {
    let chars: Vec<char> = " \t\n\r\x0b\x0c'sSdDmMtTlLvVeErRſkxyzAZ059.,!?-_()[]{}\"/\\é中日ß١٢½ⅷ𝟙🌍👍🏽\u{85}\u{a0}\u{2028}\u{3000}\u{301}\u{200d}"
        .chars()
        .collect();
    prop::collection::vec(prop::sample::select(chars), 0..48).prop_map(|v| v.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn scanner_equals_regex_on_tricky_text(text in tricky_text()) {
        for (fast, slow) in SPLITTERS.iter() {
            prop_assert_eq!(fast.pieces(&text), slow.pieces(&text), "pattern {}", fast.pattern());
        }
    }

    #[test]
    fn scanner_equals_regex_on_any_text(text in any::<String>()) {
        for (fast, slow) in SPLITTERS.iter() {
            prop_assert_eq!(fast.pieces(&text), slow.pieces(&text), "pattern {}", fast.pattern());
        }
    }

    #[test]
    fn encode_decode_round_trips(text in prop_oneof![any::<String>(), tricky_text()]) {
        let ids = TOK.encode(&text);
        prop_assert_eq!(TOK.decode(&ids), text.clone());
        prop_assert_eq!(TOK.decode_bytes(&ids), text.as_bytes().to_vec());
        prop_assert!(ids.iter().all(|&id| id < 2048));
    }

    #[test]
    fn decode_never_panics(ids in prop::collection::vec(any::<u32>(), 0..64), small in prop::collection::vec(0u32..2100, 0..64)) {
        let _ = TOK.decode(&ids);
        let _ = TOK.decode(&small);
        let bytes = TOK.decode_bytes(&small);
        prop_assert!(bytes.len() <= small.len() * 64);
    }
}
