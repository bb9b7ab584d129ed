mod common;

use nanochat_tokenizer::{corpus, BpeTrainer, NANOCHAT_PATTERN};

/// Training on the fixture corpus reproduces rustbpe 0.1.0's ranks exactly.
#[test]
fn reproduces_rustbpe_fixture_ranks() {
    let Some(shared) = common::shared("reproduces_rustbpe_fixture_ranks") else {
        return;
    };
    let dir = shared.join("fixtures/tokenizer_rustbpe");
    let mut want = nanochat_tokenizer::read_tiktoken(&dir.join("ranks.tiktoken")).unwrap();
    want.sort_by_key(|r| r.1);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let tokens = pool.install(|| {
            let mut t = BpeTrainer::new(NANOCHAT_PATTERN).unwrap();
            for d in corpus::documents(&dir.join("train_docs.jsonl.gz")).unwrap() {
                t.add_document(d.unwrap());
            }
            t.finish(2048).unwrap().0
        });
        assert_eq!(tokens.len(), want.len());
        for (i, (got, (w, rank))) in tokens.iter().zip(&want).enumerate() {
            assert_eq!(i as u32, *rank);
            assert_eq!(got, w, "rank {i} ({threads} threads)");
        }
    }
}
