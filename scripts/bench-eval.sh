#!/usr/bin/env bash
# CORE-style multiple-choice throughput (items/s): nanochat-eval's evaluate_task vs nanochat's
# PyTorch core_eval.evaluate_task, on the same items (shuffle 1337, first ITEMS), the same
# cl100k tokenizer and the same random depth-DEPTH GPT shape, in one run. nanochat-eval runs
# twice: `auto` (its default: per task, the faster of the padded forward and the KV-cached
# tails) and `padded` (one padded forward per group, as the reference does). Prints one JSON
# line per run, then the ratios. Needs torch + tiktoken (pip) and the reference source
# (NANOCHAT_SRC, default /work/ref/nanochat).
#
#   scripts/bench-eval.sh            # DEPTH=8 ITEMS=20 TASK=hellaswag_zeroshot THREADS=2
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
DEPTH=${DEPTH:-8}
ITEMS=${ITEMS:-20}
TASK=${TASK:-hellaswag_zeroshot}
export NANOCHAT_SRC=${NANOCHAT_SRC:-/work/ref/nanochat} THREADS=${THREADS:-2}
export RAYON_NUM_THREADS=$THREADS
[ -d "$SHARED/core" ] || { echo "no $SHARED/core: set SHARED=/path/to/shared/data" >&2; exit 1; }
cargo build --release -q -p nanochat-eval --example bench_core
bin=${CARGO_TARGET_DIR:-target}/release/examples/bench_core
auto=$("$bin" "$SHARED" "$DEPTH" "$ITEMS" "$TASK" 16 auto)
echo "$auto"
peer=$(python3 crates/nanochat-eval/examples/bench_core_torch.py "$SHARED" "$DEPTH" "$ITEMS" "$TASK" 2>/dev/null | tail -n 1)
echo "$peer"
padded=$("$bin" "$SHARED" "$DEPTH" "$ITEMS" "$TASK" 16 padded)
echo "$padded"
python3 - "$auto" "$padded" "$peer" <<'PY'
import json, sys
auto, padded, peer = (json.loads(a) for a in sys.argv[1:4])
for name, r in (("auto", auto), ("padded", padded)):
    print(f"nanochat-eval ({name}) / PyTorch core_eval: {r['items_per_s'] / peer['items_per_s']:.2f}x "
          f"({r['items_per_s']:.3f} vs {peer['items_per_s']:.3f} items/s)")
PY
