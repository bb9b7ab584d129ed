#!/usr/bin/env bash
# Generation speed, Rust engine vs the reference PyTorch engine, same machine, same run.
# Each config runs both implementations back to back (interleaved, so background load hits
# both alike). Output: the CPU and its kernel paths, then one JSON line per (impl, config);
# `rust-bf16` is ours decoding from bf16 weights. Needs torch (pip) and the reference
# source (NANOCHAT_SRC, default /work/ref/nanochat).
set -euo pipefail
cd "$(dirname "$0")/.."
export NANOCHAT_SRC=${NANOCHAT_SRC:-/work/ref/nanochat} RAYON_NUM_THREADS=${THREADS:-2} THREADS=${THREADS:-2}
cargo build --release -q -p nanochat-engine --example bench_engine
bin=${CARGO_TARGET_DIR:-target}/release/examples/bench_engine
# Every figure below comes from this CPU and these kernel paths.
"$bin" --kernels
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
  # The same with bf16 weights (half the bytes streamed per token).
  # shellcheck disable=SC2086
  NANOCHAT_PRECISION=bf16 "$bin" $c 2 | sed 's/"impl":"rust"/"impl":"rust-bf16"/'
  # shellcheck disable=SC2086
  python3 scripts/bench_engine_torch.py $c 2 2>/dev/null
done
