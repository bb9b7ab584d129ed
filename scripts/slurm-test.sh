#!/usr/bin/env bash
# A real Slurm test: Debian's slurm packages (slurmctld, slurmd, munge) started as a one-node
# cluster on this machine, then a pipeline stage run through `launcher: { kind: slurm }` with
# 2 tasks. Needs root and apt (a throwaway machine or container); listed in slow-tests.sh.
#
#   scripts/slurm-test.sh            # build (release), set up the cluster, run, tear down
#   BIN_DIR=target/debug scripts/slurm-test.sh   # use already-built binaries
#
# What it checks: srun starts 2 tasks, each reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and
# the first host of SLURM_JOB_NODELIST, they meet at the rendezvous and all-reduce, rank 0's
# output is published; a failing task fails the stage; Ctrl-C stops every task. The stage is
# nanochat-run's `dist_toy_stage` example, then the real thing: a tiny pretrain (data ->
# tokenizer -> pretrain) with 2 Slurm tasks, whose weights must be bit-identical to the same
# pipeline run with `ranks: 2` on this machine (same world size, same threads per rank).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "$(id -u)" != 0 ]; then
  echo "slurm-test: needs root (installs and starts slurmctld, slurmd and munged)" >&2
  exit 2
fi

if [ -z "${BIN_DIR:-}" ]; then
  cargo build --release -p nanochat-run --bins --examples \
    -p nanochat-data -p nanochat-tokenizer-stage -p nanochat-pretrain
  BIN_DIR=${CARGO_TARGET_DIR:-target}/release
fi
BIN_DIR=$(cd "$BIN_DIR" && pwd)
for b in "$BIN_DIR/nanochat-run" "$BIN_DIR/examples/dist_toy_stage" "$BIN_DIR/nanochat-data" \
  "$BIN_DIR/nanochat-tokenizer" "$BIN_DIR/nanochat-pretrain"; do
  [ -x "$b" ] || { echo "slurm-test: $b is not built" >&2; exit 2; }
done

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
fi

WORK=$(mktemp -d /tmp/nanochat-slurm-test.XXXXXX)
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
PIDS=()  # the daemons this script started, stopped by pid on exit
cleanup() {
  scontrol shutdown >/dev/null 2>&1 || true
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill "$p" 2>/dev/null || true
  done
  [ -f "$WORK/munged.pid" ] && kill "$(cat "$WORK/munged.pid")" 2>/dev/null || true
  if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else echo "slurm-test: kept $WORK"; fi
}
trap cleanup EXIT

# munge: a key, and the daemon on a socket of its own.
mkdir -p "$WORK/munge" /etc/munge /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
  else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
munged --force --pid-file="$WORK/munged.pid" 2>/dev/null || su -s /bin/sh munge -c "munged --force --pid-file=$WORK/munged.pid"
munge -n | unmunge >/dev/null

# A one-node cluster: no cgroups, no accounting, everything as root.
mkdir -p /etc/slurm "$WORK/spool/d" "$WORK/spool/ctld"
cat >/etc/slurm/slurm.conf <<EOF
ClusterName=nanochat-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$WORK/spool/ctld
SlurmdSpoolDir=$WORK/spool/d
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
slurmctld -D -c -i >"$WORK/slurmctld.out" 2>&1 &
PIDS+=($!)
slurmd -D -c >"$WORK/slurmd.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed)'; then break; fi
  sleep 1
done
sinfo
sinfo -h -o '%T' | grep -qE '^(idle|mixed)' || { echo "slurm-test: the node never became idle" >&2; cat "$WORK"/slurm*.log >&2; exit 1; }

# The pipeline: a shared store (this machine is the whole cluster, so any path is "shared").
mkdir -p "$WORK/run/bin" "$WORK/run/pipelines"
cp "$BIN_DIR/examples/dist_toy_stage" "$WORK/run/bin/dist-toy-stage"
cat >"$WORK/run/pipelines/slurm.yaml" <<'EOF'
stages:
  train:
    run: dist-toy-stage
    launcher: { kind: slurm, nodes: 1, ranks_per_node: 2, srun_args: [--overcommit] }
    config: { steps: 5 }
EOF
cat >"$WORK/run/pipelines/slurm-fail.yaml" <<'EOF'
stages:
  train:
    run: dist-toy-stage
    launcher: { kind: slurm, nodes: 1, ranks_per_node: 2, srun_args: [--overcommit] }
    config: { steps: 100000, sleep_ms: 20, fail_rank: 1, fail_step: 10 }
EOF
cd "$WORK/run"
export NANOCHAT_BIN_DIR="$WORK/run/bin"
"$BIN_DIR/nanochat-run" --store "$WORK/run/artifacts" slurm
RESULT=$(cat "$WORK/run/artifacts/objects"/*/*/data/result.txt)
[ "$RESULT" = "world 2 sum 3 steps 5" ] || { echo "slurm-test: unexpected result: $RESULT" >&2; exit 1; }
LOG=$(cat "$WORK/run/artifacts/objects"/*/*/data/train.log)
echo "$LOG" | grep -q "1: dist_toy_stage: rank 1 of 2 (local 1 of 2), rendezvous $HOST:" \
  || { echo "slurm-test: rank 1 did not get Slurm's variables:"; echo "$LOG"; exit 1; } >&2
