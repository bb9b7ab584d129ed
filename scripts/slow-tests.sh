#!/usr/bin/env bash
# Tests too slow for CI (.ci/run): `#[ignore]`d Rust tests and end-to-end browser checks.
set -euo pipefail
cd "$(dirname "$0")/.."
# Among them: nanochat-run's speedrun_ci reruns every stage of pipelines/tiny.yaml with --force
# (same object ids, nothing downstream reruns); needs the stage binaries (--workspace builds them).
cargo test --workspace --release -- --ignored
scripts/browser-test.sh
# A one-node Slurm cluster (Debian's slurmctld/slurmd/munge; needs root): launcher: slurm.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  scripts/slurm-test.sh
else
  echo "slow-tests: skipping scripts/slurm-test.sh (needs root and apt-get)"
fi
