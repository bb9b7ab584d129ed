//! Parity with the reference fixture gpt_tiny_a (skipped when ../shared is absent).

use std::path::PathBuf;

fn fixture() -> Option<PathBuf> {
    // ../shared relative to the repository root; worktrees sit one level deeper.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let found = manifest
        .ancestors()
        .skip(3)
        .map(|a| a.join("shared/fixtures/gpt_tiny_a"))
        .find(|p| p.join("meta.json").exists());
    if found.is_none() {
        eprintln!(
            "SKIP: shared/fixtures/gpt_tiny_a not found above {}",
            manifest.display()
        );
    }
    found
}

#[test]
fn gpt_tiny_a_logits_loss_grads_and_greedy_match_reference() {
    let Some(dir) = fixture() else { return };
    let r = nanochat_model::parity::run_parity(&dir).unwrap();
    eprintln!("{r:#?}");
    assert!(r.logits < 1e-4, "logits rel err {}", r.logits);
    assert!(r.loss_mean < 1e-5, "loss mean rel err {}", r.loss_mean);
    assert!(r.loss_sum < 1e-5, "loss sum rel err {}", r.loss_sum);
    for (name, e) in &r.grads {
        assert!(*e < 1e-4, "grad {name}: rel err {e}");
    }
    assert_eq!(r.grads.len(), 2 + 6 * 2);
    assert!(
        r.cached_vs_full < 1e-5,
        "cached vs full {}",
        r.cached_vs_full
    );
    assert_eq!(r.greedy_got, r.greedy_expected);
}
