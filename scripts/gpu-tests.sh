#!/usr/bin/env bash
# The GPU tests: every CUDA op against the CPU backend, the GPT on the GPU against the
# reference fixture and the CPU, checkpoints across devices. They skip with a notice where no
# GPU can be opened, so `cargo test` elsewhere stays green. Training: a 200-step loss curve
# against the CPU's and a bit-identical resume from a GPU checkpoint (nanochat-train), and
# NCCL in a world of one on the device (needs libnccl.so.2: found through NANOCHAT_NCCL, the
# linker's path, or PyTorch's nvidia-nccl wheel).
#
#   scripts/gpu-tests.sh                 build with --features cuda and run here (needs a GPU)
#   scripts/gpu-tests.sh --build DIR     build the test executables into DIR (no GPU needed)
#   scripts/gpu-tests.sh --run DIR       run executables built by --build (a GPU machine
#                                        without a Rust toolchain); logs to $OUT when set
#
# The fixture test needs shared/fixtures/gpt_tiny_a: $NANOCHAT_SHARED_DIR, or ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."
export CC=/bin/false CXX=/bin/false
PKGS=(-p nanochat-compute -p nanochat-model -p nanochat-train)

build_into() {
  local dir="$1"
  mkdir -p "$dir"
  cargo test --release --features cuda "${PKGS[@]}" --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys, shutil, os
dest = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        name = m["target"]["name"]
        if name in ("cuda_parity", "cuda", "cuda_training", "nccl"):
            out = os.path.join(dest, "test-" + m["package_id"].split("#")[0].rsplit("/", 1)[-1] + "-" + name)
            shutil.copy(m["executable"], out)
            print(out)
' "$dir"
}

# NCCL for the NCCL test: $NANOCHAT_NCCL, the linker's path, or the wheel PyTorch ships.
find_nccl() {
  if [[ -z "${NANOCHAT_NCCL:-}" ]]; then
    local d
    d=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null) || true
    if [[ -n "$d" && -e "$d/libnccl.so.2" ]]; then export NANOCHAT_NCCL="$d/libnccl.so.2"; fi
  fi
}

run_from() {
  local dir="$1" log="${OUT:-/tmp}/gpu-tests.log" rc=0
  find_nccl
  for t in "$dir"/test-*; do
    echo "== $t" | tee -a "$log"
    "$t" --test-threads=1 --nocapture 2>&1 | tee -a "$log" || rc=1
  done
  return $rc
}

case "${1:-}" in
  --build) build_into "${2:?--build DIR}" ;;
  --run) run_from "${2:?--run DIR}" ;;
  "")
    cargo test --release --features cuda -p nanochat-compute --test cuda_parity -- --test-threads=1 --nocapture
    cargo test --release --features cuda -p nanochat-model --test cuda -- --test-threads=1 --nocapture
    cargo test --release --features cuda -p nanochat-train --test cuda_training -- --test-threads=1 --nocapture
    find_nccl
    cargo test --release --features cuda -p nanochat-train --test nccl -- --test-threads=1 --nocapture
    ;;
  *) echo "usage: $0 [--build DIR | --run DIR]" >&2; exit 2 ;;
esac
