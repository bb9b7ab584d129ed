#!/usr/bin/env bash
# Download nanochat's pretraining shards (FineWeb-EDU 100B, shuffled, parquet with a `text`
# column, zstd) for pipelines/speedrun.yaml. Resumable: finished shards are skipped and a
# partial download continues where it stopped (curl -C -). Needs internet access.
#
#   scripts/download-fineweb.sh [NUM_SHARDS] [DEST]
#
# NUM_SHARDS defaults to 240 (what the d20 speedrun reads, ~24 GB); the last shard downloaded is
# the validation split. DEST defaults to data/fineweb/corpus.
set -euo pipefail
n="${1:-240}"
dest="${2:-data/fineweb/corpus}"
base="${FINEWEB_BASE_URL:-https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main}"
mkdir -p "$dest"
for ((i = 0; i < n; i++)); do
  name=$(printf "shard_%05d.parquet" "$i")
  out="$dest/$name"
  [[ -s "$out" ]] && continue
  echo "[$((i + 1))/$n] $name" >&2
  for attempt in 1 2 3 4 5; do
    if curl -fL --retry 3 -C - -o "$out.part" "$base/$name"; then
      mv "$out.part" "$out"
      break
    fi
    echo "retry $attempt for $name" >&2
    sleep $((attempt * 2))
  done
  [[ -s "$out" ]] || { echo "failed to download $name" >&2; exit 1; }
done
echo "done: $(ls "$dest" | wc -l) shards in $dest" >&2
