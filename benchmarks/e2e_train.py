"""End-to-end training throughput: `python -m benchmarks.e2e_train [--out DIR] [--quick]`.

One full training step (next batch from the memory-mapped token loader -> H2D copy -> forward
with bf16 autocast -> backward -> fused AdamW step) of the same GPT, in one process, for:

  gptkernels   gptkernels.GPT, default backend (our CUDA kernels where they apply), no compile;
               its loss runs through linear_cross_entropy, so the (B*T, 50304) logits and their
               gradient never exist in full (the baselines hold them: see peak_mem_gib)
  eager        `NanoGPT` below: a plain nanoGPT-style module in PyTorch eager: nn.LayerNorm,
               F.scaled_dot_product_attention (causal), nn.Linear + nn.GELU(tanh), F.cross_entropy.
               (Written out here rather than gptkernels.backend("reference"): our attention
               reference is explicit math, not SDPA, so it would not be the baseline people run.)
  compile      the same NanoGPT under torch.compile (default mode, inductor)
  gptkernels-compile   (optional, --providers) our GPT under torch.compile

Models: GPT-2 124M (12 layers x 12 heads x 768, vocab 50304, T=1024) at B=16 and GPT-2 350M
(24 x 16 x 1024) at B=8. Every provider starts from the same weights (our GPT's init, loaded by
parameter name: the modules share GPT-2's names) and sees the same batches, so the first losses
agree (reported) and the rows compare the same computation.

Reported per row: median step time, tokens/s, model TFLOP/s and MFU (training FLOPs per token
= GPT.flops_per_token: 6 N + 12 L H D T; peak = dense bf16 of the GPU, 989 TFLOP/s on H100/H200),
peak memory (torch.cuda.max_memory_allocated over warm-up and timed steps), compile/warm-up
seconds, first and last loss, and speedups against eager and against compile.
JSON + CSV + PNG through benchmarks.harness.write_results (env_info included).

On a machine without a GPU it runs a tiny configuration in float32 as a smoke test of this file
(the numbers mean nothing there). Anchors measured on an H200 with torch 2.11 (shared/GPU.md):
124M eager 351K tokens/s (16.0 GiB), torch.compile 501K (8.4 GiB); 350M eager 145K (16.1 GiB),
compile 179K (12.4 GiB).
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import harness

MODELS = {
    # name: (GPTConfig kwargs, micro-batch)
    "gpt2-124m": (dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024), 16),
    "gpt2-350m": (dict(n_layer=24, n_head=16, n_embd=1024, vocab_size=50304, block_size=1024), 8),
    "cpu-tiny": (dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512, block_size=64), 4),
}
PROVIDERS = ("gptkernels", "eager", "compile", "gptkernels-compile")
DEFAULT_PROVIDERS = ("gptkernels", "eager", "compile")


# ---- the plain PyTorch baseline (nanoGPT-style) -----------------------------------------------

class _Attn(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.H = H
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class _MLP(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.fc = nn.Linear(C, 4 * C)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * C, C)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class _Block(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.ln_1 = nn.LayerNorm(C)
        self.attn = _Attn(C, H)
        self.ln_2 = nn.LayerNorm(C)
        self.mlp = _MLP(C)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """GPT-2 in plain PyTorch; parameter names match gptkernels.GPT (mlp.fc / mlp.proj)."""

    def __init__(self, n_layer, n_head, n_embd, vocab_size, block_size):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([_Block(n_embd, n_head) for _ in range(n_layer)]), ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# ---- running ------------------------------------------------------------------------------------

def _make_dataset(tmp: str, n_tokens: int, vocab: int, seed: int = 0) -> str:
    """A one-shard dataset of random tokens, so every step goes through the real loader."""
    import json

    from gptkernels.gpt import data
    rng = np.random.default_rng(seed)
    shard = data.write_shard(os.path.join(tmp, "train_000000.bin"), rng.integers(0, vocab, n_tokens), vocab)
    meta = {"format": data.META_FORMAT, "version": 1, "vocab_size": vocab, "eos_id": 0, "tokenizer": "tokenizer.json",
            "splits": {"train": [shard], "val": []}, "tokens": {"train": n_tokens, "val": 0}}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    return tmp


def run_provider(provider: str, model_name: str, init_state: dict, flops_per_token: float, data_dir: str,
                 device: torch.device, steps: int, warmup: int, compile_backend: str, log=print) -> dict:
    import gptkernels
    from gptkernels.gpt import data
    from gptkernels import GPT, GPTConfig
    from gptkernels.gpt.device import peak_flops

    mkw, B = MODELS[model_name]
    T = mkw["block_size"]
    cuda = device.type == "cuda"
    row = {"op": "e2e_train", "case": f"{model_name} B{B} T{T}", "provider": provider, "mode": "fwd+bwd", "what": "training step: loader + H2D + fwd + bwd + AdamW",
           "model": model_name, "batch": B, "seq": T, "dtype": "bfloat16" if cuda else "float32"}
    harness.reset_memory(device)
    torch._dynamo.reset()
    caught = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if provider.startswith("gptkernels"):
            model = GPT(GPTConfig(**mkw))
        else:
            model = NanoGPT(**mkw)
        model.load_state_dict(init_state)
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                **({"fused": True} if cuda else {}))
        fwd = model
        if provider in ("compile", "gptkernels-compile"):
            fwd = torch.compile(model, backend=compile_backend)
        loader = data.TokenBatches(data.TokenSplit(data_dir, "train", T, verify=False), B, seed=0)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

        def step():
            x, y = loader.next_batch()
            if cuda:
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            with amp:
                _, loss = fwd(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        t0 = time.perf_counter()
        losses = [step() for _ in range(warmup)]
        if cuda:
            torch.cuda.synchronize()
        row["warmup_s"] = time.perf_counter() - t0
        times = []
        if cuda:
            ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
            for s, e in ev:
                s.record()
                losses.append(step())
                e.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) for s, e in ev]
        else:
            for _ in range(steps):
                t = time.perf_counter()
                losses.append(step())
                times.append((time.perf_counter() - t) * 1e3)
    row["ms"] = statistics.median(times)
    row["ms_mean"] = sum(times) / len(times)
    row["steps"] = steps
    row["tokens_per_s"] = B * T / (row["ms"] * 1e-3)
    row["tflops"] = row["tokens_per_s"] * flops_per_token / 1e12
    peak = peak_flops(device)
    if peak:
        row["mfu"] = row["tokens_per_s"] * flops_per_token / peak
    harness.record_peak_memory(device, row)
    ls = torch.stack(losses).float().cpu().tolist()
    row["loss_first"], row["loss_last"] = ls[0], ls[-1]
    if not all(math.isfinite(v) for v in ls):
        row["error"] = "non-finite loss"
    if provider.startswith("gptkernels"):
        row["gptkernels_backend"] = gptkernels.get_backend()
        row["kernels_available"] = gptkernels.kernels_available()
        fb = sorted({str(w.message) for w in caught if "PyTorch fallback" in str(w.message)})
        if fb:
            row["fallbacks"] = fb
    del fwd, model, opt
    log(f"  {row['case']:<22} {provider:<20} {row['ms']:8.2f} ms/step {row['tokens_per_s']:>12,.0f} tok/s"
        + (f"  MFU {100 * row['mfu']:5.1f}%" if "mfu" in row else "")
        + (f"  peak {row['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in row else "")
        + f"  loss {row['loss_first']:.3f}->{row['loss_last']:.3f}  (warm-up {row['warmup_s']:.1f} s)")
    return row


def add_ratios(rows):
    for case in {r["case"] for r in rows}:
        rs = {r["provider"]: r for r in rows if r["case"] == case and "ms" in r}
        for base in ("eager", "compile"):
            if base in rs:
                for r in rs.values():
                    r[f"speedup_vs_{base}"] = rs[base]["ms"] / r["ms"]
                    if "peak_mem_gib" in r and "peak_mem_gib" in rs[base]:
                        r[f"mem_ratio_vs_{base}"] = r["peak_mem_gib"] / rs[base]["peak_mem_gib"]
        if len({round(r["loss_first"], 1) for r in rs.values()}) > 1:
            for r in rs.values():
                r["warning"] = "first losses differ between providers: " + ", ".join(
                    f"{p}={x['loss_first']:.3f}" for p, x in rs.items())


def main(argv=None) -> int:
    ap = harness.standalone_parser("benchmarks.e2e_train", __doc__, "fewer timed steps")
    ap.add_argument("--models", default=None, help=f"comma list of {list(MODELS)} (default: the two GPT-2 sizes on "
                                                   "a GPU, cpu-tiny otherwise)")
    ap.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS), help=f"comma list of {list(PROVIDERS)}")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30, --quick 10; CPU 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, --quick 3; CPU 1)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager for CPU tests)")
    ap.add_argument("--stem", default=None, help="output file stem (default e2e-train-<gpu>-<date>)")
    args = ap.parse_args(argv)

    from gptkernels import GPT, GPTConfig
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    models = harness.comma_list(ap, "--models", "model", args.models or ("gpt2-124m,gpt2-350m" if cuda else "cpu-tiny"),
                                MODELS)
    providers = harness.comma_list(ap, "--providers", "provider", args.providers, PROVIDERS)
    steps = args.steps or (3 if not cuda else 10 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if not cuda else 3 if args.quick else 5)
    if not cuda:
        print("note: no CUDA device: a CPU smoke test of the benchmark (float32, tiny model); not a measurement")
    env = harness.env_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            mkw, B = MODELS[m]
            torch.manual_seed(0)
            ref = GPT(GPTConfig(**mkw))
            init_state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
            fpt = ref.flops_per_token(mkw["block_size"])
            del ref
            d = os.path.join(tmp, m)
            os.makedirs(d)
            _make_dataset(d, max(2 * B * (mkw["block_size"] + 1) * (steps + warmup), 100_000), mkw["vocab_size"])
            print(f"== {m}: {mkw}, batch {B}, {steps} timed steps after {warmup} warm-up")
            for p in providers:
                try:
                    rows.append(run_provider(p, m, init_state, fpt, d, device, steps, warmup, args.compile_backend))
                except Exception as e:  # e.g. out of memory, a compile failure: record it, go on
                    rows.append({"op": "e2e_train", "case": f"{m} B{B} T{mkw['block_size']}", "provider": p,
                                 "mode": "fwd+bwd", "what": "training step: loader + H2D + fwd + bwd + AdamW", "error": f"{type(e).__name__}: {str(e)[:300]}"})
                    print(f"  {m:<22} {p:<20} ERROR {type(e).__name__}: {str(e)[:200]}")
                gc.collect()
    add_ratios(rows)
    print("\nsummary:")
    for r in rows:
        if "ms" in r:
            extra = "  ".join(f"{k[len('speedup_'):]} {v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs_"))
            print(f"  {r['case']:<22} {r['provider']:<20} {r['tokens_per_s']:>12,.0f} tok/s  {extra}"
                  + (f"  peak {r['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in r else ""))
        if "warning" in r:
            print(f"  warning: {r['warning']}")
    stem = args.stem or harness.output_stem("e2e-train", env)
    paths = harness.write_results(rows, args.out, stem, env)
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
