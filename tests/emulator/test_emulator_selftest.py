"""The emulator's own tests: kernels in tests/emulator/selftest/ that use each emulated feature
correctly (results compared with plain math) and deliberately wrongly (the emulator must report it).

Cases run in a worker process by the shared harness (tests/emulator/harness.py: what a pass shows
and what it does not, how it runs); the kernels are compiled unchanged with g++ against the CPU
emulator in tests/emulator/.

    python -m pytest -q tests/emulator/test_emulator_selftest.py
    python tests/emulator/test_emulator_selftest.py [-k SUBSTRING]   (plain runner, prints a summary)
"""
from __future__ import annotations

import ctypes
import sys

import torch

if __name__ == "__main__":  # run as a script: the emulator package lives in tests/
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emulator import harness  # noqa: E402
from emulator.harness import Case, bind, check, ptr  # noqa: E402


# ---- cases ------------------------------------------------------------------------------------------

def _selftest_cases():
    S = "selftest"
    return [
        Case("emu-warp-intrinsics", S, "run_st_warp_ops"),
        Case("emu-conversions-vs-torch", S, "run_st_conversions"),
        Case("emu-mma-bf16-ldmatrix", S, "run_st_mma", dict(bf16=True, variant=0, a_rows=16)),
        Case("emu-mma-bf16-ldmatrix-trans-operands", S, "run_st_mma", dict(bf16=True, variant=1, a_rows=16)),
        Case("emu-mma-fp16-cp-async-zero-fill", S, "run_st_mma", dict(bf16=False, variant=0, a_rows=13)),
        Case("emu-mma-fp16-ldmatrix-trans-operands", S, "run_st_mma", dict(bf16=False, variant=1, a_rows=16)),
        Case("emu-cp-async-deferred-until-wait", S, "run_st_cp_async"),
        Case("emu-dynamic-smem-needs-attribute", S, "run_st_dyn_smem"),
        Case("emu-bad-launch-config-rejected", S, "run_st_call", dict(fn="st_bad_config")),
        Case("emu-barrier-present-neighbour-ok", S, "run_st_neighbour", dict(with_barrier=True)),
        Case("emu-detects-missing-barrier", S, "run_st_neighbour", dict(with_barrier=False)),
        Case("emu-detects-missing-barrier-reverse", S, "run_st_neighbour", dict(with_barrier=False), thread_order=1),
        # deliberate bugs the emulator must report
        Case("emu-detects-shfl-after-exit", S, "run_st_call", dict(fn="st_exit_then_shfl"), expect="fault:exit"),
        Case("emu-detects-full-mask-on-partial-warp", S, "run_st_call", dict(fn="st_full_mask_partial_warp"),
             expect="fault:do not exist"),
        Case("emu-detects-divergent-barrier", S, "run_st_call", dict(fn="st_divergent_barrier"),
             expect="fault:divergent __syncthreads"),
        Case("emu-detects-deadlock", S, "run_st_call", dict(fn="st_deadlock"), expect="fault:deadlock.*__syncthreads"),
        Case("emu-detects-launch-bounds", S, "run_st_call", dict(fn="st_launch_bounds", threads=128),
             expect="fault:__launch_bounds__"),
        Case("emu-detects-cp-async-misaligned", S, "run_st_cp_async_misaligned", expect="fault:not 16-byte aligned"),
        Case("emu-detects-shared-out-of-bounds", S, "run_st_call", dict(fn="st_shared_oob"),
             expect="crash:(out of bounds for type 'float \\[64\\]'|heap-buffer-overflow).*emu_selftest.cu"),
        Case("emu-detects-global-out-of-bounds", S, "run_st_global_oob",
             expect="crash:heap-buffer-overflow.*emu_selftest.cu"),
        Case("emu-detects-32bit-index-overflow", S, "run_st_index_overflow", expect="crash:signed integer overflow"),
    ]


CASES = _selftest_cases()



def run_st_call(lib, fn, threads=None):
    out = torch.zeros(256, dtype=torch.int32)
    args = [ptr(out)] + ([threads] if threads is not None else [])
    f = bind(lib, fn, ctypes.c_int, ctypes.c_void_p, *([ctypes.c_int] if threads is not None else []))
    check(lib, f(*args), fn)


def run_st_warp_ops(lib, threads=64):
    out = torch.full((threads * 8,), -7, dtype=torch.int32)
    check(lib, bind(lib, "st_warp_ops", ctypes.c_int, ctypes.c_void_p, ctypes.c_int)(ptr(out), threads), "warp_ops")
    got = out.view(threads, 8).tolist()
    for tid in range(threads):
        lane, w = tid % 32, tid // 32

        def v(l):
            return l * 3 + w * 100

        seg = lane & ~15
        ballot = sum(1 << i for i in range(32) if i % 3 == 0)
        ballot -= (1 << 32) if ballot >= (1 << 31) else 0  # as int32
        want = [v(5), v(lane ^ 3), v(lane - 2) if lane >= 2 else v(lane),
                v(lane + 7) if lane + 7 < seg + 16 else v(lane),
                ballot, 1, 496, v(seg + 1)]
        assert got[tid] == want, f"thread {tid}: got {got[tid]}, want {want}"


