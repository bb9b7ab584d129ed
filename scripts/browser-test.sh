#!/usr/bin/env bash
# Headless-Chromium test of the chat page: load /, send a message, watch the reply stream in,
# use /clear. Installs Debian's chromium and playwright-core (npm) when missing. Loopback only.
# Screenshots land in ${BROWSER_TEST_OUT:-target/browser-test}/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="${BROWSER_TEST_OUT:-$root/target/browser-test}"
mkdir -p "$out"

if ! command -v chromium >/dev/null; then
  echo "browser-test: installing chromium (Debian package)"
  if [[ $(id -u) -eq 0 ]]; then apt-get install -y -q chromium >/dev/null; else sudo apt-get install -y -q chromium >/dev/null; fi
fi
tools="$out/node"
if [[ ! -d "$tools/node_modules/playwright-core" ]]; then
  echo "browser-test: installing playwright-core (npm)"
  mkdir -p "$tools"
  (cd "$tools" && npm install --silent --no-audit --no-fund playwright-core@1 >/dev/null)
fi

cargo build -q -p nanochat-inference --bin nanochat-inference
bin="${CARGO_TARGET_DIR:-target}/debug/nanochat-inference"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if [[ -n "${NANOCHAT_TEST_MODEL:-}" ]]; then model_args=(--model "$NANOCHAT_TEST_MODEL"); else model_args=(--fake --fake-step-ms 20); fi
"$bin" "${model_args[@]}" --host 127.0.0.1 --port "$port" 2>"$out/server.log" &
server=$!
profile=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$profile"' EXIT

NODE_PATH="$tools/node_modules" URL="http://127.0.0.1:$port/" OUT="$out" PROFILE="$profile" \
  EXPECT_FAKE=$([[ -z "${NANOCHAT_TEST_MODEL:-}" ]] && echo 1 || echo 0) \
  node "$root/scripts/browser_test.js"
