"""Run the benchmarks: `python -m benchmarks.run [--quick] [--ops layernorm,attention] [--modes fwd] [--out DIR]`.

Finds every benchmarks/bench_<op>.py, runs its cases(quick) through the shared harness, prints a
table and writes JSON, CSV and PNG charts (default benchmarks/results/, named by GPU and date).
A bench file without cases() (bench_generate.py) is standalone: it is named and skipped here.
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys

import torch

from benchmarks import harness

HERE = os.path.dirname(os.path.abspath(__file__))


def available_ops():
    return sorted(os.path.basename(p)[len("bench_"):-3] for p in glob.glob(os.path.join(HERE, "bench_*.py")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the short grid (what tools/device_check.sh runs)")
    ap.add_argument("--ops", default=",".join(available_ops()), help=f"comma list of {available_ops()}")
    ap.add_argument("--out", default=harness.RESULTS)
    ap.add_argument("--stem", default=None, help="output file stem (default bench-<gpu>-<date>)")
    ap.add_argument("--modes", default=None, help=f"comma list of {harness.MODES} to time (default: each case's own)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rep", type=int, default=30)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("note: no CUDA device; timings are CPU wall clock (a smoke test of the harness, not a benchmark)")
    env = harness.env_info()
    rows = []
    for op in [o.strip() for o in args.ops.split(",") if o.strip()]:
        if op not in available_ops():
            ap.error(f"--ops: unknown op {op!r}; expected some of {available_ops()}")
        mod = importlib.import_module(f"benchmarks.bench_{op}")
        if not hasattr(mod, "cases"):  # a standalone benchmark with its own command line
            print(f"== {op}: standalone, run `python -m benchmarks.bench_{op}`")
            continue
        print(f"== {op}")
        modes = None if args.modes is None else [m.strip() for m in args.modes.split(",") if m.strip()]
        if modes is not None and any(m not in harness.MODES for m in modes):
            ap.error(f"--modes: expected some of {harness.MODES}, got {args.modes!r}")
        for case in mod.cases(args.quick):
            if modes is not None:
                case.modes = tuple(m for m in case.modes if m in modes)
                if not case.modes:
                    continue
            rows += harness.run_case(case, warmup=args.warmup, rep=args.rep)
    stem = args.stem or harness.output_stem("bench", env)
    paths = harness.write_results(rows, args.out, stem, env)
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
