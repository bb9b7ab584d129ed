#!/usr/bin/env bash
# Fetch everything pipelines/speedrun.yaml reads besides the pretraining shards
# (scripts/download-fineweb.sh fetches those): the chat task files of midtraining and SFT, the
# CORE bundle, the chat eval sets, and the bits-per-byte validation text. Needs internet access,
# curl, unzip and python3 with the `datasets` and `pyarrow` packages (what nanochat itself uses:
# `pip install datasets pyarrow`). Rows are written as Hugging Face serves them (the schemas the
# loaders read: see docs/eval.md and crates/nanochat-data/src/tasks), gzip'd JSON lines.
#
#   scripts/download-speedrun-data.sh            # after scripts/download-fineweb.sh
#
# Writes data/fineweb/chat/ (midtrain + SFT) and data/speedrun-eval/{core,eval,val.jsonl.gz}.
# Finished files are skipped, so it can be rerun after a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
chat=data/fineweb/chat
ev=data/speedrun-eval
mkdir -p "$chat" "$ev/eval"

fetch() { # url dest
  [[ -s "$2" ]] && return 0
  echo "fetching $1" >&2
  curl -fL --retry 5 -o "$2.part" "$1" && mv "$2.part" "$2"
}

# nanochat's own files (speedrun.sh / tasks/customjson.py / tasks/spellingbee.py).
fetch https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl \
  "$chat/identity_conversations.jsonl"
fetch https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt \
  "$chat/words_alpha.txt"

# The CORE bundle (core.yaml, eval_meta_data.csv, eval_data/*.jsonl), as base_eval.py fetches it.
if [[ ! -s "$ev/core/core.yaml" ]]; then
  fetch https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip "$ev/eval_bundle.zip"
  rm -rf "$ev/core" "$ev/eval_bundle"
  unzip -q "$ev/eval_bundle.zip" -d "$ev"
  mv "$ev/eval_bundle" "$ev/core"
fi

# Hugging Face datasets -> gzip'd JSON lines, one file per (dataset, config, split).
python3 - "$chat" "$ev/eval" <<'PY'
import gzip, json, os, sys
from datasets import load_dataset

chat, ev = sys.argv[1], sys.argv[2]
jobs = [
    # midtrain + SFT training mixtures (mid_train.py, chat_sft.py)
    (chat, "smoltalk_train", "HuggingFaceTB/smol-smoltalk", None, "train"),
    (chat, "smoltalk_test", "HuggingFaceTB/smol-smoltalk", None, "test"),
    (chat, "mmlu_auxiliary_train", "cais/mmlu", "auxiliary_train", "train"),
    (chat, "mmlu_test", "cais/mmlu", "all", "test"),
    (chat, "gsm8k_train", "openai/gsm8k", "main", "train"),
    (chat, "gsm8k_test", "openai/gsm8k", "main", "test"),
    (chat, "arc_easy_train", "allenai/ai2_arc", "ARC-Easy", "train"),
    (chat, "arc_challenge_train", "allenai/ai2_arc", "ARC-Challenge", "train"),
    # chat evals (chat_eval.py)
    (ev, "arc_easy_test", "allenai/ai2_arc", "ARC-Easy", "test"),
    (ev, "arc_challenge_test", "allenai/ai2_arc", "ARC-Challenge", "test"),
    (ev, "mmlu_test", "cais/mmlu", "all", "test"),
    (ev, "gsm8k_test", "openai/gsm8k", "main", "test"),
    (ev, "humaneval", "openai/openai_humaneval", None, "test"),
]
for out_dir, name, repo, config, split in jobs:
    path = os.path.join(out_dir, name + ".jsonl.gz")
    if os.path.exists(path) and os.path.getsize(path) > 0:
        continue
    print(f"{repo} {config or ''} {split} -> {path}", file=sys.stderr)
    ds = load_dataset(repo, config, split=split)
    tmp = path + ".part"
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for row in ds:
            if config == "auxiliary_train":
                row = row["train"]  # nanochat's tasks/mmlu.py unwraps this subset the same way
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
PY

# Bits per byte: the text of the validation shard (the last one download-fineweb.sh fetched).
if [[ ! -s "$ev/val.jsonl.gz" ]]; then
  last=$(ls data/fineweb/corpus/shard_*.parquet 2>/dev/null | sort | tail -n 1 || true)
  [[ -n "$last" ]] || { echo "no FineWeb shards: run scripts/download-fineweb.sh first" >&2; exit 1; }
  python3 - "$last" "$ev/val.jsonl.gz" <<'PY'
import gzip, json, os, sys
import pyarrow.parquet as pq
src, dst = sys.argv[1], sys.argv[2]
with gzip.open(dst + ".part", "wt", encoding="utf-8") as f:
    for text in pq.read_table(src, columns=["text"]).column("text").to_pylist():
        f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
os.replace(dst + ".part", dst)
PY
fi
echo "done: $chat, $ev" >&2
