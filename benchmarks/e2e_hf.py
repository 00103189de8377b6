"""Hugging Face models with and without gptkernels: `python -m benchmarks.e2e_hf [--out DIR] [--quick]`.

For each model (random weights, same seed for every provider), in one process:

  eager        transformers, attn_implementation="eager"
  sdpa         transformers, attn_implementation="sdpa" (its default)
  gptkernels   the sdpa model after gptkernels.hf.patch(model): LayerNorm, GELU MLP, attention and the
               fused LM-head loss (Llama keeps its RMSNorm and SwiGLU MLP)

two phases:
  train      one optimizer step: forward with labels under bf16 autocast (fp32 weights) -> backward
             -> fused AdamW; median over the timed steps; tokens/s = B*T / step time
  generate   greedy `generate` of N new tokens after a P-token prompt, bf16 weights, dynamic cache;
             tokens/s = B*N / time of the whole call (prefill included)

Models: GPT-2 124M (12 x 12 x 768, vocab 50257) and a 125M Llama-shaped model (12 layers, 768 wide,
12 query / 4 key-value heads, SwiGLU 2048, vocab 32000), both at T=1024 for training.
Reported: time, tokens/s, peak memory (torch.cuda.max_memory_allocated, reset per row), the first
loss (the same weights and batches: it must agree across providers), speedups against eager and sdpa,
and what the patch swapped. JSON + CSV (benchmarks.harness.write_results) and one PNG with tokens/s
and peak memory side by side.

Without a GPU it runs tiny models in float32 as a smoke test of this file (the numbers mean nothing).
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import warnings

import torch

from benchmarks import harness

# name: (config class, config kwargs, train (B, T), generate (B, prompt, new tokens))
MODELS = {
    "gpt2-124m": ("GPT2Config", dict(), (8, 1024), (8, 128, 128)),
    "llama-125m": ("LlamaConfig", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                       num_attention_heads=12, num_key_value_heads=4, vocab_size=32000,
                                       max_position_embeddings=2048), (8, 1024), (8, 128, 128)),
    "gpt2-tiny": ("GPT2Config", dict(n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=128),
                  (2, 64), (2, 8, 8)),
    "llama-tiny": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                       max_position_embeddings=128), (2, 64), (2, 8, 8)),
}
PROVIDERS = ("eager", "sdpa", "gptkernels")
PHASES = ("train", "generate")


def build(model_name: str, provider: str, device, dtype=torch.float32):
    """The model with seed-0 random weights; returns (model, patch summary or None)."""
    import transformers
    cls, kw, _, _ = MODELS[model_name]
    config = getattr(transformers, cls)(**kw)
    for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):  # deterministic steps
        if hasattr(config, k):
            setattr(config, k, 0.0)
    torch.manual_seed(0)
    attn = "eager" if provider == "eager" else "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model.to(device=device, dtype=dtype)
    summary = None
    if provider == "gptkernels":
        import gptkernels.hf
        gptkernels.hf.patch(model)
        summary = model.gptkernels_patched.summary()
    return model, summary


def bench_train(model_name, provider, device, steps, warmup) -> dict:
    _, _, (B, T), _ = MODELS[model_name]
    cuda = device.type == "cuda"
    row = {"op": "e2e_hf", "phase": "train", "model": model_name, "provider": provider, "batch": B, "seq": T,
           "dtype": "bf16 autocast" if cuda else "float32", "what": "fwd (labels) + bwd + AdamW"}
    harness.reset_memory(device)
    model, row["patched"] = build(model_name, provider, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (B, T), generator=g) for _ in range(warmup + steps)]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step(x):
        x = x.to(device)
        with amp:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    it = iter(batches)
    times, losses = harness.wall_clock(lambda: step(next(it)), steps, device, warmup)
    row["time_ms"] = statistics.median(times)
    row["tokens_per_s"] = B * T / (row["time_ms"] * 1e-3)
    row["loss_first"] = float(losses[0])
    row["steps"] = steps
    if not all(math.isfinite(float(v)) for v in losses):
        row["error"] = "non-finite loss"
    harness.record_peak_memory(device, row)
    del model, opt
    return row


def bench_generate(model_name, provider, device, reps, warmup) -> dict:
    _, _, _, (B, P, N) = MODELS[model_name]
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    row = {"op": "e2e_hf", "phase": "generate", "model": model_name, "provider": provider, "batch": B,
           "prompt": P, "new_tokens": N, "dtype": str(dtype).replace("torch.", ""), "what": "greedy generate"}
    harness.reset_memory(device)
    model, row["patched"] = build(model_name, provider, device, dtype)
    model.eval()
    x = torch.randint(0, model.config.vocab_size, (B, P), generator=torch.Generator().manual_seed(1)).to(device)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=N, min_new_tokens=N, do_sample=False,
              pad_token_id=0)
    with torch.no_grad():
        times, outs = harness.wall_clock(lambda: model.generate(x, **kw), reps, device, warmup)
    out = outs[-1]
    row["time_ms"] = statistics.median(times)
    row["tokens_per_s"] = B * N / (row["time_ms"] * 1e-3)
    row["tokens_head"] = out[0, P:P + 8].tolist()  # the first new tokens of row 0, to compare providers
    harness.record_peak_memory(device, row)
    del model
    return row


def add_ratios(rows):
    for model in {r["model"] for r in rows}:
        for phase in PHASES:
            rs = {r["provider"]: r for r in rows if r["model"] == model and r["phase"] == phase and "time_ms" in r}
            for base in ("eager", "sdpa"):
                if base in rs:
                    for r in rs.values():
                        r[f"speedup_vs_{base}"] = rs[base]["time_ms"] / r["time_ms"]
                        if "peak_mem_gib" in r and "peak_mem_gib" in rs[base]:
                            r[f"mem_ratio_vs_{base}"] = r["peak_mem_gib"] / rs[base]["peak_mem_gib"]
            firsts = {p: r["loss_first"] for p, r in rs.items() if "loss_first" in r}
            if firsts and max(firsts.values()) - min(firsts.values()) > 1e-2 * max(1.0, abs(min(firsts.values()))):
                for r in rs.values():
                    r["warning"] = "first losses differ between providers: " + ", ".join(
                        f"{p}={v:.4f}" for p, v in firsts.items())


def plot(rows, path, env) -> bool:
    """Tokens/s and peak memory side by side: one row of panels per phase, models on x, bars per provider."""
    rows = [r for r in rows if "time_ms" in r]
    if not rows:
        return False
    plt = harness.pyplot()
    phases = [p for p in PHASES if any(r["phase"] == p for r in rows)]
    models = list(dict.fromkeys(r["model"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    metrics = [("tokens_per_s", "tokens/s")] + ([("peak_mem_gib", "peak memory (GiB)")]
                                               if any("peak_mem_gib" in r for r in rows) else [])
    fig, axes = plt.subplots(len(phases), len(metrics), figsize=(5.5 * len(metrics), 3.4 * len(phases)),
                             squeeze=False)
    width = 0.8 / len(provs)
    for i, phase in enumerate(phases):
        for j, (key, label) in enumerate(metrics):
            ax = axes[i, j]
            for k, p in enumerate(provs):
                vals = [next((r.get(key, 0) for r in rows if r["phase"] == phase and r["model"] == m
                              and r["provider"] == p), 0) for m in models]
                bars = ax.bar([x + k * width for x in range(len(models))], vals, width, label=p)
                for b, v in zip(bars, vals):
                    if v:
                        ax.annotate(f"{v:,.0f}" if key == "tokens_per_s" else f"{v:.1f}",
                                    (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
            ax.set_xticks([x + width * (len(provs) - 1) / 2 for x in range(len(models))])
            ax.set_xticklabels(models, fontsize=8)
            ax.set_ylabel(label)
            ax.set_title(f"{phase}: {label} ({env.get('gpu') or 'cpu'})", fontsize=9)
            ax.legend(fontsize=7)
    harness.save_figure(fig, path)
    return True


def main(argv=None) -> int:
    ap = harness.standalone_parser("benchmarks.e2e_hf", __doc__, "fewer timed steps")
    ap.add_argument("--models", default=None, help=f"comma list of {list(MODELS)} (default: gpt2-124m,llama-125m "
                                                   "on a GPU, the tiny ones otherwise)")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {list(PROVIDERS)}")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {list(PHASES)}")
    ap.add_argument("--steps", type=int, default=None, help="timed steps / generate calls (default 10, --quick 4; "
                                                             "CPU 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed ones first (default 3, --quick 2; CPU 1)")
    ap.add_argument("--stem", default=None, help="output file stem (default e2e-hf-<gpu>-<date>)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    models = harness.comma_list(ap, "--models", "model",
                                args.models or ("gpt2-124m,llama-125m" if cuda else "gpt2-tiny,llama-tiny"), MODELS)
    providers = harness.comma_list(ap, "--providers", "provider", args.providers, PROVIDERS)
    phases = harness.comma_list(ap, "--phases", "phase", args.phases, PHASES)
    steps = args.steps or (2 if not cuda else 4 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if not cuda else 2 if args.quick else 3)
    if not cuda:
        print("note: no CUDA device: a CPU smoke test of the benchmark (float32, tiny models); not a measurement")
    env = harness.env_info()
    rows = []
    for m in models:
        for phase in phases:
            for p in providers:
                try:
                    with warnings.catch_warnings(record=True) as caught:
                        warnings.simplefilter("always")
                        fn = bench_train if phase == "train" else bench_generate
                        row = fn(m, p, device, steps, warmup)
                    fb = sorted({str(w.message) for w in caught if "reference path" in str(w.message)})
                    if fb:
                        row["fallbacks"] = fb
                except Exception as e:  # out of memory, a model that does not build: record it, go on
                    row = {"op": "e2e_hf", "phase": phase, "model": m, "provider": p,
                           "error": f"{type(e).__name__}: {str(e)[:300]}"}
                rows.append(row)
                print(f"  {m:<12} {phase:<9} {p:<11} " + (
                    f"{row['time_ms']:9.1f} ms {row['tokens_per_s']:>12,.0f} tok/s"
                    + (f"  peak {row['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in row else "")
                    + (f"  loss {row['loss_first']:.4f}" if "loss_first" in row else "")
                    if "time_ms" in row else f"ERROR {row['error']}"))
    add_ratios(rows)
    for r in rows:
        if "warning" in r:
            print(f"  warning ({r['model']} {r['phase']} {r['provider']}): {r['warning']}")
    stem = args.stem or harness.output_stem("e2e-hf", env)
    paths = harness.write_results(rows, args.out, stem, env)
    png = os.path.join(args.out, stem + ".png")
    if plot(rows, png, env):
        paths["png"] = png
    print("wrote " + ", ".join(paths.values()))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
