"""Peers for `cargo bench -p nanochat-tokenizer --bench tokenizer`: the same workloads with
rustbpe 0.1.0 (training, as nanochat uses it) and tiktoken (cl100k_base encoding).
Usage: python3 scripts/bench_tokenizer_peers.py SHARED_DIR [train|encode] [--reps N]"""
import base64, gzip, json, os, sys, time

shared = sys.argv[1]
what = [a for a in sys.argv[2:] if a in ("train", "encode")] or ["train", "encode"]
reps = int(sys.argv[sys.argv.index("--reps") + 1]) if "--reps" in sys.argv else 2
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
CL100K = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""

docs = []
for i in range(11):
    with gzip.open(os.path.join(shared, f"data/corpus/shard_{i:05d}.jsonl.gz"), "rt", encoding="utf-8") as f:
        docs.extend(json.loads(line)["text"] for line in f if line.strip())
mb = sum(len(d.encode()) for d in docs) / 1e6
print(f"corpus: {len(docs)} documents, {mb:.1f} MB")

def best(fn):
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter(); out = fn(); times.append(time.perf_counter() - t)
    return min(times), out

if "train" in what:
    import rustbpe
    def train():
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), 32768, pattern=PATTERN)
        return len(tok.get_mergeable_ranks())
    secs, n = best(train)
    print(f"rustbpe {getattr(rustbpe, '__version__', '0.1.0')} train vocab {n}: {secs:.3f} s (best of {reps})")

if "encode" in what:
    import tiktoken
    ranks = {}
    with gzip.open(os.path.join(shared, "data/tokenizer/cl100k_base.tiktoken.gz"), "rt") as f:
        for line in f:
            if line.strip():
                t, r = line.split()
                ranks[base64.b64decode(t)] = int(r)
    enc = tiktoken.Encoding("cl100k_base", pat_str=CL100K, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
                                            "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                                            "<|endofprompt|>": 100276})
    joined = "\n".join(docs)
    secs, ids = best(lambda: enc.encode_ordinary(joined))
    print(f"tiktoken {tiktoken.__version__} encode cl100k single call: {len(joined.encode())/1e6/secs:.1f} MB/s "
          f"({len(ids)} tokens, id sum {sum(ids)}, {secs:.3f} s, best of {reps})")
    secs, out = best(lambda: enc.encode_ordinary_batch(docs, num_threads=2))
    print(f"tiktoken {tiktoken.__version__} encode cl100k batch (2 threads): {mb/secs:.1f} MB/s "
          f"({sum(map(len, out))} tokens, id sum {sum(map(sum, out))}, {secs:.3f} s, best of {reps})")
