#!/usr/bin/env bash
# Drives nanochat-inference with the official `openai` Python SDK over loopback:
# non-streaming and streaming chat, text completions, models, n choices, concurrency and the
# error mapping.
# Models: the built-in scripted fake model (exact echo replies), then the trained fixture
# crates/nanochat-inference/testdata/tiny-chat (memorised identity answers, see its README).
# With $NANOCHAT_TEST_MODEL=<artifact dir> only that model is checked (shapes, not content).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import openai' 2>/dev/null; then
  echo "test-openai-sdk: installing the openai SDK"
  python3 -m pip install --quiet openai
fi

cargo build -q -p nanochat-inference --bin nanochat-inference
bin="${CARGO_TARGET_DIR:-target}/debug/nanochat-inference"

check() { # expect, server args...
  local expect=$1; shift
  local port log server
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  log=$(mktemp)
  "$bin" "$@" --host 127.0.0.1 --port "$port" --model-name nanochat-test 2>"$log" &
  server=$!
  if ! python3 "$(dirname "$0")/openai_sdk_check.py" --base-url "http://127.0.0.1:$port/v1" \
      --model nanochat-test --expect "$expect"; then
    echo "--- server log ($expect)"; cat "$log"
    kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"
    return 1
  fi
  kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"
}

if [[ -n "${NANOCHAT_TEST_MODEL:-}" ]]; then
  check model --model "$NANOCHAT_TEST_MODEL"
else
  check fake --fake --fake-step-ms 1
  check trained --model crates/nanochat-inference/testdata/tiny-chat
fi
