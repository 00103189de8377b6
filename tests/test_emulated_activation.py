"""Emulated bias + activation kernels (csrc/activation/bias_act.cu) against the PyTorch reference.

Cases run in a worker process by the shared harness (tests/emulator/harness.py: what a pass shows
and what it does not, how it runs); the kernels are compiled unchanged with g++ against the CPU
emulator in tests/emulator/.

    python -m pytest -q tests/test_emulated_activation.py
    python tests/test_emulated_activation.py [-k SUBSTRING]   (plain runner, prints a summary)
"""
from __future__ import annotations

import ctypes
import sys

import torch

from emulator import harness
from emulator.harness import DTYPE_CODE, DTYPES, Case, aligned16, assert_bounded, assert_path, bind, buffer, check, ptr
from helpers import assert_close, elementwise_tol, reduction_tol


# ---- cases ------------------------------------------------------------------------------------------

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
    cases.append(Case("bias_act-fp32-gelu-300x72-occupancy1", "activation", "run_bias_act",
                      dict(dtype="fp32", act="gelu", rows=300, cols=72), sms=2, max_blocks_per_sm=1))
    cases.append(Case("bias_act-fp16-gelu-300x72-sms132", "activation", "run_bias_act",
                      dict(dtype="fp16", act="gelu", rows=300, cols=72), sms=132))
    cases.append(Case("bias_act-fp32-relu-130x40-reverse", "activation", "run_bias_act",
                      dict(dtype="fp32", act="relu", rows=130, cols=40), thread_order=1, block_order=1))
    cases.append(Case("bias_act-bf16-gelu_tanh-130x40-shuffled", "activation", "run_bias_act",
                      dict(dtype="bf16", act="gelu_tanh", rows=130, cols=40), thread_order=2, block_order=2))
    cases.append(Case("bias_act-fp16-gelu-130x520-greedy", "activation", "run_bias_act",
                      dict(dtype="fp16", act="gelu", rows=130, cols=520), thread_order=3))
    cases.append(Case("bias_act-fp32-gelu_tanh-130x37-greedy-reverse", "activation", "run_bias_act",
                      dict(dtype="fp32", act="gelu_tanh", rows=130, cols=37), thread_order=4, block_order=1))
    return cases


CASES = _activation_cases()


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


emu_results, test_emulated = harness.pytest_tests(__file__, CASES)

if __name__ == "__main__":
    sys.exit(harness.main(__file__, CASES, sys.argv))
