"""Shared benchmark harness: providers ("gptkernels" vs "torch" and other references) x modes
(fwd, bwd, fwd+bwd), median of CUDA-event timings after warm-up with the L2 flushed before every
repetition, derived TFLOP/s or GB/s, ratios against a baseline provider measured in the same run,
and JSON/CSV output plus a PNG chart per op.

A benchmark file (benchmarks/bench_<op>.py) defines `cases(quick: bool) -> list[Case]`.
Each provider is a factory: called once per case, it allocates inputs and returns
(forward_fn, grad_inputs); the harness builds the backward from it:
  fwd      time forward_fn()
  bwd      run forward_fn() once, then time torch.autograd.grad(out, grad_inputs, dout, retain_graph=True)
  fwd+bwd  time both together
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Case:
    op: str
    name: str
    params: dict
    providers: dict  # name -> factory() -> (forward_fn, grad_inputs)
    modes: tuple = ("fwd", "bwd")
    flops: Callable[[str], float] | None = None  # mode -> floating-point operations
    bytes: Callable[[str], float] | None = None  # mode -> bytes moved (say how they are counted in the op's file)
    tokens: int | None = None  # tokens processed per call (-> tokens_per_s; say which tokens count in the op's file)
    baseline: str = "torch"
    notes: dict = field(default_factory=dict)


# ---- timing ------------------------------------------------------------------------------

_flush_buf = None


def _flush_l2():
    """Overwrite 256 MB so the next kernel starts with a cold L2 (60 MB on an H200)."""
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    _flush_buf.zero_()


def time_ms(fn: Callable[[], object], warmup: int = 5, rep: int = 30, min_time_s: float = 0.05) -> dict:
    """Median / 20th / 80th percentile milliseconds of fn(). CUDA events per repetition on a GPU
    (L2 flushed before each); wall clock on the CPU (for smoke tests of the harness itself)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    # Enough repetitions to cover min_time_s, at least `rep`.
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(rep, min(1000, int(min_time_s / one)))
    times = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            _flush_l2()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"ms": statistics.median(times), "ms_p20": q(0.2), "ms_p80": q(0.8), "reps": n}


def _as_tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor) and o.requires_grad]


def mode_fn(mode: str, forward: Callable, grad_inputs: list) -> Callable[[], object]:
    if mode == "fwd":  # with grad-requiring inputs this records the autograd graph, as in training
        return forward
    outs = [o for o in _as_tensors(forward()) if o.requires_grad]
    douts = [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, grad_inputs, douts, retain_graph=True)

    def fb():
        o = [t for t in _as_tensors(forward()) if t.requires_grad]
        return torch.autograd.grad(o, grad_inputs, douts)
    return fb


# ---- running -----------------------------------------------------------------------------