echo "slurm-test: 2 tasks under srun: ok ($RESULT)"

start=$(date +%s)
if "$BIN_DIR/nanochat-run" --store "$WORK/run/artifacts-fail" slurm-fail; then
  echo "slurm-test: a failing task did not fail the stage" >&2; exit 1
fi
took=$(( $(date +%s) - start ))
[ "$took" -lt 60 ] || { echo "slurm-test: the failing stage took ${took}s" >&2; exit 1; }
echo "slurm-test: a failing task fails the stage in ${took}s: ok"

# Ctrl-C: nanochat-run sends srun two SIGINTs 300 ms apart (a lone SIGINT only makes srun print
# the tasks' states; two within a second make it send SIGINT to every task), the tasks stop
# gracefully, the stage is reported interrupted and nothing is published.
cat >"$WORK/run/pipelines/slurm-int.yaml" <<'EOF2'
stages:
  train:
    run: dist-toy-stage
    launcher: { kind: slurm, nodes: 1, ranks_per_node: 2, srun_args: [--overcommit] }
    config: { steps: 100000, sleep_ms: 20 }
EOF2
"$BIN_DIR/nanochat-run" --store "$WORK/run/artifacts-int" slurm-int >"$WORK/int.out" 2>&1 &
RUN=$!
for _ in $(seq 100); do
  grep -q "step 20/" "$WORK"/run/artifacts-int/tmp/*/data/train.log 2>/dev/null && break
  sleep 0.2
done
kill -INT "$RUN"
start=$(date +%s)
rc=0; wait "$RUN" || rc=$?
took=$(( $(date +%s) - start ))
cat "$WORK/int.out"
[ "$rc" = 130 ] || { echo "slurm-test: Ctrl-C: nanochat-run exited $rc, expected 130" >&2; exit 1; }
[ "$took" -lt 30 ] || { echo "slurm-test: Ctrl-C took ${took}s" >&2; exit 1; }
grep -q "interrupted" "$WORK/int.out" || { echo "slurm-test: Ctrl-C: stage not reported interrupted" >&2; exit 1; }
ILOG=$(cat "$WORK"/run/artifacts-int/objects/*/*/data/train.log)
for t in 0 1; do
  echo "$ILOG" | grep -q "^$t: dist_toy_stage: interrupted at step" \
    || { echo "slurm-test: Ctrl-C: task $t was not interrupted gracefully:"; echo "$ILOG"; exit 1; } >&2
done
echo "slurm-test: Ctrl-C stops every task gracefully in ${took}s: ok"

# The tiny pretrain through srun, 2 tasks, against the same pipeline at `ranks: 2` locally.
mkdir -p "$WORK/pt/source/corpus" "$WORK/pt/pipelines"
for s in a b val; do
  for i in $(seq 80); do
    echo "{\"text\": \"Shard $s line $i: the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\"}"
  done >"$WORK/pt/source/corpus/$s.jsonl"
done
pretrain_yaml() {
  cat <<EOF3
stages:
  data:
    run: nanochat-data
    config: { source: $WORK/pt/source }
  tokenizer:
    run: nanochat-tokenizer
    config: { vocab_size: 300 }
    inputs: { corpus: data }
  pretrain:
    run: nanochat-pretrain
    $1
    config:
      seed: 3
      threads: 1
      model: { depth: 1, sequence_len: 32 }
      train: { device_batch_size: 2, total_batch_size: 256, num_iterations: 20, save_every: 5, eval_every: 10, eval_batches: 2 }
    inputs: { corpus: data, tokenizer: tokenizer }
EOF3
}
pretrain_yaml "launcher: { kind: slurm, nodes: 1, ranks_per_node: 2, srun_args: [--overcommit] }" >"$WORK/pt/pipelines/pt-slurm.yaml"
pretrain_yaml "ranks: 2" >"$WORK/pt/pipelines/pt-local.yaml"
cd "$WORK/pt"
export NANOCHAT_BIN_DIR="$BIN_DIR"
"$BIN_DIR/nanochat-run" --store "$WORK/pt/slurm-store" pt-slurm
"$BIN_DIR/nanochat-run" --store "$WORK/pt/local-store" pt-local
PLOG=$(cat "$WORK"/pt/slurm-store/objects/*/*/data/pretrain.log)
for t in 0 1; do
  echo "$PLOG" | grep -q "^$t: .*data-parallel training" \
    || { echo "slurm-test: pretrain task $t did not train as rank $t of 2:"; echo "$PLOG"; exit 1; } >&2
done
weights() { find "$1/objects" -path '*/data/model/model.safetensors' -exec sha256sum {} + | awk '{print $1}' | sort -u; }
SW=$(weights "$WORK/pt/slurm-store"); LW=$(weights "$WORK/pt/local-store")
[ -n "$SW" ] && [ "$SW" = "$LW" ] \
  || { echo "slurm-test: pretrain weights under srun ($SW) differ from ranks: 2 ($LW)" >&2; exit 1; }
echo "slurm-test: tiny pretrain with 2 Slurm tasks: same weights as ranks: 2: ok"
