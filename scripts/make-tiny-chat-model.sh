#!/usr/bin/env bash
# Regenerates crates/nanochat-inference/testdata/tiny-chat, the trained chat model the server,
# SDK and CLI tests run against (about 30 s on 2 cores after the release build).
#
# It runs the recipe pipeline (crates/nanochat-inference/testdata/tiny-chat/recipe) with
# nanochat-run in a throw-away artifact store: data -> tokenizer (512 tokens) -> pretrain
# (depth 1, 200 steps) -> SFT on the identity conversations (300 steps, memorised), then copies
# the SFT model and tokenizer into the fixture directory. Training with 2 threads is
# deterministic on one machine; on another the bytes may differ but the replies the tests
# assert (the memorised identity answers) do not.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p nanochat-run -p nanochat-data -p nanochat-tokenizer-stage \
  -p nanochat-pretrain -p nanochat-sft
fixture=crates/nanochat-inference/testdata/tiny-chat
store=$(mktemp -d)
trap 'rm -rf "$store"' EXIT
NANOCHAT_BIN_DIR="$target/release" "$target/release/nanochat-run" --store "$store" \
  "$fixture/recipe/pipeline.yaml"
object=$("$target/release/nanochat-run" --store "$store" "$fixture/recipe/pipeline.yaml" refs \
  | awk '$2 == "latest/sft" { print $1 }')
src="$store/objects/${object:0:2}/${object:2}/data"
if [[ ! -f "$src/model/model.safetensors" ]]; then
  echo "make-tiny-chat-model: no SFT model found in $store (object ${object:-?})" >&2
  exit 1
fi
tmp=$(mktemp -d "$fixture.new.XXXXXX")
mkdir -p "$tmp/model" "$tmp/tokenizer"
cp "$src"/model/{config.json,meta.json,model.safetensors} "$tmp/model/"
cp "$src"/tokenizer/{tokenizer.json,tokenizer.tiktoken} "$tmp/tokenizer/"
chmod 644 "$tmp"/*/*
for part in model tokenizer; do
  rm -rf "$fixture/$part.old"
  [[ -d "$fixture/$part" ]] && mv "$fixture/$part" "$fixture/$part.old"
  mv "$tmp/$part" "$fixture/$part"
  rm -rf "$fixture/$part.old"
done
rmdir "$tmp"
echo "make-tiny-chat-model: wrote $fixture (final SFT loss: $(grep -o '"train_loss": *[0-9.e-]*' "$src/summary.json" | cut -d: -f2))"
sha256sum "$fixture"/model/model.safetensors "$fixture"/tokenizer/*
