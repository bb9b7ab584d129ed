#!/usr/bin/env bash
# Generation speed, Rust engine vs the reference PyTorch engine, same machine, same run.
# Each config runs both implementations back to back (interleaved, so background load hits
# both alike). Output: one JSON line per (impl, config). Needs torch (pip) and the reference
# source (NANOCHAT_SRC, default /work/ref/nanochat).
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_SRC=${NANOCHAT_SRC:-/work/ref/nanochat} RAYON_NUM_THREADS=${THREADS:-2} THREADS=${THREADS:-2}
cargo build --release -q -p nanochat-engine --example bench_engine
bin=${CARGO_TARGET_DIR:-target}/release/examples/bench_engine
# depth seq vocab batch prompt_len new_tokens
configs=(
  "4 512 32768 1 16 128"
  "4 512 32768 8 16 128"
  "8 512 32768 1 16 128"
  "8 512 32768 8 16 128"
  "12 2048 65536 1 16 100"
)
for c in "${configs[@]}"; do
  # shellcheck disable=SC2086
  "$bin" $c 2
  # shellcheck disable=SC2086
  python3 scripts/bench_engine_torch.py $c 2 2>/dev/null
done
