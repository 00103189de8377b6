"""Generation throughput: `python -m benchmarks.bench_generate [--out DIR] [--quick] [--providers a,b]`.

Greedy generation of GPT-2 124M (random weights), prompt 128 tokens, 256 new tokens, at batch 1
and 32, in one process, the same weights and prompts for every provider:

  gptkernels-graph   GPT.generate(cuda_graph=True): the per-token step replayed as a CUDA graph
  gptkernels-eager   GPT.generate(cuda_graph=False): the same step launched from Python
  hf                 transformers GPT2LMHeadModel(attn_implementation="sdpa").generate (its default
                     dynamic KV cache), EOS off so that every call makes all the tokens
  compile            a static-KV decode loop in plain PyTorch (`StaticGPT` below: KV cache buffers
                     written with index_copy_, SDPA over the whole cache with a mask, as gpt-fast),
                     its one-token step under torch.compile(mode="reduce-overhead") (CUDA graphs);
                     the prefill runs eagerly

Timed: whole generate calls (prefill + 256 tokens), wall clock with the device synchronised, median
of --reps calls after one warm-up call (which captures / compiles: reported as warmup_s; hf warms
up with 8 tokens). tokens/s = batch x new tokens / call time. Also per row: ms per token, peak
memory, the fraction of new tokens equal to gptkernels-eager's (bf16 implementations round
differently, so only gptkernels-graph must give 1.0), speedups against the others.
JSON + CSV + PNG (tokens/s per provider) through benchmarks.harness.write_results.

Targets (issue 13, H200): gptkernels-graph at batch 1 >= 3000 tokens/s, at batch 32 >= 60k.
Anchors measured on an H200 with torch 2.11 (shared/GPU.md), a plain-PyTorch static-KV loop: eager
318 tokens/s at batch 1, 8.7K at 32; torch.compile reduce-overhead 1553 and 40.9K; HF generate
about 20 and 660.

Without a GPU it runs a tiny model in float32 as a smoke test of this file (numbers meaningless;
gptkernels-graph then runs the graph path's step without capturing it).
"""
from __future__ import annotations

import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import harness

MODELS = {
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024),
    "cpu-tiny": dict(n_layer=2, n_head=2, n_embd=64, vocab_size=512, block_size=64),
}
PROVIDERS = ("gptkernels-graph", "gptkernels-eager", "hf", "compile")
TARGETS = {("gpt2-124m", 1): 3000.0, ("gpt2-124m", 32): 60000.0}  # gptkernels-graph, tokens/s on an H200


# ---- the static-KV baseline in plain PyTorch ----------------------------------------------------

