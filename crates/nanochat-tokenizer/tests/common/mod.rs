#![allow(dead_code)]
//! Helpers shared by the integration tests.

use std::io::Read;
use std::path::{Path, PathBuf};

use nanochat_tokenizer::Tokenizer;

/// Test data shipped with the crate.
pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Reads a file, gunzipping it when it ends in `.gz`.
pub fn read_maybe_gz(path: &Path) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        raw
    }
}

/// The project's read-only shared data (`../shared` from the workspace root, or
/// `$NANOCHAT_SHARED_DIR`); `None` (with a printed notice) when absent.
pub fn shared(test: &str) -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("NANOCHAT_SHARED_DIR").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")),
    ];
    for c in candidates.into_iter().flatten() {
        if c.join("fixtures").is_dir() {
            return Some(c);
        }
    }
    eprintln!("SKIPPED {test}: ../shared (or $NANOCHAT_SHARED_DIR) is absent");
    None
}

/// nanochat tokenizer over the rustbpe fixture ranks (vocab 2048 + 9 specials), shipped here.
pub fn fixture_tokenizer() -> Tokenizer {
    let ranks = nanochat_tokenizer::read_tiktoken(&data("rustbpe_2048.tiktoken.gz")).unwrap();
    let mut ranks = ranks;
    ranks.sort_by_key(|r| r.1);
    assert!(ranks.iter().enumerate().all(|(i, r)| r.1 as usize == i));
    Tokenizer::nanochat("fixture", ranks.into_iter().map(|r| r.0).collect()).unwrap()
}
