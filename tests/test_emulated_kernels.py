"""Emulated kernel tests: our CUDA kernel files, compiled unchanged with g++ against a CPU emulator
of the CUDA programming model (tools/cuda_emu), run on host memory under AddressSanitizer + UBSan
and compared with the PyTorch references (gptkernels/ops/*.py), on small awkward shapes.

What a pass shows: the kernels' logic is right under a sequentially-consistent emulation in which
the threads of a block run as fibers in a fixed order (forward, reverse or shuffled) between
barriers: indexing and bounds (ASan: no out-of-bounds access to any tensor or shared array;
UBSan: no signed overflow, misaligned vector access or bad float->int conversion), reductions,
barrier placement, warp-collective masks, the vectorised and scalar paths (each case checks which
one ran), grid-stride loops for several SM counts, empty inputs. What it does not show: behaviour
of the hardware (weak memory ordering, lock-step warps, timing, the exact error of approximate
instructions or tensor-core accumulation). The CUDA tests on a GPU remain the proof.

How it runs: the cases execute in a worker process (this file, run as a script with --worker) that
has the ASan runtime preloaded; pytest collects one test per case and reads the worker's results.
An ASan/UBSan report aborts the worker: that case fails with the report, and a new worker runs the
rest. Builds are cached under build/emu/ (tools/cuda_emu/build.py). A missing compiler or
sanitizer runtime skips these tests; a kernel file that does not compile fails them.

Without make:   python -m pytest -q tests/test_emulated_kernels.py
                python tests/test_emulated_kernels.py [-k SUBSTRING]   (plain runner, prints a summary)
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools" / "cuda_emu"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import build as emu_build  # noqa: E402

from helpers import assert_close, elementwise_tol, poison, reduction_tol  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CASE_TIMEOUT_S = 120


# ---- cases ------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    family: str
    fn: str                       # name of a run_* function below
    kw: dict = field(default_factory=dict)
    sms: int = 4                  # emulated SM count (grid sizes of persistent / grid-stride kernels)
    thread_order: int = 0         # 0 forward, 1 reverse, 2 shuffled (within each barrier interval)
    block_order: int = 0
    expect: str = "pass"          # "pass", "fault:<regex>" (emulator fault), "crash:<regex>" (sanitizer abort)


def _activation_cases():
    cases = []
    shapes = [(1, 1), (3, 7), (37, 1000), (5, 1023), (3, 1024), (1, 4096), (2, 8), (70, 64)]
    acts = ["gelu_tanh", "gelu", "relu"]
    k = 0
    for dt in DTYPES:
        for rows, cols in shapes:
            act = acts[k % 3]
            k += 1
            cases.append(Case(f"bias_act-{dt}-{act}-{rows}x{cols}", "activation", "run_bias_act",
                              dict(dtype=dt, act=act, rows=rows, cols=cols)))
        for act in acts:  # every activation on a vectorised and a scalar shape
            cases.append(Case(f"bias_act-{dt}-{act}-33x256", "activation", "run_bias_act",
                              dict(dtype=dt, act=act, rows=33, cols=256)))
        # misaligned pointers (storage offset of one element): the scalar path on a vector-friendly shape
        cases.append(Case(f"bias_act-{dt}-gelu_tanh-9x1024-misaligned", "activation", "run_bias_act",
                          dict(dtype=dt, act="gelu_tanh", rows=9, cols=1024, offset=1)))
    # empty inputs
    cases.append(Case("bias_act-fp32-0x7", "activation", "run_bias_act", dict(dtype="fp32", act="gelu", rows=0, cols=7)))
    cases.append(Case("bias_act-bf16-5x0", "activation", "run_bias_act", dict(dtype="bf16", act="gelu", rows=5, cols=0)))
    # launch-shape variations: one SM (long grid-stride loops, one band), many SMs (many bands),
    # reversed/shuffled thread and block order (a missing barrier or an order assumption shows)
    cases.append(Case("bias_act-bf16-gelu_tanh-300x72-sms1", "activation", "run_bias_act",
                      dict(dtype="bf16", act="gelu_tanh", rows=300, cols=72), sms=1))
    cases.append(Case("bias_act-fp16-gelu-300x72-sms132", "activation", "run_bias_act",
                      dict(dtype="fp16", act="gelu", rows=300, cols=72), sms=132))
    cases.append(Case("bias_act-fp32-relu-130x40-reverse", "activation", "run_bias_act",
                      dict(dtype="fp32", act="relu", rows=130, cols=40), thread_order=1, block_order=1))
    cases.append(Case("bias_act-bf16-gelu_tanh-130x40-shuffled", "activation", "run_bias_act",
                      dict(dtype="bf16", act="gelu_tanh", rows=130, cols=40), thread_order=2, block_order=2))
    return cases


CASES = _activation_cases()
CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "case ids must be unique"


# ---- helpers (worker side) ------------------------------------------------------------------------------

class EmuFault(AssertionError):
    pass


def ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() > 0 else 0)


def bind(lib, name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype, f.argtypes = restype, list(argtypes)
    return f


def check(lib, err, what):
    fault = lib.gptk_emu_fault().decode()
    if err != 0 or fault:
        raise EmuFault(f"{what} returned cudaError {err}" + (f"; emulator fault: {fault}" if fault else ""))


def launches(lib):
    return [ln for ln in lib.gptk_emu_log().decode().splitlines() if ln.strip()]


def vec_of(line: str):
    """True/False when a kernel line's name says vectorised/scalar (VEC = N template argument, or
    'vec'/'scalar' in the kernel's name); None when it does not say."""
    m = re.search(r"\bVEC = (\d+)", line) or re.search(r"\bkVec = (true|false)", line)
    if m:
        return m.group(1) not in ("1", "false")
    name = line.split("(")[0]
    if "scalar" in name:
        return False
    if "vec" in name:
        return True
    return None


