"""`gptkernels bench [--quick] [--ops a,b] [--out DIR] [--e2e] [-- more benchmark flags]`.

Runs the per-op benchmarks (benchmarks/run.py) or, with --e2e, the training benchmark
(benchmarks/e2e_train.py). The benchmarks/ package is found next to the gptkernels package (a
source checkout or an editable install) or installed beside it (a wheel). Results go to --out,
by default <cache>/bench (GPTKERNELS_CACHE, else ~/.cache/gptkernels), never into the package's
own tracked files; tools/device_check.sh, which records results for the repository, names its
folder itself.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from gptkernels.gpt.cli_args import Help, text
from gptkernels.gpt.errors import FileAccessError, UsageError


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run the kernel benchmarks (--e2e: the training benchmark)", formatter_class=Help,
                       description="Benchmarks of gptkernels against PyTorch (benchmarks/run.py; --e2e: "
                                   "benchmarks/e2e_train.py). On a machine without a GPU the figures are CPU smoke "
                                   "figures of the harness, not measurements. More flags of the benchmark scripts "
                                   "go after `--` (e.g. `gptkernels bench --quick -- --rep 10`).")
    p.add_argument("--quick", action="store_true", help="the short grid (fewer timed steps with --e2e)")
    p.add_argument("--ops", type=text, default=None, help="comma list of ops to run (default: all)")
    p.add_argument("--out", default=None, help="folder for the JSON, CSV and PNG results "
                                                          "(default: <cache>/bench, e.g. ~/.cache/gptkernels/bench)")
    p.add_argument("--e2e", action="store_true", help="the end-to-end training benchmark instead of the per-op ones")
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(fn=cmd_bench)


def benchmarks_root() -> str:
    """The folder that holds the `benchmarks` package: beside the gptkernels package, else wherever
    it is installed. FileAccessError when neither has it."""
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates = [pkg_parent]
    spec = importlib.util.find_spec("benchmarks") if "benchmarks" not in sys.modules else None
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.dirname(p) for p in spec.submodule_search_locations]
    for root in candidates:
        d = os.path.join(root, "benchmarks")
        if all(os.path.isfile(os.path.join(d, f)) for f in ("__init__.py", "run.py", "harness.py")):
            return root
    raise FileAccessError(f"the benchmarks are not installed: no benchmarks/run.py beside the package "
                          f"({pkg_parent}); install gptkernels from its source (pip install .) or run "
                          f"`python -m benchmarks.run` in a checkout")


def cmd_bench(args) -> int:
    import torch

    from gptkernels.gpt import fs
    from gptkernels.gpt.data import cache_dir
    extra = [a for a in args.extra if a != "--"]
    if args.e2e and args.ops:
        raise UsageError("--ops chooses per-op benchmarks; the --e2e benchmark takes --models/--providers after `--`")
    bad = [a for a in extra if a in ("--out", "--quick", "--ops") or a.startswith(("--out=", "--ops="))]
    if bad:
        raise UsageError(f"{bad[0]}: give it before `--`, as an option of `gptkernels bench`")
    out = args.out or os.path.join(cache_dir(), "bench")
    fs.output_dir(out, "--out")
    root = benchmarks_root()
    if args.ops:
        avail = sorted(f[len("bench_"):-3] for f in os.listdir(os.path.join(root, "benchmarks"))
                       if f.startswith("bench_") and f.endswith(".py"))
        unknown = [o.strip() for o in args.ops.split(",") if o.strip() not in avail]
        if unknown:
            raise UsageError(f"--ops: unknown op {unknown[0]!r}; expected some of {', '.join(avail)}")
    if root not in sys.path:
        sys.path.insert(0, root)
    if not torch.cuda.is_available():
        print("note: no CUDA device: the figures are CPU smoke figures (wall clock of the reference paths), not "
              "GPU measurements", file=sys.stderr)
    mod = importlib.import_module("benchmarks.e2e_train" if args.e2e else "benchmarks.run")
    argv = ["--out", out] + (["--quick"] if args.quick else []) + (["--ops", args.ops] if args.ops else []) + extra
    print(f"results: {out}", file=sys.stderr)
    try:
        return mod.main(argv) or 0
    except SystemExit as e:  # the script's own argparse: its message is already printed
        return e.code if isinstance(e.code, int) else 2