def run_st_conversions(lib):
    """fp16/bf16 conversions: every 16-bit pattern to fp32, and fp32 -> fp16/bf16 (round to nearest
    even) on edge values and random bit patterns, bit for bit against torch."""
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    for name, dt in (("half", torch.float16), ("bf16", torch.bfloat16)):
        bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        out = torch.empty(65536, dtype=torch.float32)
        bind(lib, f"st_{name}_to_float", None, vp, vp, i64)(ptr(bits), ptr(out), 65536)
        want = bits.view(dt).float()
        same = (out.view(torch.int32) == want.view(torch.int32)) | (out.isnan() & want.isnan())
        assert bool(same.all()), f"{name} -> float differs at {int((~same).nonzero()[0])}"
        g = torch.Generator().manual_seed(5)
        rnd = torch.randint(-2**31, 2**31 - 1, (200000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
        edges = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                              2.0**-14, 2.0**-14 - 2.0**-25, 3.4e38, float("inf"), float("-inf"), 1 + 2.0**-11,
                              1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 1e-40, -1e-45], dtype=torch.float32)
        f = torch.cat([edges, rnd, rnd * 2.0**-100, rnd * 2.0**100])
        f = f[f.isfinite() | f.isinf()]
        h = torch.empty(f.numel(), dtype=torch.int16)
        bind(lib, f"st_float_to_{name}", None, vp, vp, i64)(ptr(f), ptr(h), f.numel())
        want = f.to(dt)
        same = (h == want.view(torch.int16)) | (h.view(dt).isnan() & want.isnan())
        if not bool(same.all()):
            i = int((~same).nonzero()[0])
            raise AssertionError(f"float -> {name}: {f[i].item()!r} gave {int(h[i]) & 0xffff:#06x}, "
                                 f"torch {int(want.view(torch.int16)[i]) & 0xffff:#06x}")


def run_st_mma(lib, bf16, variant, a_rows):
    """One warp: cp.async (with zero-fill) -> ldmatrix (.trans) -> mma.sync m16n8k16, against a float64
    matrix product (the emulation adds the products in double and rounds once)."""
    dt = torch.bfloat16 if bf16 else torch.float16
    g = torch.Generator().manual_seed(11 + variant)
    A = torch.randn(16, 16, generator=g).to(dt)
    B = torch.randn(16, 8, generator=g).to(dt)
    C = torch.randn(16, 8, generator=g)
    a_src = (A.t() if variant == 1 else A).contiguous()
    b_src = (B.t() if variant == 1 else B).contiguous()
    D = torch.full((16, 8), float("nan"))
    fn = bind(lib, "st_mma", ctypes.c_int, *[ctypes.c_void_p] * 4, ctypes.c_int, ctypes.c_int, ctypes.c_int)
    check(lib, fn(ptr(a_src), ptr(b_src), ptr(C), ptr(D), int(bf16), variant, a_rows), "mma")
    Am = A.double().clone()
    Am[a_rows:] = 0
    want = Am @ B.double() + C.double()
    torch.testing.assert_close(D.double(), want, atol=1e-6, rtol=2.0**-23)


def run_st_cp_async(lib):
    src = torch.tensor([1.5, -2.0, 3.25, 4.0])
    out = torch.zeros(12)
    check(lib, bind(lib, "st_cp_async", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(ptr(src), ptr(out)), "cp_async")
    assert bool(out[:4].isnan().all()), f"shared memory read before cp.async.wait_group must not hold the data: {out[:4]}"
    assert out[4:8].tolist() == src.tolist(), out[4:8]
    assert out[8:].tolist() == [0.0] * 4, "src-size 0 zero-fills"


def run_st_cp_async_misaligned(lib):
    src = torch.zeros(16)
    check(lib, bind(lib, "st_cp_async_misaligned", ctypes.c_int, ctypes.c_void_p)(ptr(src)), "cp_async_misaligned")


def run_st_dyn_smem(lib):
    out = torch.zeros(1)
    fn = bind(lib, "st_dyn_smem", ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    n = 16384  # 64 KiB: above the 48 KiB default
    err = fn(ptr(out), n, 0)
    assert err == 1, f"64 KiB of dynamic shared memory without cudaFuncSetAttribute must fail (cudaErrorInvalidValue), got {err}"
    check(lib, fn(ptr(out), n, 1), "dyn_smem with the attribute")
    assert out.item() == sum(i % 3 for i in range(n))


def run_st_neighbour(lib, with_barrier):
    n = 128
    out = torch.zeros(n)
    fn = bind(lib, "st_neighbour", ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    check(lib, fn(ptr(out), n, int(with_barrier)), "neighbour")
    want = torch.tensor([float((t + 1) % n) for t in range(n)])
    if with_barrier:
        assert torch.equal(out, want)
    else:
        assert bool(out.isnan().any()), "without the barrier, some thread must read its neighbour's slot unwritten"


def run_st_global_oob(lib):
    n = 100
    inp = torch.zeros(n)
    out = torch.zeros(n)
    fn = bind(lib, "st_global_oob", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    check(lib, fn(ptr(inp), ptr(out), n), "global_oob")


def run_st_index_overflow(lib):
    inp = torch.zeros(4, dtype=torch.int32)
    out = torch.zeros(4, dtype=torch.int32)
    fn = bind(lib, "st_index_overflow", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    check(lib, fn(ptr(inp), ptr(out), 3, 2**30), "index_overflow")


emu_results, test_emulated = harness.pytest_tests(__file__, CASES)

if __name__ == "__main__":
    sys.exit(harness.main(__file__, CASES, sys.argv))
