#!/usr/bin/env bash
# Training throughput, ours vs the PyTorch reference, one command:
#   scripts/bench-train.sh [DEPTH SEQ BATCH VOCAB THREADS ACCUM]   (default 8 512 4 32768 2 8)
# Runs crates/nanochat-train/examples/bench_step.rs and scripts/bench_torch_train.py back to
# back with the same settings and prints one table of like-for-like ratios:
#   fwd+bwd f32 vs f32, full step (data + fwd/bwd + clip + Muon/AdamW) vs full step,
#   bf16 matmuls vs PyTorch bf16 autocast.
# Needs ../shared (or $NANOCHAT_SHARED_DIR) and the reference source ($NANOCHAT_SRC, default
# /work/ref/nanochat). $NANOCHAT_BENCH_STEPS (default 2) timed optimizer steps per setting.
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS=("${@:-}")
if [ $# -eq 0 ]; then ARGS=(8 512 4 32768 2 8); fi
export NANOCHAT_SRC="${NANOCHAT_SRC:-/work/ref/nanochat}"
export NANOCHAT_SHARED_DIR="${NANOCHAT_SHARED_DIR:-$(cd .. && pwd)/shared}"
cargo build --release -q -p nanochat-train --example bench_step
TARGET="${CARGO_TARGET_DIR:-target}"
ours=$("$TARGET/release/examples/bench_step" "${ARGS[@]}" | tail -n 1)
torch=$(python3 scripts/bench_torch_train.py "${ARGS[@]}" 2>/dev/null | tail -n 1)
python3 - "$ours" "$torch" <<'PY'
import json, sys
o, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"cpu: {o.get('cpu', '?')}")
for line in o.get("kernels", []):
    print(f"  {line}")
print(f"d{o['depth']} seq {o['seq']} batch {o['batch']} vocab {o['vocab']} threads {o['threads']} "
      f"accum {o['accum']} (torch {t['torch']}, {t['threads']} threads)")
print(f"{'measure':34} {'ours tok/s':>11} {'torch tok/s':>12} {'ratio':>7}")
rows = [
    ("fwd+bwd f32", "f32_fwd_bwd_tok_s", "f32_fwd_bwd_tok_s"),
    (f"full step f32, accum {o['accum']}", "f32_step_tok_s", "f32_step_tok_s"),
    ("full step f32, accum 1", "f32_step_accum1_tok_s", "f32_step_accum1_tok_s"),
    ("fwd+bwd bf16 (autocast)", "bf16_fwd_bwd_tok_s", "bf16_fwd_bwd_tok_s"),
    (f"full step bf16, accum {o['accum']}", "bf16_step_tok_s", "bf16_step_tok_s"),
    ("full step bf16, accum 1", "bf16_step_accum1_tok_s", "bf16_step_accum1_tok_s"),
    ("ours bf16 fwd+bwd vs torch f32", "bf16_fwd_bwd_tok_s", "f32_fwd_bwd_tok_s"),
    (f"ours bf16 step vs torch f32 step", "bf16_step_tok_s", "f32_step_tok_s"),
]
for label, ko, kt in rows:
    print(f"{label:34} {o[ko]:>11.1f} {t[kt]:>12.1f} {o[ko] / t[kt]:>6.2f}x")
for p in ("f32", "bf16"):
    print(f"ours {p}: full step within {o[p + '_step_overhead_pct']:.1f}% of fwd+bwd at accum "
          f"{o['accum']}, {o[p + '_step_accum1_overhead_pct']:.1f}% at accum 1 "
          f"(optimizer {o[p + '_optimizer_s']:.3f} s/step)")
print("ours:", json.dumps(o))
print("torch:", json.dumps(t))
PY
