"""Peer of examples/bench_core.rs: nanochat's reference core_eval.evaluate_task (PyTorch, CPU)
on the same CORE items (shuffle 1337, first ITEMS), cl100k tokenizer, random depth-D GPT.
usage: NANOCHAT_SRC=/path/to/nanochat python3 bench_core_torch.py <shared/data> [DEPTH] [ITEMS] [TASK]"""
import csv, gzip, json, os, random, sys, time
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
sys.path.insert(0, os.environ["NANOCHAT_SRC"])
import tiktoken, base64
from nanochat.gpt import GPT, GPTConfig
from nanochat.core_eval import evaluate_task

shared = sys.argv[1]
depth = int(sys.argv[2]) if len(sys.argv) > 2 else 8
items = int(sys.argv[3]) if len(sys.argv) > 3 else 40
task = sys.argv[4] if len(sys.argv) > 4 else "hellaswag_zeroshot"
ranks = {}
with gzip.open(f"{shared}/tokenizer/cl100k_base.tiktoken.gz", "rt") as f:
    for line in f:
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
enc = tiktoken.Encoding("cl100k_local", pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 100257})
BOS = 100257
class Tok:
    def get_bos_token_id(self): return BOS
    def __call__(self, prompts, prepend=None):
        return [[prepend] + enc.encode_ordinary(p) for p in prompts]
rows = list(csv.DictReader(open(f"{shared}/core/core_tasks.tsv", encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE))
row = next(r for r in rows if r["label"] == task)
data = [json.loads(l) for l in gzip.open(f"{shared}/core/{row['dataset_file']}", "rt", encoding="utf-8")]
random.Random(1337).shuffle(data)
data = data[:items]
meta = dict(task_type=row["task_type"], num_fewshot=int(row["num_fewshot"]),
            continuation_delimiter=json.loads(row["continuation_delimiter"]))
dim = depth * 64; heads = max(1, (dim + 127) // 128)
cfg = GPTConfig(sequence_len=2048, vocab_size=100352, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=dim)
torch.manual_seed(0)
m = GPT(cfg); m.init_weights(); m.eval()
t = time.time()
acc = evaluate_task(m, Tok(), data, "cpu", meta)
dt = time.time() - t
print(json.dumps({"impl": "pytorch-reference", "task": task, "depth": depth, "items": len(data),
    "seconds": round(dt, 2), "items_per_s": round(len(data) / dt, 3), "accuracy": round(acc, 4),
    "threads": torch.get_num_threads(), "torch": torch.__version__}))
