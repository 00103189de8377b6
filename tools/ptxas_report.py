#!/usr/bin/env python3
"""Compile each kernel file with `-Xptxas -v` and print registers, spills and shared memory per
kernel and architecture. No GPU and no torch needed: run it before spending device time.

  python tools/ptxas_report.py                       # every csrc/**/*.cu, archs 80;90a
  python tools/ptxas_report.py --archs 90a csrc/attention/*.cu
Files under a folder named sm90/ are compiled for 90a only (skipped when 90a is not in --archs), the
rest for every arch: the per-arch source sets of setup.py and CMakeLists.txt.
Exit status 1 when any kernel spills (so a script can gate on it).
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def compile_one(nvcc, src, arch, defines=()):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{os.path.join(ROOT, 'csrc')}",
               *defines,
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-c", src, "-o",
               os.path.join(tmp, "k.o")]
        p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return src, arch, None, p.stderr
    rows, name = [], None
    for line in p.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            name = m.group(1)
            rows.append({"kernel": name, "regs": 0, "spill_st": 0, "spill_ld": 0, "smem": 0, "stack": 0})
            continue
        if not rows:
            continue
        r = rows[-1]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            r["stack"], r["spill_st"], r["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            r["regs"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            r["smem"] = int(m.group(1))
    return src, arch, rows, None


def archs_for(src, archs):
    """The archs a source compiles for (setup.py's arch_sets): sm90/ files for 90a only."""
    if "sm90" in os.path.normpath(src).split(os.sep)[:-1]:
        return ["90a"] if "90a" in archs else []
    return archs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="*")
    ap.add_argument("--archs", default="80;90a")
    ap.add_argument("--nvcc", default="nvcc")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    sources = args.sources or sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    archs = [a for a in re.split(r"[;, ]+", args.archs) if a]
    defines = ["-DGPTK_HAVE_SM90=1"] if "90a" in archs else []  # as setup.py
    jobs = [(s, a) for s in sources for a in archs_for(s, archs)]
    with ThreadPoolExecutor(args.jobs) as ex:
        results = list(ex.map(lambda sa: compile_one(args.nvcc, *sa, defines), jobs))
    failed, spills = False, False
    print(f"{'file':<34} {'arch':<5} {'regs':>4} {'spill':>9} {'smem':>6} {'stack':>5}  kernel")
    for src, arch, rows, err in results:
        rel = os.path.relpath(src, os.path.join(ROOT, "csrc"))
        if rows is None:
            failed = True
            print(f"{rel:<34} {arch:<5} COMPILE ERROR\n{err}")
            continue
        names = demangle([r["kernel"] for r in rows])
        for r, n in zip(rows, names):
            sp = r["spill_st"] + r["spill_ld"]
            spills |= sp > 0
            n = n if len(n) < 110 else n[:107] + "..."
            print(f"{rel:<34} {arch:<5} {r['regs']:>4} {str(r['spill_st']) + '/' + str(r['spill_ld']):>9} "
                  f"{r['smem']:>6} {r['stack']:>5}  {n}{'   <-- SPILLS' if sp else ''}")
    if failed:
        return 2
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
