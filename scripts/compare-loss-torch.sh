#!/usr/bin/env bash
# Loss-curve parity with PyTorch: trains the tiny pipeline's pretrain config (configs/tiny/pretrain.toml)
# for STEPS steps (default 200; the LR schedule is laid over those STEPS steps, so the last 20% of
# them are the warmdown) in our nanochat-pretrain, which dumps its step-0 weights and every
# micro-batch it consumes (NANOCHAT_PARITY_DUMP), then trains nanochat's reference GPT with its own
# Muon + AdamW on those batches from those weights (scripts/loss_parity_torch.py), and prints both
# loss curves side by side with the max / mean relative deviation.
#
# Needs: python3 with torch (CPU) and the reference source at NANOCHAT_SRC (default
# /work/ref/nanochat). No numpy / safetensors packages: the script parses both files itself.
# Usage: scripts/compare-loss-torch.sh [--every N] [--json FILE]     (env: STEPS, THREADS, KEEP=DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-200}
THREADS=${THREADS:-2}
export NANOCHAT_SRC=${NANOCHAT_SRC:-/work/ref/nanochat}
# Newton-Schulz runs eagerly (same bfloat16 math as the compiled kernel, no C++ toolchain needed).
export TORCHDYNAMO_DISABLE=1
# shellcheck source=scripts/tiny-tokenizer.sh
source scripts/tiny-tokenizer.sh
sed -e "s/^num_iterations = .*/num_iterations = $STEPS/" -e "s/^threads = .*/threads = $THREADS/" \
  configs/tiny/pretrain.toml >"$WORK/pretrain.toml"
rm -rf "$WORK/pretrain" "$WORK/pretrain-work" "$WORK/dump" && mkdir -p "$WORK/pretrain"
echo "ours: nanochat-pretrain, $STEPS steps (log: $WORK/pretrain.log)" >&2
NANOCHAT_PARITY_DUMP="$WORK/dump" "$BIN/nanochat-pretrain" --config "$WORK/pretrain.toml" \
  --input "corpus=$CORPUS" --input "tokenizer=$WORK/tok" \
  --out "$WORK/pretrain" --work "$WORK/pretrain-work" 2>"$WORK/pretrain.log"
echo "reference: nanochat GPT + Muon/AdamW from $NANOCHAT_SRC, same weights and batches" >&2
python3 -W ignore::UserWarning scripts/loss_parity_torch.py --dump "$WORK/dump" --ours "$WORK/pretrain/metrics.jsonl" \
  --steps "$STEPS" --threads "$THREADS" "$@"
