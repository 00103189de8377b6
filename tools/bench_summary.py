#!/usr/bin/env python3
"""Print the short table of a benchmark JSON: per op/case/mode, gptkernels' figure and its
ratio to each reference measured in the same run.  `python tools/bench_summary.py FILE.json`"""
import json
import sys


def main(path):
    d = json.load(open(path))
    rows = [r for r in d["rows"] if "ms" in r]
    env = d.get("env", {})
    print(f"{env.get('gpu')}  torch {env.get('torch')}  commit {str(env.get('git_commit'))[:10]}")
    keys = list(dict.fromkeys((r["op"], r["case"], r["mode"]) for r in rows))
    for op, case, mode in keys:
        group = {r["provider"]: r for r in rows if (r["op"], r["case"], r["mode"]) == (op, case, mode)}
        ours = group.get("gptkernels")
        if not ours:
            continue
        metric = "tflops" if "tflops" in ours else "gbps" if "gbps" in ours else None
        unit = {"tflops": "TFLOP/s", "gbps": "GB/s"}.get(metric, "")
        val = f"{ours[metric]:7.1f} {unit}" if metric else f"{ours['ms']:.3f} ms"
        refs = "  ".join(f"{p}={r['ms'] / ours['ms']:.2f}x" for p, r in group.items() if p != "gptkernels")
        print(f"{op:<16} {case:<30} {mode:<8} {val:<16} speedup vs {refs}")


if __name__ == "__main__":
    main(sys.argv[1])
