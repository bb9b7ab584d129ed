#!/usr/bin/env bash
# Train the tiny models (or reuse them from the artifact store) and evaluate them on the FULL
# ../shared/data tasks: pipelines/eval-full.yaml, then print the report card's summary table.
# A killed run resumes where it stopped: rerun this script (finished evaluation tasks are
# checkpointed in the stage's work dir). Extra arguments go to nanochat-run (e.g. --dry-run).
#
#   scripts/eval-full.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d ../shared/data/core ] || [ ! -d ../shared/data/eval ]; then
  echo "eval-full needs ../shared/data (core/, eval/, corpus/, extra/) next to this repository;" >&2
  echo "e.g. ln -s /path/to/shared ../shared" >&2
  exit 1
fi
cargo build --release -q --bins
bin=${CARGO_TARGET_DIR:-target}/release
"$bin/nanochat-run" pipelines/eval-full.yaml "$@"
if [ -f artifacts/refs/latest/report_full ]; then
  id=$(cat artifacts/refs/latest/report_full)
  card=artifacts/objects/${id:0:2}/${id:2}/data/report.md
  [ -f "$card" ] && { echo; echo "report card: $card"; sed -n '/^| Metric/,/^$/p' "$card"; }
fi
