#!/usr/bin/env python3
"""Compile the sm_90a attention forward and backward and check their SASS: the Hopper instructions they
were written for are there, nothing goes to local memory, and how many registers each warpgroup role uses.

  python tools/sass_check.py                  # csrc/attention/sm90/flash_{fwd,bwd}_sm90_hdim*.cu
  python tools/sass_check.py --json out.json  # also write the table as JSON
  python tools/sass_check.py some.o           # an object file already compiled for sm_90a

Checks, per kernel whose name contains `--kernel` (default "sm90"):
- HGMMA (wgmma.mma_async), UTMALDG (TMA load), SYNCS (mbarrier), USETMAXREG (setmaxnreg) and, in
  the forward (which stores O by TMA), UTMASTG occur; no LDL/STL (local memory: spills or stack
  arrays). The backward writes dK / dV and the dQ atomics with ordinary stores / reductions.
- Registers per role: the highest register index reached from each USETMAXREG instruction by
  following the control flow (branches, fall-through) up to EXIT, compared with the count that
  setmaxnreg sets for that role. The entry count is ptxas' "Used N registers".
Needs nvcc (for .cu inputs) and cuobjdump: from PATH, $CUDA_HOME/bin, or the copy in the Triton
package that ships with PyTorch's CUDA wheels. Exit status 1 when a check fails. No GPU needed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("HGMMA", "UTMALDG", "SYNCS", "USETMAXREG")
REQUIRED_FWD = REQUIRED + ("UTMASTG",)  # kernels whose mangled name contains "fwd"


def required(name: str) -> tuple:
    return REQUIRED_FWD if "fwd" in name else REQUIRED


def find_tool(name: str) -> str | None:
    p = shutil.which(name)
    if p:
        return p
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and os.path.isfile(os.path.join(base, "bin", name)):
            return os.path.join(base, "bin", name)
    try:
        import triton  # noqa: PLC0415
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.isfile(p):
            return p
    except ImportError:
        pass
    return None


def compile_obj(src: str, out: str) -> str:
    nvcc = find_tool("nvcc")
    if nvcc is None:
        raise SystemExit("sass_check: nvcc not found")
    cmd = [nvcc, "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{os.path.join(ROOT, 'csrc')}",
           "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-c", src, "-o", out]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"sass_check: compiling {src} failed:\n{p.stderr}")
    return p.stderr


INS_RE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    funcs: dict[str, list[tuple[int, str]]] = {}
    cur = None
    for line in sass.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        m = INS_RE.match(line)
        if m and cur is not None:
            funcs[cur].append((int(m.group(1), 16), m.group(2)))
    return funcs


def opcode(ins: str) -> str:
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)
    return ins.split()[0] if ins.split() else ""


def max_reg_from(code: list[tuple[int, str]], start: int) -> int:
    """Highest Rn reached from instruction index `start`, following branches until EXIT."""
    index = {addr: i for i, (addr, _) in enumerate(code)}
    seen, stack, best = set(), [start], -1
    while stack:
        i = stack.pop()
        while 0 <= i < len(code) and i not in seen:
            seen.add(i)
            addr, ins = code[i]
            regs = [int(r) for r in re.findall(r"\bR(\d+)\b", ins)]
            if regs:
                best = max(best, max(regs))
            op = opcode(ins)
            predicated = ins.startswith("@")
            if op.startswith("BRA") or op.startswith("JMP"):
                m = re.search(r"0x([0-9a-f]+)\s*$", ins)
                if m and int(m.group(1), 16) in index:
                    stack.append(index[int(m.group(1), 16)])
                if not predicated:
                    break
            elif op.startswith("EXIT") or op.startswith("RET"):
                if not predicated:
                    break
            i += 1
    return best + 1


def check_object(obj: str, kernel_filter: str, ptxas_log: str = "") -> list[dict]:
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise SystemExit("sass_check: cuobjdump not found (PATH, CUDA_HOME/bin, or triton's backends/nvidia/bin)")
    sass = subprocess.run([cuobjdump, "--dump-sass", obj], capture_output=True, text=True, check=True).stdout
    used = dict(re.findall(r"Function properties for (\S+)[\s\S]*?Used (\d+) registers", ptxas_log))
    rows = []
    for name, code in parse_functions(sass).items():
        if kernel_filter not in name:
            continue
        ops = {opcode(ins).split(".")[0] for _, ins in code}
        roles = {}
        for i, (_, ins) in enumerate(code):
            m = re.search(r"USETMAXREG\.(\w+)\S*\s+(?:U?P\w+,\s*)?(0x[0-9a-f]+|\d+)", ins)
            if m:
                role = "producer" if m.group(1).startswith("DEALLOC") else "consumer"
                roles[role] = {"setmaxnreg": int(m.group(2), 0), "used": max_reg_from(code, i + 1)}
        missing = [op for op in required(name) if op not in ops]
        local = sorted(op for op in ops if op in ("LDL", "STL"))
        over = [r for r, v in roles.items() if v["used"] > v["setmaxnreg"]]
        rows.append({"kernel": name, "entry_regs": int(used[name]) if name in used else None, "roles": roles,
                     "missing": missing, "local_memory": local, "over_budget": over,
                     "ok": not missing and not local and not over})
    return rows


def demangle(name: str) -> str:
    try:
        return subprocess.run(["c++filt"], input=name, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", help=".cu files (compiled for sm_90a) or .o files")
    ap.add_argument("--kernel", default="sm90", help="check kernels whose mangled name contains this")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    inputs = args.inputs or sorted(glob.glob(os.path.join(ROOT, "csrc/attention/sm90/flash_*_sm90_hdim*.cu")))
    results, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for src in inputs:
            log = ""
            obj = src
            if src.endswith(".cu"):
                obj = os.path.join(tmp, os.path.basename(src) + ".o")
                log = compile_obj(src, obj)
            rows = check_object(obj, args.kernel, log)
            if not rows:
                print(f"{os.path.relpath(src, ROOT)}: no kernel matching {args.kernel!r}")
                ok = False
            for r in rows:
                r["source"] = os.path.relpath(src, ROOT)
                ok &= r["ok"]
                roles = ", ".join(f"{k} {v['used']} of {v['setmaxnreg']}" for k, v in sorted(r["roles"].items()))
                status = "ok" if r["ok"] else (f"FAIL missing={r['missing']} local={r['local_memory']} "
                                               f"over={r['over_budget']}")
                print(f"{r['source']}: {demangle(r['kernel'])}\n    entry {r['entry_regs']} regs; {roles}; "
                      f"opcodes {'+'.join(required(r['kernel']))} {'present' if not r['missing'] else 'MISSING'}; {status}")
                results.append(r)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
