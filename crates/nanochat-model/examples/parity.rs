//! Parity against a reference fixture directory laid out like ../shared/fixtures/gpt_tiny_a.
//!
//! `cargo run --release -p nanochat-model --example parity -- <fixture dir> [tolerance]`
//! Prints the max relative error of logits, losses and every gradient, and whether the
//! KV-cached greedy tokens match; exits 1 past tolerance (default 1e-4).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> anyhow::Result<ExitCode> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: parity <fixture dir> [tolerance]"))?,
    );
    let tol: f64 = match args.next() {
        Some(t) => t.parse()?,
        None => 1e-4,
    };
    let r = nanochat_model::parity::run_parity(&dir)
        .map_err(|e| anyhow::anyhow!("parity run on {} failed: {e}", dir.display()))?;
    let mark = |e: f64| if e <= tol { "ok" } else { "FAIL" };
    println!("max relative error (max|ours-ref| / max|ref|), tolerance {tol:e}");
    println!("  {:<44} {:.3e} {}", "logits", r.logits, mark(r.logits));
    println!(
        "  {:<44} {:.3e} {}",
        "loss (mean)",
        r.loss_mean,
        mark(r.loss_mean)
    );
    println!(
        "  {:<44} {:.3e} {}",
        "loss (sum)",
        r.loss_sum,
        mark(r.loss_sum)
    );
    for (name, e) in &r.grads {
        println!("  {:<44} {:.3e} {}", format!("grad {name}"), e, mark(*e));
    }
    println!(
        "  {:<44} {:.3e} {}",
        "kv-cached vs full logits",
        r.cached_vs_full,
        mark(r.cached_vs_full)
    );
    let greedy_ok = r.greedy_got == r.greedy_expected;
    println!(
        "greedy tokens (kv cache): {} (expected {:?}, got {:?})",
        if greedy_ok { "match" } else { "MISMATCH" },
        r.greedy_expected,
        r.greedy_got
    );
    if r.passes(tol) {
        println!("PASS");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("FAIL");
        Ok(ExitCode::from(1))
    }
}