def assert_path(lib, pattern: str, want_vec: bool):
    """Every launch of a kernel whose name matches `pattern` took the vectorised path iff want_vec
    (when the kernel's name tells), and at least one such kernel was launched."""
    lines = [ln for ln in launches(lib) if re.search(pattern, ln.split(" grid ")[0])]
    assert lines, f"no launch of a kernel matching {pattern!r}; launches:\n" + "\n".join(launches(lib))
    for ln in lines:
        v = vec_of(ln)
        if v is not None:
            assert v == want_vec, f"expected the {'vectorised' if want_vec else 'scalar'} path, ran: {ln}"


def buffer(shape, dtype, offset=0, gen=None, fill="randn", scale=1.0):
    """A tensor of `shape` that is the tail of an exactly-sized allocation (so ASan sees an overrun
    of its end), starting `offset` elements in (offset 1 misaligns it)."""
    n = math.prod(shape)
    buf = torch.empty(n + offset, dtype=dtype)
    t = buf[offset:].view(shape)
    if fill == "randn":
        t.copy_(torch.randn(shape, generator=gen) * scale)
    elif fill == "nan":
        poison(t)
    return t


def assert_bounded(actual, expected, bound, name):
    """|actual - expected| <= bound elementwise (bound: a tensor), NaN in actual fails."""
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bad = ~(err <= bound.double())
    if bool(bad.any()):
        i = int(torch.nonzero(bad.flatten())[0])
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
        raise AssertionError(f"{name}: {int(bad.sum())} / {a.numel()} elements out of bounds; first at {idx}: "
                             f"got {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r} "
                             f"(allowed +-{bound.double().flatten()[i].item():.3g})")


def aligned16(*ts):
    return all(t.data_ptr() % 16 == 0 for t in ts if t is not None and t.numel() > 0)


# ---- activation ----------------------------------------------------------------------------------------------

ACT_CODE = {"relu": 0, "gelu_tanh": 1, "gelu": 2}


