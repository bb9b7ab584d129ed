#!/usr/bin/env python3
"""PyTorch side of the training-step benchmark (peer of `bench_step`, see scripts/bench-train.sh).

Times the reference nanochat GPT (imported from $NANOCHAT_SRC, e.g. /work/ref/nanochat) on the
CPU with THREADS threads, in the same settings as crates/nanochat-train/examples/bench_step.rs:

  fwd_bwd        forward + backward of one micro-batch, f32
  step           one optimizer step as base_train.py does it: ACCUM micro-batches of real text
                 (tokenized with GPT-2's r50k_base via tiktoken, BOS before each document,
                 packed into (BATCH, SEQ+1) rows, ids folded mod VOCAB like ours), loss/ACCUM
                 backward, clip_grad_norm_(1.0), Muon momentum warmup, AdamW + Muon steps
  step_accum1    the same with ACCUM = 1
  bf16_*         the same under torch.autocast("cpu", dtype=torch.bfloat16) (the reference's
                 GPU training runs under bf16 autocast; this is its CPU analogue)

usage: NANOCHAT_SRC=/work/ref/nanochat python3 scripts/bench_torch_train.py DEPTH SEQ BATCH VOCAB THREADS [ACCUM]
Needs only torch and tiktoken (no numpy). Data: $NANOCHAT_SHARED_DIR/data (default ../shared).
Prints one JSON line. torch.compile is disabled (CPU, like the shared model benchmark).
"""
import base64
import contextlib
import glob
import gzip
import json
import os
import sys
import time

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
import tiktoken  # noqa: E402
import torch  # noqa: E402

R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_r50k(path):
    ranks = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return tiktoken.Encoding(
        name="r50k_local",
        pat_str=R50K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )


def batches(shared, enc, b, t, vocab):
    """Endless (x, y) batches of packed real text, as the Rust packer builds them."""
    shards = sorted(glob.glob(os.path.join(shared, "data", "corpus", "shard_*.jsonl.gz")))
    if not shards:
        sys.exit(f"no corpus shards under {shared}/data/corpus (set NANOCHAT_SHARED_DIR)")
    bos = enc.eot_token
    buf = []
    need = b * (t + 1)
    while True:
        for path in shards:
            with gzip.open(path, "rt") as f:
                docs = []
                for line in f:
                    docs.append(json.loads(line)["text"])
                    if len(docs) == 64:
                        for ids in enc.encode_ordinary_batch(docs, num_threads=1):
                            buf.append(bos)
                            buf.extend(ids)
                        docs = []
                        while len(buf) >= need:
                            rows = torch.tensor(buf[:need], dtype=torch.long).view(b, t + 1) % vocab
                            del buf[:need]
                            yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def main():
    args = [int(a) for a in sys.argv[1:]]
    if len(args) < 5:
        sys.exit(__doc__)
    depth, seq, batch, vocab, threads = args[:5]
    accum = max(1, args[5] if len(args) > 5 else 8)
    steps = max(1, int(os.environ.get("NANOCHAT_BENCH_STEPS", "2")))
    torch.set_num_threads(threads)
    sys.path.insert(0, os.environ["NANOCHAT_SRC"])
    from nanochat.gpt import GPT, GPTConfig

    shared = os.environ.get(
        "NANOCHAT_SHARED_DIR",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"),
    )
    enc = load_r50k(os.path.join(shared, "data", "tokenizer", "r50k_base.tiktoken.gz"))
    dim = depth * 64
    heads = max(1, (dim + 127) // 128)
    cfg = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=heads,
                    n_kv_head=heads, n_embd=dim)

    def fresh():
        torch.manual_seed(0)
        m = GPT(cfg)
        m.init_weights()
        return m

    def autocast(bf16):
        if bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def time_fwd_bwd(bf16):
        m = fresh()
        x, y = next(batches(shared, enc, batch, seq, vocab))

        def run():
            with autocast(bf16):
                loss = m(x, y)
            loss.backward()
            m.zero_grad(set_to_none=True)

        run()
        reps = max(2, steps)
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        return reps * batch * seq / (time.perf_counter() - t0)

    def time_step(bf16, acc):
        m = fresh()
        with contextlib.redirect_stdout(sys.stderr):  # it prints its lr scaling
            adamw, muon = m.setup_optimizers()
        data = batches(shared, enc, batch, seq, vocab)

        def step(it):
            for _ in range(acc):
                x, y = next(data)
                with autocast(bf16):
                    loss = m(x, y)
                (loss / acc).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            frac = min(it / 300, 1)
            for group in muon.param_groups:
                group["momentum"] = (1 - frac) * 0.85 + frac * 0.95
            adamw.step()
            muon.step()
            m.zero_grad(set_to_none=True)

        step(0)
        t0 = time.perf_counter()
        for it in range(steps):
            step(it + 1)
        return steps * acc * batch * seq / (time.perf_counter() - t0)

    out = dict(depth=depth, seq=seq, batch=batch, vocab=vocab, threads=torch.get_num_threads(),
               accum=accum, steps=steps, torch=torch.__version__)
    for name, bf16 in (("f32", False), ("bf16", True)):
        out[f"{name}_fwd_bwd_tok_s"] = round(time_fwd_bwd(bf16), 1)
        out[f"{name}_step_tok_s"] = round(time_step(bf16, accum), 1)
        out[f"{name}_step_accum1_tok_s"] = (
            out[f"{name}_step_tok_s"] if accum == 1 else round(time_step(bf16, 1), 1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
