#!/usr/bin/env bash
# nanochat-tokenizer vs its peers (rustbpe 0.1.0, tiktoken) on the same corpus, in one run.
# Needs ../shared (or NANOCHAT_SHARED_DIR) and `pip install rustbpe==0.1.0 tiktoken`.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED="${NANOCHAT_SHARED_DIR:-$(cd .. && pwd)/shared}"
export NANOCHAT_SHARED_DIR="$SHARED"
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo bench -p nanochat-tokenizer --bench tokenizer --no-run -q 2>/dev/null || true
echo "== nanochat-tokenizer"
cargo bench -q -p nanochat-tokenizer --bench tokenizer -- "$@"
echo "== peers"
python3 scripts/bench_tokenizer_peers.py "$SHARED" "$@"