def run_bias_act(lib, dtype, act, rows, cols, offset=0):
    from gptkernels.ops import activation as ref

    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(rows * 10007 + cols)
    x = buffer((rows, cols), dt, offset, g, scale=2.0)
    b = buffer((cols,), dt, offset, g)
    dy = buffer((rows, cols), dt, offset, g)
    y = buffer((rows, cols), dt, offset, fill="nan")
    dx = buffer((rows, cols), dt, offset, fill="nan")
    db = buffer((cols,), dt, offset, fill="nan")
    fwd = bind(lib, "emu_bias_act_forward", ctypes.c_int, *[ctypes.c_void_p] * 3, ctypes.c_int64, ctypes.c_int64,
               ctypes.c_int, ctypes.c_int)
    wsz = bind(lib, "emu_bias_act_backward_workspace", ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
    bwd = bind(lib, "emu_bias_act_backward", ctypes.c_int, *[ctypes.c_void_p] * 5, ctypes.c_int64, ctypes.c_int64,
               ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    check(lib, fwd(ptr(x), ptr(b), ptr(y), rows, cols, DTYPE_CODE[dt], ACT_CODE[act]), "bias_act_forward")
    ws = torch.empty(wsz(rows, cols), dtype=torch.uint8)  # exactly what the launcher asked for
    check(lib, bwd(ptr(dy), ptr(x), ptr(b), ptr(dx), ptr(db), rows, cols, DTYPE_CODE[dt], ACT_CODE[act], ptr(ws)),
          "bias_act_backward")
    atol, rtol = elementwise_tol(dt)
    if dt == torch.float32:
        # fp32 outputs against the reference formulas evaluated in float64 (torch's CPU fp32 erf and
        # tanh differ from libm's erff/tanhf by more than the fp32 tolerance), allowing each element
        # the fp32 rounding of the formula's largest intermediate term: 1 + tanh(z) and 1 - tanh(z)^2
        # cancel near tanh(z) = -1, so |error| ~ eps * |term| there, not eps * |result|.
        u = x.double() + b.double()
        y_ref = ref.act_ref(u, act).float()
        g = dy.double() * ref.act_grad_ref(u, act)
        dx_ref, db_ref = g.float(), g.sum(0).float()
        eps8 = 8 * 2.0**-24
        if act == "gelu_tanh":
            term = 0.5 * u.abs() * 0.7978845608028654 * (1 + 3 * 0.044715 * u * u)
        elif act == "gelu":
            term = u.abs() * 0.3989422804014327
        else:
            term = torch.zeros_like(u)
        if rows * cols:
            assert_bounded(y, y_ref, atol + rtol * y_ref.abs() + eps8 * (1 + u.abs()), "y")
            assert_bounded(dx, dx_ref, atol + rtol * dx_ref.abs() + eps8 * dy.double().abs() * (1 + term), "dx")
    else:
        y_ref = ref.bias_act_fwd_ref(x, b, act)
        if cols:
            dx_ref, db_ref = ref.bias_act_bwd_ref(dy, x, b, act)
        else:  # (bias_act_bwd_ref cannot reshape an empty [rows, 0] gradient)
            dx_ref, db_ref = dy.clone(), b.clone()
        if rows * cols:
            assert_close(y, y_ref, atol, rtol, "y")
            assert_close(dx, dx_ref, atol, rtol, "dx")
    scale = dx_ref.float().abs().sum(0).max().item() + 1e-6 if rows * cols else 1.0
    if cols:
        assert_close(db, db_ref, reduction_tol(dt, rows) * scale, reduction_tol(dt, rows), "dbias")
    if rows * cols:
        n = 16 // x.element_size()
        assert_path(lib, r"bias_act_forward", cols % n == 0 and aligned16(x, b, y))
        assert_path(lib, r"bias_act_backward", cols % n == 0 and aligned16(dy, x, b, dx))


# ---- the worker ------------------------------------------------------------------------------------------------

def worker_main(libs: dict, ids: list[str]) -> int:
    """Runs the cases; prints one '@@START id' line before and one '@@RESULT json' line after each."""
    import faulthandler

    torch.set_num_threads(1)
    handles = {}
    for fam, path in libs.items():
        lib = ctypes.CDLL(path)
        bind(lib, "gptk_emu_fault", ctypes.c_char_p)
        bind(lib, "gptk_emu_log", ctypes.c_char_p)
        bind(lib, "gptk_emu_configure", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
             ctypes.c_uint, ctypes.c_int)
        handles[fam] = lib
    for cid in ids:
        case = CASES_BY_ID[cid]
        print(f"@@START {cid}", flush=True)
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        t0 = time.time()
        lib = handles[case.family]
        lib.gptk_emu_reset()
        lib.gptk_emu_configure(case.sms, 0, case.thread_order, case.block_order, 1234, 0xff)
        torch.manual_seed(0)
        status, msg = "pass", ""
        try:
            globals()[case.fn](lib, **case.kw)
        except EmuFault as e:
            status, msg = "fault", str(e)
        except AssertionError as e:
            status, msg = "fail", str(e)
        except Exception as e:  # noqa: BLE001
            status, msg = "error", f"{type(e).__name__}: {e}"
        faulthandler.cancel_dump_traceback_later()
        log = lib.gptk_emu_log().decode()
        print("@@RESULT " + json.dumps(dict(id=cid, status=status, msg=msg, log=log[-4000:],
                                            seconds=round(time.time() - t0, 3))), flush=True)
    return 0


# ---- the driver (pytest side) -------------------------------------------------------------------------------------

def judge(case: Case, status: str, msg: str) -> tuple[bool, str]:
    """(ok, explanation) of a case's outcome against its expectation."""
    if case.expect == "pass":
        return status == "pass", msg
    kind, _, pattern = case.expect.partition(":")
    if status != kind:
        return False, f"expected a {kind} matching {pattern!r}, got {status}: {msg}"
    if not re.search(pattern, msg, re.S):
        return False, f"the {kind} does not match {pattern!r}: {msg[-3000:]}"
    return True, ""


def sanitizer_report(err: str) -> str:
    """The sanitizer's report (or a timeout's traceback) from a dead worker's stderr."""
    for key in ("ERROR: AddressSanitizer", "runtime error:", "AddressSanitizer", "Timeout (", "Traceback"):
        i = err.find(key)
        if i >= 0:
            return err[max(0, err.rfind("\n", 0, i) + 1):][:8000]
    return err[-8000:]


def run_cases(ids: list[str], timeout_s: float = 1800) -> dict:
    """Builds what the cases need and runs them in worker processes. Returns {id: result dict}, or
    raises emu_build.BuildError."""
    families = sorted({CASES_BY_ID[i].family for i in ids})
    built = emu_build.build(families)
    libs = {f: str(b.lib) for f, b in built.items()}
    results = {}
    for i in ids:
        if CASES_BY_ID[i].family not in libs:
            results[i] = dict(id=i, status="skip", msg=f"the {CASES_BY_ID[i].family} kernels are not in this tree")
    todo = [i for i in ids if i not in results]
    env = emu_build.asan_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    deadline = time.time() + timeout_s
    crashes = 0
    while todo:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(libs), json.dumps(todo)]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60, deadline - time.time()))
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = "worker timed out", -1
        started = None
        for line in out.splitlines():
            if line.startswith("@@START "):
                started = line[8:].strip()
            elif line.startswith("@@RESULT "):
                r = json.loads(line[9:])
                results[r["id"]] = r
                started = None
        todo = [i for i in todo if i not in results]
        if not todo:
            break
        # the worker died inside case `started` (sanitizer report, timeout) or before any case
        if started is None:
            raise emu_build.BuildError("environment" if crashes == 0 and not results else "compile",
                                       f"the emulator worker failed (rc {rc}):\n{err[-6000:]}")
        results[started] = dict(id=started, status="crash", msg=f"worker died (rc {rc}):\n{sanitizer_report(err)}",
                                log="")
        todo = [i for i in todo if i != started]
        crashes += 1
        if time.time() > deadline:
            for i in todo:
                results[i] = dict(id=i, status="error", msg="not run: out of time", log="")
            break
    return results


