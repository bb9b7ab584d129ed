#!/usr/bin/env python3
"""Loss-curve parity: trains nanochat's reference GPT with its own Muon + AdamW (imported from
NANOCHAT_SRC, run on CPU in float32) on the exact micro-batches and from the exact step-0 weights
that our `nanochat-pretrain` dumped (NANOCHAT_PARITY_DUMP), with the same LR schedule, gradient
clipping and Muon momentum warmup, then prints both loss curves side by side.

Run through scripts/compare-loss-torch.sh. Needs only python3 + torch: the safetensors file and
the batch dump are parsed here by hand (no numpy, no safetensors package).

The reference code is used as is: its rotary tables are rounded to bfloat16 and Muon's
Newton-Schulz iteration runs in bfloat16. torch.compile is disabled (TORCHDYNAMO_DISABLE=1, set by
the shell script) so Newton-Schulz runs eagerly; the arithmetic is the same bfloat16 math.
"""
import argparse
import json
import math
import os
import struct
import sys

import torch


def read_safetensors(path):
    """{name: float32 tensor} from a safetensors file (F32 tensors only)."""
    with open(path, "rb") as f:
        raw = f.read()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    body = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            sys.exit(f"{path}: tensor {name} has dtype {info['dtype']}, expected F32")
        start, end = info["data_offsets"]
        buf = bytearray(raw[body + start : body + end])
        tensors[name] = torch.frombuffer(buf, dtype=torch.float32).reshape(info["shape"]).clone()
    return tensors


def micro_batches(path, b, t):
    """Yields (inputs, targets) int64 tensors of shape (b, t) from the dump, in order."""
    words = 2 * b * t
    with open(path, "rb") as f:
        while True:
            chunk = f.read(4 * words)
            if len(chunk) < 4 * words:
                return
            flat = torch.frombuffer(bytearray(chunk), dtype=torch.int32).to(torch.int64)
            yield flat[: b * t].view(b, t), flat[b * t :].view(b, t)


def lr_multiplier(step, n, warmup_ratio, warmdown_ratio, final_frac):
    """The reference loop's schedule: linear warmup, constant, linear warmdown to final_frac."""
    warmup = round(warmup_ratio * n)
    warmdown = round(warmdown_ratio * n)
    if step < warmup:
        return (step + 1) / warmup
    if step <= n - warmdown:
        return 1.0
    progress = (n - step) / warmdown
    return progress + (1 - progress) * final_frac


def muon_momentum(step):
    """Momentum warmup of the reference loop: 0.85 -> 0.95 over the first 300 steps."""
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def train_reference(dump, steps, threads):
    sys.path.insert(0, os.environ.get("NANOCHAT_SRC", "/work/ref/nanochat"))
    from nanochat.gpt import GPT, GPTConfig

    torch.set_num_threads(threads)
    run = json.load(open(os.path.join(dump, "run.json")))
    cfg = json.load(open(os.path.join(dump, "init", "config.json")))
    train = run["train"]
    b, t, accum = run["device_batch_size"], run["sequence_len"], run["grad_accum_steps"]
    model = GPT(
        GPTConfig(
            sequence_len=cfg["sequence_len"],
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["n_layer"],
            n_head=cfg["n_head"],
            n_kv_head=cfg["n_kv_head"],
            n_embd=cfg["n_embd"],
        )
    )
    model.load_state_dict(read_safetensors(os.path.join(dump, "init", "model.safetensors")), strict=True)
    model.train()
    frac = train.get("init_lr_frac", 1.0)
    optimizers = model.setup_optimizers(
        unembedding_lr=train["unembedding_lr"] * frac,
        embedding_lr=train["embedding_lr"] * frac,
        matrix_lr=train["matrix_lr"] * frac,
        weight_decay=train["weight_decay"],
    )
    muon = optimizers[1]
    batches = micro_batches(os.path.join(dump, "batches.bin"), b, t)
    n = train["num_iterations"]
    losses, norms = [], []
    for step in range(steps):
        step_loss = 0.0
        for _ in range(accum):
            try:
                x, y = next(batches)
            except StopIteration:
                sys.exit(f"the dump holds fewer than {steps} steps of {accum} micro-batches")
            loss = model(x, y)
            step_loss += loss.item() / accum
            (loss / accum).backward()
        if train["grad_clip"] > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"]).item()
        else:
            norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
        lrm = lr_multiplier(step, n, train["warmup_ratio"], train["warmdown_ratio"], train["final_lr_frac"])
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in muon.param_groups:
            group["momentum"] = muon_momentum(step)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(step_loss)
        norms.append(norm)
        if (step + 1) % 20 == 0:
            print(f"reference step {step + 1}/{steps}: loss {step_loss:.4f}", file=sys.stderr)
    return losses, norms


def read_ours(path):
    """Per-step training loss and grad norm from our metrics.jsonl, indexed by step - 1."""
    loss, norm = {}, {}
    for line in open(path):
        m = json.loads(line)
        if "loss" in m:
            loss[m["step"] - 1] = m["loss"]
            norm[m["step"] - 1] = m.get("grad_norm")
    return loss, norm


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dump", required=True, help="NANOCHAT_PARITY_DUMP directory of our run")
    ap.add_argument("--ours", required=True, help="our run's metrics.jsonl")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--every", type=int, default=20, help="print every Nth step (1: all)")
    ap.add_argument("--json", help="write both curves here")
    args = ap.parse_args()

    ours_loss, ours_norm = read_ours(args.ours)
    missing = [s + 1 for s in range(args.steps) if s not in ours_loss]
    if missing:
        sys.exit(f"{args.ours}: no loss for steps {missing[:5]}...")
    ref_loss, ref_norm = train_reference(args.dump, args.steps, args.threads)

    rel = [abs(ours_loss[s] - ref_loss[s]) / abs(ref_loss[s]) for s in range(args.steps)]
    print(f"{'step':>5} {'ours':>9} {'pytorch':>9} {'rel.dev':>8} {'|g| ours':>9} {'|g| torch':>9}")
    for s in range(args.steps):
        if (s + 1) % args.every == 0 or s == 0:
            print(
                f"{s + 1:>5} {ours_loss[s]:>9.4f} {ref_loss[s]:>9.4f} {100 * rel[s]:>7.2f}% "
                f"{ours_norm[s]:>9.4f} {ref_norm[s]:>9.4f}"
            )
    worst = max(range(args.steps), key=lambda s: rel[s])
    print(f"max relative deviation  {100 * rel[worst]:.2f}% (step {worst + 1})")
    print(f"mean relative deviation {100 * sum(rel) / len(rel):.2f}% over {args.steps} steps")
    tail = rel[-20:]
    print(f"mean relative deviation {100 * sum(tail) / len(tail):.2f}% over the last {len(tail)} steps")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"ours": [ours_loss[s] for s in range(args.steps)], "pytorch": ref_loss,
                 "ours_grad_norm": [ours_norm[s] for s in range(args.steps)], "pytorch_grad_norm": ref_norm},
                f,
            )


if __name__ == "__main__":
    main()