class _Attn(nn.Module):
    def __init__(self, C, H, batch, capacity):
        super().__init__()
        self.H, self.D = H, C // H
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.register_buffer("k_cache", torch.zeros(batch, H, capacity, self.D), persistent=False)
        self.register_buffer("v_cache", torch.zeros(batch, H, capacity, self.D), persistent=False)

    def forward(self, x, pos, mask):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.H, self.D).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask[None, None])
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class _MLP(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.fc = nn.Linear(C, 4 * C)
        self.proj = nn.Linear(4 * C, C)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class _Block(nn.Module):
    def __init__(self, C, H, batch, capacity):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = _Attn(C, H, batch, capacity)
        self.mlp = _MLP(C)

    def forward(self, x, pos, mask):
        x = x + self.attn(self.ln_1(x), pos, mask)
        return x + self.mlp(self.ln_2(x))


class StaticGPT(nn.Module):
    """GPT-2 with a static KV cache (batch, heads, capacity, head_dim) per layer; parameter names
    match gptkernels.GPT's, so its state_dict loads. forward(idx (B, T), pos (T,)) -> logits (B, T, V)
    of tokens at positions pos, attending to the cache's positions <= their own."""

    def __init__(self, n_layer, n_head, n_embd, vocab_size, block_size, batch, capacity):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([_Block(n_embd, n_head, batch, capacity) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.register_buffer("causal", torch.ones(capacity, capacity, dtype=torch.bool).tril(), persistent=False)

    def forward(self, idx, pos):
        mask = self.causal[pos]
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x, pos, mask)
        return self.lm_head(self.transformer.ln_f(x))


def _decode_one(model, tok, pos):
    return model(tok, pos)[:, -1].argmax(-1, keepdim=True)


# ---- providers: each returns run() -> (B, new_tokens) generated ids -------------------------------

def _gptkernels(state, mkw, device, dtype, graph: bool, new: int):
    from gptkernels import GPT, GPTConfig
    from gptkernels.gpt.generate import generate
    model = GPT(GPTConfig(**mkw))
    model.load_state_dict(state)
    model = model.to(device=device, dtype=dtype).eval()
    capture = device.type == "cuda"  # on the CPU: the graph path's step, run without capture
    return lambda idx: generate(model, idx, new, temperature=0, cuda_graph=graph, capture=capture)[:, idx.shape[1]:]


def _hf(hf_model, device, dtype, new: int):
    model = hf_model.to(device=device, dtype=dtype).eval()

    def run(idx, n=new):
        with torch.no_grad():
            out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False)
        assert out.shape[1] == idx.shape[1] + n, out.shape
        return out[:, idx.shape[1]:]
    return run


def _compile(state, mkw, device, dtype, batch: int, prompt: int, new: int, backend: str):
    model = StaticGPT(**mkw, batch=batch, capacity=prompt + new)
    model.load_state_dict(state)
    model = model.to(device=device, dtype=dtype).eval()
    torch._dynamo.reset()
    kw = dict(mode="reduce-overhead") if backend == "inductor" else dict(backend=backend)
    step = torch.compile(_decode_one, fullgraph=True, dynamic=False, **kw)

    @torch.no_grad()
    def run(idx):
        tok = model(idx, torch.arange(prompt, device=device))[:, -1].argmax(-1, keepdim=True)  # eager prefill
        out = [tok]
        pos = torch.tensor([prompt], device=device)
        for _ in range(new - 1):
            tok = step(model, tok, pos).clone()  # (a CUDA-graph output is overwritten by the next replay)
            out.append(tok)
            pos += 1
        return torch.cat(out, dim=1)
    return run


def run_case(model_name, batch, prompt, new, providers, device, reps, compile_backend, log=print) -> list[dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptkernels import GPT, GPTConfig
    from gptkernels.gpt.hf_gpt2 import to_gpt_state_dict
    mkw = MODELS[model_name]
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)  # the weights: an HF GPT-2's random init, converted for the others
    hf_model = GPT2LMHeadModel(GPT2Config(vocab_size=mkw["vocab_size"], n_positions=mkw["block_size"],
                                          n_embd=mkw["n_embd"], n_layer=mkw["n_layer"], n_head=mkw["n_head"],
                                          attn_implementation="sdpa", eos_token_id=None, bos_token_id=None,
                                          pad_token_id=0))
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    state = to_gpt_state_dict(hf_model.state_dict(), GPT(GPTConfig(**mkw)).state_dict(), True, "bench")
    idx = torch.randint(0, mkw["vocab_size"], (batch, prompt), generator=torch.Generator().manual_seed(1)).to(device)
    case = f"{model_name} B{batch} prompt{prompt} new{new}"
    rows, outs = [], {}
    for p in providers:
        row = {"op": "generate", "case": case, "provider": p, "mode": "decode", "model": model_name, "batch": batch,
               "prompt": prompt, "new_tokens": new, "dtype": str(dtype).replace("torch.", ""),
               "what": "greedy generation: prefill + new tokens, whole calls"}
        harness.reset_memory(device)
        try:
            if p.startswith("gptkernels"):
                run = _gptkernels(state, mkw, device, dtype, p == "gptkernels-graph", new)
            elif p == "hf":
                run = _hf(hf_model, device, dtype, new)
                row["attn_implementation"] = getattr(hf_model.config, "_attn_implementation", None)
            else:
                run = _compile(state, mkw, device, dtype, batch, prompt, new, compile_backend)
            warm, _ = harness.wall_clock(lambda: run(idx, 8) if p == "hf" else run(idx), 1, device)
            row["warmup_s"] = warm[0] * 1e-3
            times, results = harness.wall_clock(lambda: run(idx), reps, device)
            outs[p] = results[-1].cpu()
            row["ms"] = statistics.median(times)
            row["reps"] = reps
            row["ms_per_token"] = row["ms"] / new
            row["tokens_per_s"] = batch * new / (row["ms"] * 1e-3)
            harness.record_peak_memory(device, row)
            target = TARGETS.get((model_name, batch)) if p == "gptkernels-graph" else None
            if target:
                row["target_tokens_per_s"] = target
                row["target_met"] = bool(cuda and row["tokens_per_s"] >= target)
            log(f"  {case:<34} {p:<18} {row['ms']:10.1f} ms/call {row['ms_per_token']:8.3f} ms/token "
                f"{row['tokens_per_s']:>10,.0f} tok/s  (warm-up {row['warmup_s']:.1f} s)")
        except Exception as e:  # e.g. out of memory, a compile failure: record it, go on
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  {case:<34} {p:<18} ERROR {row['error'][:200]}")
        rows.append(row)
        run = None
    if "gptkernels-eager" in outs:
        ref = outs["gptkernels-eager"]
        for r in rows:
            if r["provider"] in outs:
                r["match_vs_gptkernels_eager"] = (outs[r["provider"]] == ref).float().mean().item()
    timed = {r["provider"]: r for r in rows if "ms" in r}
    for base in ("compile", "hf", "gptkernels-eager"):
        if base in timed:
            for r in timed.values():
                r[f"speedup_vs_{base}"] = timed[base]["ms"] / r["ms"]
    return rows


def main(argv=None) -> int:
    ap = harness.standalone_parser("benchmarks.bench_generate", __doc__, "one timed call per provider (default 3)")
    ap.add_argument("--models", default=None, help=f"comma list of {list(MODELS)} (default gpt2-124m on a GPU, "
                                                   "cpu-tiny otherwise)")
    ap.add_argument("--batches", default=None, help="comma list of batch sizes (default 1,32; CPU 1,3)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; CPU 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 256; CPU 8)")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {list(PROVIDERS)}")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per provider (default 3, --quick 1)")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (default inductor with mode='reduce-overhead' on a GPU, aot_eager "
                         "on the CPU)")
    ap.add_argument("--stem", default=None, help="output file stem (default generate-<gpu>-<date>)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    models = harness.comma_list(ap, "--models", "model", args.models or ("gpt2-124m" if cuda else "cpu-tiny"), MODELS)
    providers = harness.comma_list(ap, "--providers", "provider", args.providers, PROVIDERS)
    try:
        batches = [int(b) for b in (args.batches or ("1,32" if cuda else "1,3")).split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batches: expected a comma list of positive integers, got {args.batches!r}")
    prompt = args.prompt or (128 if cuda else 8)
    new = args.new_tokens or (256 if cuda else 8)
    reps = args.reps or (1 if args.quick else 3)
    if min(batches, default=0) < 1 or prompt < 1 or new < 1 or reps < 1:
        ap.error("--batches, --prompt, --new-tokens and --reps must be positive")
    for m in models:
        if prompt + new > MODELS[m]["block_size"]:
            ap.error(f"--prompt + --new-tokens = {prompt + new} exceeds {m}'s block_size {MODELS[m]['block_size']}")
    if not cuda:
        print("note: no CUDA device: a CPU smoke test of the benchmark (float32, tiny model); not a measurement")
    env = harness.env_info()
    rows = []
    for m in models:
        print(f"== {m}: {MODELS[m]}, prompt {prompt}, {new} new tokens, greedy, {reps} timed call(s)")
        for b in batches:
            rows += run_case(m, b, prompt, new, providers, device, reps,
                             args.compile_backend or ("inductor" if cuda else "aot_eager"))
    print("\nsummary (tokens/s):")
    for r in rows:
        if "tokens_per_s" in r:
            extra = "  ".join(f"{k[len('speedup_vs_'):]} {v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs_"))
            tgt = (f"  target {r['target_tokens_per_s']:,.0f}: {'met' if r['target_met'] else 'NOT met'}"
                   if "target_tokens_per_s" in r and cuda else "")
            print(f"  {r['case']:<34} {r['provider']:<18} {r['tokens_per_s']:>10,.0f}  {extra}{tgt}")
    stem = args.stem or harness.output_stem("generate", env)
    paths = harness.write_results(rows, args.out, stem, env)
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
