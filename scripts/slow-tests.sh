#!/usr/bin/env bash
# Tests too slow for CI (.ci/run): `#[ignore]`d Rust tests and end-to-end browser checks.
set -euo pipefail
cd "$(dirname "$0")/.."
# Among them: nanochat-run's speedrun_ci reruns every stage of pipelines/tiny.yaml with --force
# (same object ids, nothing downstream reruns); needs the stage binaries (--workspace builds them).
cargo test --workspace --release -- --ignored
scripts/browser-test.sh
