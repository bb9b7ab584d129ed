#!/usr/bin/env bash
# Drives nanochat-inference with the official `openai` Python SDK over loopback:
# non-streaming and streaming chat, text completions, models, and the error mapping.
# Model: $NANOCHAT_TEST_MODEL (an artifact dir with checkpoint + tokenizer) if set,
# otherwise the built-in scripted fake model.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import openai' 2>/dev/null; then
  echo "test-openai-sdk: installing the openai SDK"
  python3 -m pip install --quiet openai
fi

cargo build -q -p nanochat-inference --bin nanochat-inference
bin="${CARGO_TARGET_DIR:-target}/debug/nanochat-inference"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if [[ -n "${NANOCHAT_TEST_MODEL:-}" ]]; then
  model_args=(--model "$NANOCHAT_TEST_MODEL")
  expect=model
else
  model_args=(--fake --fake-step-ms 1)
  expect=fake
fi
log=$(mktemp)
"$bin" "${model_args[@]}" --host 127.0.0.1 --port "$port" --model-name nanochat-test 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"' EXIT

python3 "$(dirname "$0")/openai_sdk_check.py" --base-url "http://127.0.0.1:$port/v1" --model nanochat-test --expect "$expect" \
  || { echo "--- server log"; cat "$log"; exit 1; }
