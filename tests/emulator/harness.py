"""The emulated kernel tests' shared harness: our CUDA kernel files, compiled unchanged with g++
against a CPU emulator of the CUDA programming model (this directory: translate.py, cuda_emu.h/.cpp,
build.py), run on host memory under AddressSanitizer + UBSan and compared with the PyTorch
references (gptkernels/ops/*.py), on small awkward shapes.

One case file per kernel family holds its cases and the functions that run them, next to that
family's CPU tests (tests/test_emulated_<family>.py; the emulator's own tests are
tests/emulator/test_emulator_selftest.py). This module holds what they share: the Case record,
buffers and checks, the worker process and the driver, and the pytest glue (pytest_tests).

What a pass shows: the kernels' logic is right under a sequentially-consistent emulation in which
the threads of a block run as fibers in a fixed order (forward, reverse or shuffled) between
barriers: indexing and bounds (ASan: no out-of-bounds access to any tensor or shared array;
UBSan: no signed overflow, misaligned vector access or bad float->int conversion), reductions,
barrier placement, warp-collective masks, the vectorised and scalar paths (each case checks which
one ran), grid-stride loops for several SM counts, empty inputs. What it does not show: behaviour
of the hardware (weak memory ordering, lock-step warps, timing, the exact error of approximate
instructions or tensor-core accumulation). The CUDA tests on a GPU remain the proof.

How it runs: a case file's cases execute in a worker process (this file run as a script with
--worker, which imports the case file by path) that has the ASan runtime preloaded; pytest
collects one test per case and reads the worker's results. An ASan/UBSan report aborts the worker:
that case fails with the report, and a new worker runs the rest. Builds are cached under build/emu/
(build.py). A missing compiler or sanitizer runtime skips these tests; a kernel file that does not
compile fails them.

    python -m pytest -q tests/test_emulated_layernorm.py     # one family (all: -k emulat, or the whole suite)
    python tests/test_emulated_layernorm.py [-k SUBSTRING]   # plain runner, prints a summary
"""
from __future__ import annotations

import ctypes
import importlib.util
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

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from emulator import build as emu_build  # noqa: E402
from helpers import poison  # noqa: E402,F401  (re-exported for the case files)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CASE_TIMEOUT_S = 120


# ---- cases ------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    family: str                   # a family of build.FAMILIES (the library the case loads)
    fn: str                       # name of a run_* function of the case file: fn(lib, **kw)
    kw: dict = field(default_factory=dict)
    sms: int = 4                  # emulated SM count (grid sizes of persistent / grid-stride kernels)
    thread_order: int = 0         # 0/1/2 forward/reverse/shuffled sweeps (warps advance together);
    #                               3/4 greedy lowest/highest thread first (one warp runs ahead to the next
    #                               block barrier: exposes a missing __syncthreads between warps)
    block_order: int = 0
    max_blocks_per_sm: int = 0    # occupancy the emulated cudaOccupancy* reports at most (0: threads/smem only)
    wgmma_at_issue: bool = False  # sm_90: wgmma math at issue instead of at the wgmma.wait_group that completes it
    tma_at_issue: bool = False    # sm_90: TMA copies at issue instead of when a waiter could observe them
    compute_capability: int = 90  # of the emulated device (90 or 80; sm_90 instructions fault on 80)
    expect: str = "pass"          # "pass", "fault:<regex>" (emulator fault), "crash:<regex>" (sanitizer abort)


def by_id(cases: list[Case]) -> dict:
    out = {c.id: c for c in cases}
    assert len(out) == len(cases), "case ids must be unique"
    return out


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


def bhsd_strides(t, layout):
    """(batch, head, row) element strides of t viewed in (B, H, S, D) order (layout "bhsd" or "bshd"),
    0 for size-1 dims (as the bindings pass them)."""
    tb = t if layout == "bhsd" else t.transpose(1, 2)
    return [tb.stride(i) if tb.size(i) != 1 else 0 for i in range(3)]


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


def huge_view(shape, strides, dtype):
    """A tensor of `shape` and element `strides` in a lazily committed anonymous mapping (offsets may
    exceed 2^31 elements: only the touched pages cost memory). Returns (tensor, mapping) or None."""
    import mmap

    nbytes = (sum((n - 1) * st for n, st in zip(shape, strides)) + 1) * torch.tensor([], dtype=dtype).element_size()
    try:
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
    except (OSError, ValueError, OverflowError):
        return None
    flat = torch.frombuffer(mm, dtype=torch.uint8).view(dtype)
    return flat.as_strided(shape, strides), mm


# ---- the worker ------------------------------------------------------------------------------------------------