@pytest.fixture(scope="module")
def emu_results(request):
    mine = [item.callspec.params["case_id"] for item in request.session.items
            if item.module is sys.modules[__name__] and hasattr(item, "callspec") and "case_id" in item.callspec.params]
    try:
        return run_cases(mine)
    except emu_build.BuildError as e:
        if e.kind == "environment":
            pytest.skip(f"emulated kernel tests need g++ with ASan/UBSan: {e}")
        pytest.fail(f"emulated build failed: {e}", pytrace=False)


@pytest.mark.parametrize("case_id", list(CASES_BY_ID))
def test_emulated(case_id, emu_results):
    r = emu_results[case_id]
    if r["status"] == "skip":
        pytest.skip(r["msg"])
    ok, why = judge(CASES_BY_ID[case_id], r["status"], r["msg"])
    if not ok:
        pytest.fail(f"{r['status']}: {why}\nlaunches:\n{r.get('log', '')}", pytrace=False)


def main(argv):
    if len(argv) >= 4 and argv[1] == "--worker":
        return worker_main(json.loads(argv[2]), json.loads(argv[3]))
    pat = argv[argv.index("-k") + 1] if "-k" in argv else ""
    ids = [c.id for c in CASES if pat in c.id]
    t0 = time.time()
    try:
        results = run_cases(ids)
    except emu_build.BuildError as e:
        print(f"build failed ({e.kind}): {e}")
        return 2
    bad = 0
    for i in ids:
        r = results[i]
        ok, why = judge(CASES_BY_ID[i], r["status"], r["msg"]) if r["status"] != "skip" else (True, "skipped")
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {i} ({r.get('seconds', '-')}s){'' if ok else ': ' + why[:3000]}")
    print(f"{len(ids) - bad}/{len(ids)} ok in {time.time() - t0:.1f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
