"""Emulated LayerNorm / fused residual add + LayerNorm kernels (csrc/layernorm/) against the float64
reference with the CUDA tests' dtype-derived bounds.

Cases run in a worker process by the shared harness (tests/emulator/harness.py: what a pass shows
and what it does not, how it runs); the kernels are compiled unchanged with g++ against the CPU
emulator in tests/emulator/.

    python -m pytest -q tests/test_emulated_layernorm.py
    python tests/test_emulated_layernorm.py [-k SUBSTRING]   (plain runner, prints a summary)
"""
from __future__ import annotations

import ctypes
import sys

import torch

from emulator import harness
from emulator.harness import DTYPE_CODE, DTYPES, Case, aligned16, assert_path, bind, buffer, check, launches, ptr


# ---- cases ------------------------------------------------------------------------------------------

def _layernorm_cases():
    cases = []
    variants = [("wb", False, True, True), ("add-wb", True, True, True), ("none", False, False, False),
                ("w", False, True, False), ("add-none", True, False, False)]
    k = 0
    for dt in DTYPES:
        for cols in [1, 7, 8, 1000, 1023, 1024, 1025, 2056, 4096]:
            rows = [1, 3, 37][k % 3]
            name, res, w, b = variants[k % len(variants)]
            k += 1
            cases.append(Case(f"layer_norm-{dt}-{name}-{rows}x{cols}", "layernorm", "run_layer_norm",
                              dict(dtype=dt, rows=rows, cols=cols, residual=res, weight=w, bias=b)))
        cases.append(Case(f"layer_norm-{dt}-add-wb-9x1024-misaligned", "layernorm", "run_layer_norm",
                          dict(dtype=dt, rows=9, cols=1024, residual=True, offset=1)))
        cases.append(Case(f"layer_norm-{dt}-wb-2x16384", "layernorm", "run_layer_norm",
                          dict(dtype=dt, rows=2, cols=16384)))
    cases += [
        Case("layer_norm-fp32-wb-2x12288", "layernorm", "run_layer_norm", dict(dtype="fp32", rows=2, cols=12288)),
        Case("layer_norm-fp32-wb-37x1000-offset1e4", "layernorm", "run_layer_norm",
             dict(dtype="fp32", rows=37, cols=1000, mean_offset=1e4)),
        Case("layer_norm-bf16-wb-0x64", "layernorm", "run_layer_norm", dict(dtype="bf16", rows=0, cols=64)),
        Case("layer_norm-bf16-add-wb-300x64-sms1", "layernorm", "run_layer_norm",
             dict(dtype="bf16", rows=300, cols=64, residual=True), sms=1),
        Case("layer_norm-bf16-add-wb-300x200-occupancy1", "layernorm", "run_layer_norm",
             dict(dtype="bf16", rows=300, cols=200, residual=True), sms=2, max_blocks_per_sm=1),
        Case("layer_norm-fp16-wb-300x1000-sms132", "layernorm", "run_layer_norm",
             dict(dtype="fp16", rows=300, cols=1000), sms=132),
        Case("layer_norm-fp32-wb-70x2056-reverse", "layernorm", "run_layer_norm",
             dict(dtype="fp32", rows=70, cols=2056), thread_order=1, block_order=1),
        Case("layer_norm-bf16-add-w-70x2056-shuffled", "layernorm", "run_layer_norm",
             dict(dtype="bf16", rows=70, cols=2056, residual=True, bias=False), thread_order=2, block_order=2),
        Case("layer_norm-fp16-add-wb-70x4096-greedy", "layernorm", "run_layer_norm",
             dict(dtype="fp16", rows=70, cols=4096, residual=True), thread_order=3),
        Case("layer_norm-bf16-wb-37x264-greedy-reverse", "layernorm", "run_layer_norm",
             dict(dtype="bf16", rows=37, cols=264), thread_order=4, block_order=1),
    ]
    return cases


CASES = _layernorm_cases()


# ---- layernorm ------------------------------------------------------------------------------------------------

def run_layer_norm(lib, dtype, rows, cols, residual=False, weight=True, bias=True, offset=0, eps=1e-5,
                   mean_offset=0.0):
    import test_layernorm as tl  # the bounds the CUDA tests use (float64 reference, dtype-derived)

    dt = DTYPES[dtype]
    code = DTYPE_CODE[dt]
    g = torch.Generator().manual_seed(rows * 7919 + cols)
    x = buffer((rows, cols), dt, offset, g, scale=2.0)
    if mean_offset:
        x += mean_offset
    r = buffer((rows, cols), dt, offset, g) if residual else None
    w = buffer((cols,), dt, offset, g) if weight else None
    b = buffer((cols,), dt, offset, g) if bias else None
    y = buffer((rows, cols), dt, offset, fill="nan")
    s = buffer((rows, cols), dt, offset, fill="nan") if residual else None
    mean = buffer((rows,), torch.float32, fill="nan")
    rstd = buffer((rows,), torch.float32, fill="nan")
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    fwd = bind(lib, "emu_layer_norm_forward", ctypes.c_int, *[vp] * 8, i64, i64, ctypes.c_float, ctypes.c_int)
    wsz = bind(lib, "emu_layer_norm_backward_workspace", i64, i64, i64, ctypes.c_int, ctypes.c_int)
    bwd = bind(lib, "emu_layer_norm_backward", ctypes.c_int, *[vp] * 9, i64, i64, ctypes.c_int, vp)
    check(lib, fwd(ptr(x), ptr(r), ptr(w), ptr(b), ptr(y), ptr(s), ptr(mean), ptr(rstd), rows, cols, eps, code),
          "layer_norm_forward")
    xin = x
    if residual:
        assert torch.equal(s, r + x), "s must be residual + x rounded once to the storage type"
        xin = s
    dy = buffer((rows, cols), dt, offset, g)
    ds = buffer((rows, cols), dt, offset, g) if residual else None
    dx = buffer((rows, cols), dt, offset, fill="nan")
    dw = buffer((cols,), dt, offset, fill="nan") if weight else torch.empty(0, dtype=dt)
    db = buffer((cols,), dt, offset, fill="nan") if bias else torch.empty(0, dtype=dt)
    ws = torch.empty(wsz(rows, cols, code, int(weight or bias)), dtype=torch.uint8)  # exactly what it asks for
    check(lib, bwd(ptr(dy), ptr(xin), ptr(w), ptr(mean), ptr(rstd), ptr(ds), ptr(dx), ptr(dw if weight else None),
                   ptr(db if bias else None), rows, cols, code, ptr(ws)), "layer_norm_backward")
    if rows == 0:
        assert not launches(lib), "no kernel should run for zero rows"
        for t in (dw, db):
            assert bool((t == 0).all()), "the parameter gradients of an empty batch are zero"
        return
    tl._check_forward(xin, w, b, y, mean, rstd, eps)
    tl._check_backward(dy, xin, w, mean, rstd, dx, dw, db, ds, has_bias=bias)
    vec_ok = cols % 8 == 0
    assert_path(lib, r"layer_norm_forward", vec_ok and aligned16(x, r, w, b, y, s))
    assert_path(lib, r"layer_norm_backward", vec_ok and aligned16(dy, xin, w, ds, dx))


emu_results, test_emulated = harness.pytest_tests(__file__, CASES)

if __name__ == "__main__":
    sys.exit(harness.main(__file__, CASES, sys.argv))