def load_case_file(path: str):
    """The case file at `path`, imported under a name of its own (the worker's view of it)."""
    path = str(Path(path).resolve())
    name = "gptk_emu_cases_" + re.sub(r"\W", "_", Path(path).stem)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def worker_main(case_file: str, libs: dict, ids: list[str]) -> int:
    """Runs the cases `ids` of the case file; prints one '@@START id' line before and one
    '@@RESULT json' line after each."""
    import faulthandler

    torch.set_num_threads(1)
    mod = load_case_file(case_file)
    cases = by_id(mod.CASES)
    handles = {}
    for fam, path in libs.items():
        lib = ctypes.CDLL(path)
        bind(lib, "gptk_emu_fault", ctypes.c_char_p)
        bind(lib, "gptk_emu_log", ctypes.c_char_p)
        bind(lib, "gptk_emu_configure", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
             ctypes.c_uint, ctypes.c_int)
        bind(lib, "gptk_emu_configure_async", ctypes.c_int, ctypes.c_int, ctypes.c_int)
        bind(lib, "gptk_emu_configure_device", ctypes.c_int, ctypes.c_int)
        handles[fam] = lib
    for cid in ids:
        case = cases[cid]
        print(f"@@START {cid}", flush=True)
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        t0 = time.time()
        lib = handles[case.family]
        lib.gptk_emu_reset()
        lib.gptk_emu_configure(case.sms, case.max_blocks_per_sm, case.thread_order, case.block_order, 1234, 0xff)
        lib.gptk_emu_configure_async(int(case.wgmma_at_issue), int(case.tma_at_issue))
        torch.manual_seed(0)
        status, msg = "pass", ""
        try:
            if lib.gptk_emu_configure_device(case.compute_capability) != 0:
                raise ValueError(f"compute capability {case.compute_capability} is not emulated (80 or 90)")
            getattr(mod, case.fn)(lib, **case.kw)
        except EmuFault as e:
            status, msg = "fault", str(e)
        except pytest.skip.Exception as e:
            status, msg = "skip", str(e)
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


def run_cases(case_file: str, cases: list[Case], ids: list[str], timeout_s: float = 1800) -> dict:
    """Builds what the cases `ids` (of `cases`, defined in `case_file`) need and runs them in worker
    processes. Returns {id: result dict}, or raises emu_build.BuildError."""
    cases_by_id = by_id(cases)
    families = sorted({cases_by_id[i].family for i in ids})
    built = emu_build.build(families)
    libs = {f: str(b.lib) for f, b in built.items()}
    results = {}
    for i in ids:
        if cases_by_id[i].family not in libs:
            results[i] = dict(id=i, status="skip", msg=f"the {cases_by_id[i].family} kernels are not in this tree")
    todo = [i for i in ids if i not in results]
    env = emu_build.asan_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    deadline = time.time() + timeout_s
    while todo:
        cmd = [sys.executable, str(HERE / "harness.py"), "--worker", str(Path(case_file).resolve()), json.dumps(libs),
               json.dumps(todo)]
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
        if started is None:  # (the environment was probed by the build: this is our failure)
            raise emu_build.BuildError("worker", f"the emulator worker failed (rc {rc}):\n{err[-6000:]}")
        results[started] = dict(id=started, status="crash", msg=f"worker died (rc {rc}):\n{sanitizer_report(err)}",
                                log="")
        todo = [i for i in todo if i != started]
        if time.time() > deadline:
            for i in todo:
                results[i] = dict(id=i, status="error", msg="not run: out of time", log="")
            break
    return results


def pytest_tests(case_file: str, cases: list[Case]):
    """The pytest glue of a case file: (a module-scoped fixture that runs the cases pytest selected
    from this file in workers, a test parametrised over the cases). A case file binds them to its
    globals as `emu_results, test_emulated = harness.pytest_tests(__file__, CASES)`."""
    cases_by_id = by_id(cases)
    me = Path(case_file).resolve()

    @pytest.fixture(scope="module")
    def emu_results(request):
        mine = [item.callspec.params["case_id"] for item in request.session.items
                if Path(str(item.fspath)).resolve() == me and hasattr(item, "callspec")
                and "case_id" in item.callspec.params]
        try:
            return run_cases(str(me), cases, mine)
        except emu_build.BuildError as e:
            if e.kind == "environment":
                pytest.skip(f"emulated kernel tests need g++ with ASan/UBSan: {e}")
            pytest.fail(f"emulated build failed: {e}", pytrace=False)

    @pytest.mark.parametrize("case_id", list(cases_by_id))
    def test_emulated(case_id, emu_results):
        r = emu_results[case_id]
        if r["status"] == "skip":
            pytest.skip(r["msg"])
        ok, why = judge(cases_by_id[case_id], r["status"], r["msg"])
        if not ok:
            pytest.fail(f"{r['status']}: {why}\nlaunches:\n{r.get('log', '')}", pytrace=False)

    return emu_results, test_emulated


def main(case_file: str, cases: list[Case], argv: list[str]) -> int:
    """The plain runner of a case file: `python CASE_FILE [-k SUBSTRING]`."""
    pat = argv[argv.index("-k") + 1] if "-k" in argv else ""
    ids = [c.id for c in cases if pat in c.id]
    cases_by_id = by_id(cases)
    t0 = time.time()
    try:
        results = run_cases(case_file, cases, ids)
    except emu_build.BuildError as e:
        print(f"build failed ({e.kind}): {e}")
        return 2
    bad = 0
    for i in ids:
        r = results[i]
        ok, why = judge(cases_by_id[i], r["status"], r["msg"]) if r["status"] != "skip" else (True, "skipped")
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {i} ({r.get('seconds', '-')}s){'' if ok else ': ' + why[:3000]}")
    print(f"{len(ids) - bad}/{len(ids)} ok in {time.time() - t0:.1f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    # The worker: `harness.py --worker CASE_FILE LIBS_JSON IDS_JSON` (run by run_cases). The package's
    # copy of this module is the one the case file imports; use it, not this __main__ copy.
    if len(sys.argv) != 5 or sys.argv[1] != "--worker":
        print("usage: harness.py --worker CASE_FILE LIBS_JSON IDS_JSON (run by the case files)", file=sys.stderr)
        sys.exit(2)
    from emulator import harness as _h

    sys.exit(_h.worker_main(sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])))
