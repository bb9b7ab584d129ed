"""PyTorch peer of crates/nanochat-engine/examples/bench_engine.rs: the reference nanochat
Engine (commit 48abd7d) on a randomly initialised GPT, CPU with 2 threads (or DEVICE=cuda: one
GPU, bf16 autocast as the reference's chat scripts run it). Times the first token
(batch-1 prefill of the prompt + first sample) and the decode rate of `Engine.generate` with
num_samples=BATCH (one prefill, KV cache replicated per sample), greedy. One JSON line.

usage: [DEVICE=cuda] NANOCHAT_SRC=/work/ref/nanochat python3 bench_engine_torch.py \
           DEPTH SEQ VOCAB BATCH [PROMPT_LEN=16] [NEW_TOKENS=128] [REPEATS=2]
"""
import contextlib, json, os, sys, time

os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
sys.path.insert(0, os.environ["NANOCHAT_SRC"])
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.engine import Engine  # noqa: E402


class OpaqueTokenizer:
    """Special tokens the engine asks for map to ids the greedy model never reaches."""

    def encode_special(self, s):
        return -1

    def get_bos_token_id(self):
        return -2

    def encode(self, s):
        return []

    def decode(self, ids):
        return ""


args = [int(a) for a in sys.argv[1:]]
depth, seq, vocab, batch = args[:4]
prompt_len = args[4] if len(args) > 4 else 16
new_tokens = args[5] if len(args) > 5 else 128
repeats = args[6] if len(args) > 6 else 2
dim = depth * 64
heads = max(1, (dim + 127) // 128)
cfg = GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=depth, n_head=heads, n_kv_head=heads, n_embd=dim)
torch.manual_seed(0)
device = os.environ.get("DEVICE", "cpu")
model = GPT(cfg).to(device)
model.init_weights()
autocast = (torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
            if device.startswith("cuda") else contextlib.nullcontext())
model.eval()
engine = Engine(model, OpaqueTokenizer())
prompt = [(i * 7919 + 13) % vocab for i in range(prompt_len)]

best = None
for run in range(repeats + 1):
    t0 = time.time()
    first = None
    tokens = 0
    with autocast:
        for column, _masks in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=0.0):
            tokens += len(column)
            if first is None:
                first = time.time() - t0
    total = time.time() - t0
    decode_tps = (tokens - batch) / (total - first)
    if run > 0 and (best is None or total < best[2]):
        best = (first, decode_tps, total)

ttft, decode_tps, total = best
print(json.dumps(dict(impl="torch", depth=depth, seq=seq, vocab=vocab, batch=batch, prompt_len=prompt_len,
                      new_tokens=new_tokens, params=sum(p.numel() for p in model.parameters()),
                      threads=torch.get_num_threads(), ttft_s=round(ttft, 4),
                      decode_tokens_per_s=round(decode_tps, 1),
                      decode_tokens_per_s_per_seq=round(decode_tps / batch, 1), total_s=round(total, 3),
                      device=device, torch=torch.__version__)))
