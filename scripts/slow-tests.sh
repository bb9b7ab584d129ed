#!/usr/bin/env bash
# Tests too slow for CI (.ci/run): `#[ignore]`d Rust tests and end-to-end browser checks.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release -- --ignored
scripts/browser-test.sh
