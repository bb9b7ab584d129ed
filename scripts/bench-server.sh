#!/usr/bin/env bash
# Loopback load benchmark of nanochat-inference, one command: builds the release server and
# load generator, then for each model starts a server on a free 127.0.0.1 port, runs 1, 10
# and 32 concurrent streaming clients (loadgen), prints one table and stops the server.
#
# Models:
#   fake  the scripted model with a 5 ms decode step: the server's own overhead (HTTP, SSE,
#         scheduling), the baseline the real models are read against;
#   tiny  crates/nanochat-inference/testdata/tiny-chat (trained, depth 1, vocab 512);
#   d8    a random-init depth-8 model (n_embd 512, vocab 65,536 BPE, context 2048), written
#         once by the make_test_model example into $NANOCHAT_BENCH_MODELS (default
#         $CARGO_TARGET_DIR/bench-models); speed does not depend on the weights' values;
#   d20   the same at depth 20 (n_embd 1280: the speedrun's model), for GPUs.
# Every request streams (include_usage), temperature 0.8 without a seed (never a cache hit).
#
# Usage: scripts/bench-server.sh [models...]     (default: fake tiny d8)
# Env: BENCH_REQUESTS (per client, default 2), BENCH_MAX_TOKENS (default 32),
#      BENCH_MAX_SECS (bound on one concurrency level, default 120),
#      BENCH_SERVER_ARGS (more server flags, e.g. "--device cuda"),
#      BENCH_BIN_DIR (prebuilt nanochat-inference, loadgen and make_test_model: no cargo,
#      for a GPU machine without a toolchain).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
models_dir="${NANOCHAT_BENCH_MODELS:-$target/bench-models}"
requests="${BENCH_REQUESTS:-2}"
max_tokens="${BENCH_MAX_TOKENS:-32}"
max_secs="${BENCH_MAX_SECS:-120}"
models=("$@")
[[ ${#models[@]} -gt 0 ]] || models=(fake tiny d8)

if [[ -n "${BENCH_BIN_DIR:-}" ]]; then
  bin="$BENCH_BIN_DIR/nanochat-inference"
  loadgen="$BENCH_BIN_DIR/loadgen"
  make_model="$BENCH_BIN_DIR/make_test_model"
else
  cargo build --release -q -p nanochat-inference --bin nanochat-inference \
    --example loadgen --example make_test_model
  bin="$target/release/nanochat-inference"
  loadgen="$target/release/examples/loadgen"
  make_model="$target/release/examples/make_test_model"
fi

model_args() {
  case "$1" in
    fake) echo "--fake --fake-step-ms 5" ;;
    tiny) echo "--model crates/nanochat-inference/testdata/tiny-chat" ;;
    d8 | d20)
      local depth=${1#d}
      if [[ ! -f "$models_dir/$1/model.safetensors" ]]; then
        local corpus=../shared/data/corpus/shard_00000.jsonl.gz
        [[ -f "$corpus" ]] || corpus=data/sample/corpus/shard_00000.jsonl.gz
        echo "bench-server: writing the $1 model to $models_dir/$1 (once)" >&2
        rm -rf "$models_dir/$1.tmp"
        "$make_model" --depth "$depth" --seq-len 2048 --vocab 65536 \
          --corpus "$corpus" --out "$models_dir/$1.tmp" >&2
        mv "$models_dir/$1.tmp" "$models_dir/$1"
      fi
      echo "--model $models_dir/$1" ;;
    *) echo "bench-server: unknown model $1 (fake, tiny, d8, d20)" >&2; return 1 ;;
  esac
}

server=""
cleanup() { [[ -z "$server" ]] || { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }; }
trap cleanup EXIT

echo "nanochat-inference load benchmark: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "requests per client $requests, max_tokens $max_tokens, streaming, temperature 0.8"
echo
echo "| model | clients | requests | first token p50 (ms) | first token p95 (ms) | tokens/s per stream p50 | tokens/s per stream p5 | aggregate tokens/s |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for m in "${models[@]}"; do
  args=$(model_args "$m")
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  log=$(mktemp)
  # shellcheck disable=SC2086
  "$bin" $args ${BENCH_SERVER_ARGS:-} --host 127.0.0.1 --port "$port" --queue-capacity 256 2>"$log" &
  server=$!
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$port/health" 2>/dev/null | grep -q '"ready":true'; then break; fi
    if ! kill -0 "$server" 2>/dev/null; then echo "bench-server: $m server died:" >&2; cat "$log" >&2; exit 1; fi
    sleep 0.1
  done
  "$loadgen" --addr "127.0.0.1:$port" --clients 1,10,32 --requests "$requests" \
    --max-tokens "$max_tokens" --max-secs "$max_secs" \
    | grep '^| [0-9]' | sed "s/^| /| $m | /"
  cleanup; server=""; rm -f "$log"
done
