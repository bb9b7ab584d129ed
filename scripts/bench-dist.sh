#!/usr/bin/env bash
# Data-parallel scaling of CPU ranks on this machine: nanochat-pretrain on the embedded sample
# corpus at 1 rank (THREADS threads) and at 2 ranks (THREADS/2 threads each, started by hand
# with torchrun's variables, TcpCollective over 127.0.0.1), same model and same total batch.
# Prints the median tokens/s (whole job, rank 0's timing.jsonl, steps 3..STEPS) of each, and
# at 2 ranks the median share of the step spent in the gradient all-reduce.
#   scripts/bench-dist.sh      (env: DEPTH=4 SEQ=256 BATCH=4 ACCUM=2 STEPS=20 THREADS=2 KEEP=DIR)
# ACCUM is the micro-batches per step at one rank (at two ranks each runs ACCUM/2).
set -euo pipefail
cd "$(dirname "$0")/.."
DEPTH=${DEPTH:-4}
SEQ=${SEQ:-256}
BATCH=${BATCH:-4}
ACCUM=${ACCUM:-2}
STEPS=${STEPS:-20}
THREADS=${THREADS:-2}
# shellcheck source=scripts/tiny-tokenizer.sh
source scripts/tiny-tokenizer.sh
cat >"$WORK/dist.toml" <<EOF
seed = 0
threads = 0
[model]
depth = $DEPTH
sequence_len = $SEQ
[train]
device_batch_size = $BATCH
total_batch_size = $((BATCH * SEQ * ACCUM))
num_iterations = $STEPS
grad_clip = 1.0
eval_every = 0
eval_batches = 2
log_every = 1
EOF
median() {
  python3 - "$1" <<'PY'
import json, statistics, sys
lines = [t for t in map(json.loads, open(sys.argv[1])) if t["step"] > 2]
rate = statistics.median(t["tok_per_s"] for t in lines)
comm = [t["allreduce_seconds"] / t["seconds"] for t in lines if "allreduce_seconds" in t]
print(f"{rate:.0f} tok/s" + (f", gradient all-reduce {100 * statistics.median(comm):.1f} % of the step" if comm else ""))
PY
}
run_ranks() {
  local world=$1 threads=$2 dir="$WORK/w$1"
  rm -rf "$dir" && mkdir -p "$dir"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  local pids=()
  for ((r = 0; r < world; r++)); do
    local vars=()
    if [ "$world" -gt 1 ]; then
      vars=(RANK=$r WORLD_SIZE=$world LOCAL_RANK=$r LOCAL_WORLD_SIZE=$world MASTER_ADDR=127.0.0.1 MASTER_PORT=$port)
    fi
    env "${vars[@]}" RAYON_NUM_THREADS="$threads" "$BIN/nanochat-pretrain" --config "$WORK/dist.toml" \
      --input "corpus=$CORPUS" --input "tokenizer=$WORK/tok" --out "$dir/out$r" --work "$dir/work" \
      2>"$dir/rank$r.log" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  median "$dir/work/timing.jsonl"
}
one=$(run_ranks 1 "$THREADS")
two=$(run_ranks 2 "$((THREADS / 2))")
echo "d$DEPTH seq $SEQ device batch $BATCH, total batch $((BATCH * SEQ * ACCUM)) tokens, $STEPS steps"
echo "1 rank  x $THREADS threads: $one"
echo "2 ranks x $((THREADS / 2)) threads: $two (median over steps 3..$STEPS; load: $(cut -d' ' -f1-3 /proc/loadavg))"
