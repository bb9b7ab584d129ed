"""Regenerate core_render_goldens.json from nanochat's reference renderer.

usage: python3 make_core_goldens.py <nanochat repo> <shared/data/core> > core_render_goldens.json

For every task of core_tasks.tsv: shuffle with Random(1337), crop to MAX items, and for the first
ITEMS items record the few-shot indices (Random(1234 + idx).sample) and the sha256 of every
rendered prompt (joined with a NUL byte), using the reference's own render functions.
"""
import csv, gzip, hashlib, importlib.util, json, random, sys

MAX, ITEMS = 100, 4
ref, core = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("core_eval", f"{ref}/nanochat/core_eval.py")
ce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ce)
render = {"multiple_choice": ce.render_prompts_mc, "schema": ce.render_prompts_schema,
          "language_modeling": ce.render_prompts_lm}
out = []
with open(f"{core}/core_tasks.tsv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
for row in rows:
    delim = json.loads(row["continuation_delimiter"])
    shots = int(row["num_fewshot"])
    data = [json.loads(l) for l in gzip.open(f"{core}/{row['dataset_file']}", "rt", encoding="utf-8")]
    random.Random(1337).shuffle(data)
    data = data[:MAX]
    items = []
    for idx in range(ITEMS):
        few = []
        if shots > 0:
            avail = [i for i in range(len(data)) if i != idx]
            few = random.Random(1234 + idx).sample(avail, shots)
        prompts = render[row["task_type"]](data[idx], delim, [data[i] for i in few])
        h = hashlib.sha256("\0".join(prompts).encode("utf-8")).hexdigest()
        items.append({"fewshot": few, "sha256": h, "first_prompt_head": prompts[0][:120]})
    out.append({"label": row["label"], "items": items})
json.dump({"max_per_task": MAX, "tasks": out}, sys.stdout, indent=1, ensure_ascii=False)
print()
