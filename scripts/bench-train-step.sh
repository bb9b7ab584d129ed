#!/usr/bin/env bash
# Full training step vs the model's forward+backward alone, at the tiny pipeline's shape
# (depth 2, seq 128, device batch 8, vocab 2057): issue 5 asks that the data path, gradient
# accumulation, clipping and the optimizers cost at most 10 % of the step.
#   model:  nanochat-model's bench example, forward+backward only (f32 matmuls), STEPS micro-batches
#   ours:   nanochat-pretrain on configs/tiny/pretrain.toml (2 micro-batches per step + clip +
#           AdamW/Muon + background tokenization), median tok/s over steps 6..STEPS
# Usage: scripts/bench-train-step.sh            (env: STEPS=60, THREADS=2, KEEP=DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-60}
THREADS=${THREADS:-2}
# shellcheck source=scripts/tiny-tokenizer.sh
source scripts/tiny-tokenizer.sh
cargo build --release -q -p nanochat-model --example bench
# Every figure below comes from this CPU and these kernel paths.
"$BIN/examples/bench" --kernels
MODEL=$(RAYON_NUM_THREADS=$THREADS NANOCHAT_BENCH_TRAIN_ONLY=1 "$BIN/examples/bench" 2 128 8 2057 "$((2 * STEPS))" |
  sed -n 's/^train_tokens_per_s \([0-9.]*\).*/\1/p')
sed -e "s/^num_iterations = .*/num_iterations = $STEPS/" -e "s/^threads = .*/threads = $THREADS/" \
  -e "s/^eval_every = .*/eval_every = 0/" -e "s/^sample_every = .*/sample_every = 0/" \
  configs/tiny/pretrain.toml >"$WORK/pretrain.toml"
rm -rf "$WORK/pretrain" "$WORK/pretrain-work" && mkdir -p "$WORK/pretrain"
"$BIN/nanochat-pretrain" --config "$WORK/pretrain.toml" --input "corpus=$CORPUS" \
  --input "tokenizer=$WORK/tok" --out "$WORK/pretrain" --work "$WORK/pretrain-work" 2>"$WORK/pretrain.log"
python3 - "$WORK/pretrain/metrics.jsonl" "$MODEL" <<'PY'
import json, statistics, sys
rates = [m["tok_per_s"] for m in map(json.loads, open(sys.argv[1])) if "tok_per_s" in m and m["step"] > 5]
full, model = statistics.median(rates), float(sys.argv[2])
print(f"model forward+backward: {model:,.0f} tok/s")
print(f"full training step:     {full:,.0f} tok/s (median of {len(rates)} steps)")
print(f"full step / fwd+bwd:    {full / model:.3f}  (overhead {100 * (model / full - 1):.1f} % of the step time)")
PY