def env_info() -> dict:
    try:
        commit = os.environ.get("GPTK_GIT_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=os.path.dirname(__file__)).stdout.strip())
    except OSError:
        commit, dirty = None, None
    d = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        d["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
        d["cudnn"] = torch.backends.cudnn.version()
    return d


def run_case(case: Case, warmup: int = 5, rep: int = 30, log=print) -> list[dict]:
    rows = []
    for prov, factory in case.providers.items():
        try:
            forward, grad_inputs = factory()
        except Exception as e:  # a reference that is not available here (e.g. a missing backend)
            rows.append({"op": case.op, "case": case.name, "provider": prov, "mode": None,
                         "error": f"{type(e).__name__}: {e}", **case.params})
            log(f"  {case.op:<14} {case.name:<34} {prov:<16} unavailable: {e}")
            continue
        for mode in case.modes:
            row = {"op": case.op, "case": case.name, "provider": prov, "mode": mode, **case.params}
            try:
                fn = mode_fn(mode, forward, grad_inputs)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                row.update(time_ms(fn, warmup=warmup, rep=rep))
                if torch.cuda.is_available():
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                if case.flops:
                    row["tflops"] = case.flops(mode) / (row["ms"] * 1e-3) / 1e12
                if case.bytes:
                    row["gbps"] = case.bytes(mode) / (row["ms"] * 1e-3) / 1e9
                if case.tokens:
                    row["tokens_per_s"] = case.tokens / (row["ms"] * 1e-3)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
        del forward, grad_inputs
    _add_ratios(rows, case.baseline)
    for r in rows:
        if r.get("mode"):
            log(format_row(r))
    return rows


def _add_ratios(rows, baseline):
    """speedup = baseline ms / provider ms, for each mode (>1: faster than the baseline)."""
    base = {r["mode"]: r["ms"] for r in rows if r["provider"] == baseline and "ms" in r}
    for r in rows:
        if "ms" in r and r["mode"] in base:
            r["speedup_vs_" + baseline] = base[r["mode"]] / r["ms"]


def format_row(r) -> str:
    if "error" in r:
        return f"  {r['op']:<14} {r['case']:<34} {r['provider']:<16} {r['mode'] or '':<8} ERROR {r['error'][:80]}"
    metric = (f"{r['tflops']:8.1f} TFLOP/s" if "tflops" in r else f"{r['gbps']:8.1f} GB/s" if "gbps" in r
              else f"{r['tokens_per_s']:10.3g} tok/s" if "tokens_per_s" in r else "")
    ratio = next((f"{v:6.2f}x {k[len('speedup_vs_'):]}" for k, v in r.items() if k.startswith("speedup_vs_")), "")
    return f"  {r['op']:<14} {r['case']:<34} {r['provider']:<16} {r['mode']:<8} {r['ms']:9.4f} ms {metric}  {ratio}"


def write_results(rows: list[dict], out_dir: str, stem: str, env: dict | None = None) -> dict:
    """Write <stem>.json (env + rows), <stem>.csv and one <stem>-<op>.png chart per op."""
    os.makedirs(out_dir, exist_ok=True)
    env = env or env_info()
    paths = {"json": os.path.join(out_dir, stem + ".json"), "csv": os.path.join(out_dir, stem + ".csv")}
    with open(paths["json"], "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    for op in sorted({r["op"] for r in rows}):
        p = os.path.join(out_dir, f"{stem}-{op}.png")
        if plot_op([r for r in rows if r["op"] == op], op, p, env):
            paths[f"png:{op}"] = p
    return paths


def plot_op(rows, op, path, env) -> bool:
    """Grouped bars: one panel per mode, cases on x, one bar per provider (TFLOP/s or GB/s)."""
    rows = [r for r in rows if "ms" in r]
    if not rows:
        return False
    plt = pyplot()
    metric = next(m for m in ("tflops", "gbps", "tokens_per_s", "ms") if m == "ms" or m in rows[0])
    label = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_s": "tokens/s", "ms": "ms"}[metric]
    present = list(dict.fromkeys(r["mode"] for r in rows))
    modes = [m for m in MODES if m in present] + [m for m in present if m not in MODES]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(6, 1.2 * len(cases) * max(1, len(provs)) / 2), 3.2 * len(modes)),
                             squeeze=False)
    width = 0.8 / max(1, len(provs))
    for ax, mode in zip(axes[:, 0], modes):
        for i, p in enumerate(provs):
            vals = []
            for c in cases:
                v = [r[metric] for r in rows if r["mode"] == mode and r["case"] == c and r["provider"] == p]
                vals.append(v[0] if v else 0)
            xs = [j + i * width for j in range(len(cases))]
            bars = ax.bar(xs, vals, width, label=p)
            for b, v in zip(bars, vals):
                if v:
                    ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
        ax.set_xticks([j + width * (len(provs) - 1) / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(label)
        if metric == "tokens_per_s":  # providers differ by orders of magnitude (generation)
            ax.set_yscale("log")
        ax.set_title(f"{op} {mode} ({env.get('gpu') or 'cpu'}, torch {env.get('torch')})", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


# ---- standalone benchmarks (e2e_train.py, e2e_hf.py, bench_generate.py) ----------------------------

def standalone_parser(module: str, doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The command line the standalone benchmarks share: --out and --quick (each adds its own options,
    --stem last; see output_stem)."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=RESULTS, help="folder for JSON/CSV/PNG")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap


def comma_list(ap: argparse.ArgumentParser, flag: str, what: str, value: str, valid) -> list[str]:
    """The items of a comma list option, each one of `valid`; ap.error (exit 2, a message naming the
    option) for an unknown one or an empty list."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    for x in items:
        if x not in valid:
            ap.error(f"{flag}: unknown {what} {x!r}; expected some of {list(valid)}")
    if not items:
        ap.error(f"{flag}: empty list; expected some of {list(valid)}")
    return items


def output_stem(prefix: str, env: dict) -> str:
    """<prefix>-<gpu>-<date>, e.g. e2e-train-h200-2025-01-31 (cpu without a GPU)."""
    gpu = (env["gpu"] or "cpu").replace(" ", "-").replace("NVIDIA-", "").lower()
    return f"{prefix}-{gpu}-{datetime.date.today().isoformat()}"


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device):
    """Free what the last row left behind and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def record_peak_memory(device: torch.device, row: dict):
    """row["peak_mem_gib"]: torch.cuda.max_memory_allocated since reset_memory (nothing on the CPU)."""
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def wall_clock(fn: Callable[[], object], reps: int, device: torch.device, warmup: int = 0) -> tuple[list, list]:
    """Call fn() warmup + reps times, the device synchronised before and after each call (whole
    generate calls / training steps, host work included). Returns (milliseconds of the last reps
    calls, results of all calls)."""
    times, results = [], []
    for i in range(warmup + reps):
        sync(device)
        t = time.perf_counter()
        results.append(fn())
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t) * 1e3)
    return times, results
