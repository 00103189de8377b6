"""The kernel families the self-test checks, and the checks of the elementwise, normalisation,
loss and GEMM-epilogue kernels (attention's are in attention_checks.py).

A family is the unit that is verified and disabled together: every public op in `ops` (the names
given to gptkernels._backend.use_kernel) runs on the kernel path only while its family passes.
Its check calls the CUDA ops themselves (`k.<op>`, k = torch.ops.gptkernels unless a test injects
another namespace) on small awkward shapes in both half dtypes and compares each output, forward
and backward, with torch's math in fp64 (the reference) and in the same half dtype (the baseline)
under the rule in rule.py. Cases marked quick (the first field) form the quick check that runs at
the first kernel call of a family; `gptkernels selftest` runs them all.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F

from gptkernels._selftest import attention_checks
from gptkernels._selftest.harness import HALF, dtype_name, generator, poison, randint, randn, run_case, select, sync
from gptkernels._selftest.harness import torch_math as tm
from gptkernels.ops.activation import act_ref
from gptkernels.ops.mlp import linear_act_ref

BF16, FP16 = HALF
F64 = torch.float64
IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    title: str
    ops: tuple  # public op names (gptkernels._backend.use_kernel) that run this family's kernels
    kernels: tuple  # the torch.ops.gptkernels ops its check calls
    check: Callable  # check(k, device, quick) -> list[CaseResult]


def _run(k, device, quick, family, impl, cases, describe, body, floor_ulps=2.0):
    g = generator(device)
    out = []
    for case in select(cases, quick):
        dtype = case[0]
        out.append(run_case(family, impl, describe(*case), dtype, lambda o, c=case: body(o, k, device, g, *c),
                            floor_ulps))
    return out


# ---- bias + activation -------------------------------------------------------------------------

BIAS_ACT_CASES = [  # quick, dtype, rows, cols, activation
    (True, BF16, 37, 4099, "gelu_tanh"), (True, FP16, 3, 1000, "gelu"), (False, BF16, 5, 1, "relu"),
    (False, FP16, 129, 136, "relu"), (False, BF16, 64, 768, "gelu"), (False, FP16, 1, 8191, "gelu_tanh"),
]


def _bias_act(o, k, dev, g, dtype, rows, cols, act):
    x, b = randn(g, (rows, cols), dtype, dev, 2.0), randn(g, (cols,), dtype, dev)
    dy = randn(g, (rows, cols), dtype, dev)
    poison(dev, 4 * x.numel() * x.element_size())
    y = k.bias_act_fwd(x, b, act)
    dx, db = k.bias_act_bwd(dy, x, b, act)
    sync(dev)
    f = lambda x, b: act_ref(x + b, act)  # noqa: E731
    (y64,), (dx64, db64) = tm(f, [x, b], [dy], F64)
    (yl,), (dxl, dbl) = tm(f, [x, b], [dy], dtype)
    o.add("y", y, y64, yl)
    o.add("dx", dx, dx64, dxl)
    o.add("dbias", db, db64, dbl)


def check_bias_act(k, device, quick=False):
    return _run(k, device, quick, "bias_act", "bias_act_fwd/bwd", BIAS_ACT_CASES,
                lambda dt, r, c, a: f"{dtype_name(dt)} {r}x{c} {a}", _bias_act)


# ---- LayerNorm and add + LayerNorm --------------------------------------------------------------

LN_CASES = [  # quick, dtype, rows, cols, affine
    (True, BF16, 37, 1000, True), (True, FP16, 3, 4099, True), (False, BF16, 1, 16384, True),
    (False, FP16, 129, 768, False), (False, BF16, 64, 1, True), (False, FP16, 5, 8191, False),
]
ADD_LN_CASES = [(True, BF16, 37, 1000, True), (False, FP16, 129, 768, False), (False, BF16, 3, 16384, True),
                (False, FP16, 5, 4099, True)]


def _layer_norm(o, k, dev, g, dtype, rows, cols, affine, add):
    eps = 1e-5
    x = randn(g, (rows, cols), dtype, dev, 2.0, 3.0)  # a mean far from 0: the variance must not cancel
    r = randn(g, (rows, cols), dtype, dev) if add else None
    w = randn(g, (cols,), dtype, dev, 0.5, 1.0) if affine else None
    b = randn(g, (cols,), dtype, dev) if affine else None
    dy, ds = randn(g, (rows, cols), dtype, dev), randn(g, (rows, cols), dtype, dev)
    poison(dev, 8 * x.numel() * x.element_size())
    if add:
        s, y, mean, rstd = k.add_layer_norm_fwd(r, x, w, b, eps)
        dx, dw, db = k.layer_norm_bwd(dy, s, w, mean, rstd, affine, ds)
    else:
        y, mean, rstd = k.layer_norm_fwd(x, w, b, eps)
        dx, dw, db = k.layer_norm_bwd(dy, x, w, mean, rstd, affine, None)
    sync(dev)
    if add:
        def f(r, x, w, b):
            s = r + x
            return s, F.layer_norm(s, (cols,), w, b, eps)
        (s64, y64), (dr64, _, dw64, db64) = tm(f, [r, x, w, b], [ds, dy], F64)
        (sl, yl), (drl, _, dwl, dbl) = tm(f, [r, x, w, b], [ds, dy], dtype)
        o.add("s", s, s64, sl)
        dx64, dxl = dr64, drl
    else:
        f = lambda x, w, b: F.layer_norm(x, (cols,), w, b, eps)  # noqa: E731
        (y64,), (dx64, dw64, db64) = tm(f, [x, w, b], [dy], F64)
        (yl,), (dxl, dwl, dbl) = tm(f, [x, w, b], [dy], dtype)
    o.add("y", y, y64, yl)
    o.add("dx", dx, dx64, dxl)
    if affine:
        o.add("dweight", dw, dw64, dwl)
        o.add("dbias", db, db64, dbl)


def check_layer_norm(k, device, quick=False):
    describe = lambda dt, r, c, a: f"{dtype_name(dt)} {r}x{c}{'' if a else ' no affine'}"  # noqa: E731
    return (_run(k, device, quick, "layer_norm", "layer_norm_fwd/bwd", LN_CASES, describe,
                 lambda o, k, d, g, *c: _layer_norm(o, k, d, g, *c, add=False)) +
            _run(k, device, quick, "layer_norm", "add_layer_norm_fwd/bwd", ADD_LN_CASES, describe,
                 lambda o, k, d, g, *c: _layer_norm(o, k, d, g, *c, add=True)))


# ---- cross-entropy ----------------------------------------------------------------------------

CE_CASES = [  # quick, dtype, rows, vocab, reduction
    (True, BF16, 7, 1000, "mean"), (True, FP16, 5, 50257, "sum"), (False, BF16, 33, 4099, "none"),
    (False, FP16, 1, 3, "mean"), (False, BF16, 3, 32003, "mean"), (False, FP16, 64, 8000, "none"),
]


def _targets(g, rows, vocab, dev):
    t = randint(g, vocab, (rows,), dev)
    if rows > 1:
        t[1] = IGNORE  # one ignored row
    return t


def _cross_entropy(o, k, dev, g, dtype, rows, vocab, red):
    logits = randn(g, (rows, vocab), dtype, dev, 3.0)
    t = _targets(g, rows, vocab, dev)
    f32 = torch.float32
    dloss = randn(g, (rows,), f32, dev) if red == "none" else torch.full((), 0.75, dtype=f32, device=dev)
    poison(dev, 4 * logits.numel() * logits.element_size())
    loss, grad, status = k.cross_entropy_fwd(logits, t, IGNORE, red, True)
    k.cross_entropy_scale_grad_(grad, dloss.reshape(-1).contiguous())  # the backward: in place
    sync(dev)
    f = lambda lg: F.cross_entropy(lg, t, ignore_index=IGNORE, reduction=red)  # noqa: E731
    (l64,), (g64,) = tm(f, [logits], [dloss], F64)
    (ll,), (gl,) = tm(f, [logits], [dloss], dtype)
    counts = status.tolist()
    o.expect(counts[:2] == [int((t != IGNORE).sum()), 0], f"status {counts}: expected [valid rows, 0, 0]")
    o.add("loss", loss, l64, ll)
    o.add("dlogits", grad, g64, gl)


def check_cross_entropy(k, device, quick=False):
    return _run(k, device, quick, "cross_entropy", "cross_entropy_fwd + scale_grad_", CE_CASES,
                lambda dt, r, v, red: f"{dtype_name(dt)} {r}x{v} {red}", _cross_entropy)


LCE_CASES = [  # quick, dtype, rows, features, vocab, bias, chunk, reduction
    (True, BF16, 13, 64, 1000, True, 8, "mean"), (True, FP16, 37, 136, 2053, False, 16, "sum"),
    (False, BF16, 129, 128, 8000, True, 64, "mean"), (False, FP16, 1, 8, 5, True, 1, "mean"),
    (False, BF16, 64, 256, 50257, False, 40, "sum"),
]


def _linear_cross_entropy(o, k, dev, g, dtype, rows, feats, vocab, bias, chunk, red):
    x = randn(g, (rows, feats), dtype, dev)
    w = randn(g, (vocab, feats), dtype, dev, 2.0 / math.sqrt(feats))
    b = randn(g, (vocab,), dtype, dev) if bias else None
    t = _targets(g, rows, vocab, dev)
    poison(dev, 4 * (w.numel() + rows * vocab) * x.element_size())
    loss, dx, dw, db, status = k.linear_cross_entropy_fwd(x, w, b, t, IGNORE, red, chunk, True)
    sync(dev)
    f = lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, ignore_index=IGNORE, reduction=red)  # noqa: E731
    one = torch.ones((), dtype=torch.float32, device=dev)
    (l64,), (dx64, dw64, db64) = tm(f, [x, w, b], [one], F64)
    (ll,), (dxl, dwl, dbl) = tm(f, [x, w, b], [one], dtype)
    counts = status.tolist()
    o.expect(counts[:2] == [int((t != IGNORE).sum()), 0], f"status {counts}: expected [valid rows, 0, 0]")
    o.add("loss", loss, l64, ll)
    o.add("dx", dx, dx64, dxl)
    o.add("dweight", dw, dw64, dwl)
    if bias:
        o.add("dbias", db, db64, dbl)


def check_linear_cross_entropy(k, device, quick=False):
    def describe(dt, n, c, v, b, ch, red):
        return f"{dtype_name(dt)} x {n}x{c} vocab {v}{' bias' if b else ''} chunk {ch} {red}"
    return _run(k, device, quick, "linear_cross_entropy", "linear_cross_entropy_fwd", LCE_CASES, describe,
                _linear_cross_entropy, floor_ulps=4.0)


# ---- MLP epilogues (cuBLASLt) -----------------------------------------------------------------

LINEAR_CASES = [  # quick, dtype, rows, in, out, activation, bias
    (True, BF16, 37, 256, 384, "gelu_tanh", True), (True, FP16, 7, 64, 136, "relu", True),
    (False, FP16, 1, 8, 32, "gelu", True), (False, BF16, 33, 128, 200, "none", False),
    (False, FP16, 129, 136, 256, "gelu_tanh", False), (False, BF16, 5, 64, 128, "relu", False),
]
MLP_CASES = [  # quick, dtype, rows, in, hidden, out, activation, bias
    (True, FP16, 7, 64, 256, 64, "gelu_tanh", True), (True, BF16, 33, 128, 256, 200, "relu", True),
    (False, BF16, 1, 8, 32, 8, "gelu", True), (False, FP16, 129, 64, 136, 64, "relu", False),
    (False, BF16, 64, 256, 1024, 256, "gelu", False), (False, FP16, 5, 136, 384, 72, "gelu_tanh", True),
]


def _params(g, dev, dtype, fan_in, out, bias):
    return randn(g, (out, fan_in), dtype, dev, 1 / math.sqrt(fan_in)), (randn(g, (out,), dtype, dev) if bias else None)


def _linear_act(o, k, dev, g, dtype, rows, c, out, act, bias):
    x = randn(g, (rows, c), dtype, dev)
    w, b = _params(g, dev, dtype, c, out, bias)
    dy = randn(g, (rows, out), dtype, dev)
    poison(dev, 4 * (rows * out + w.numel()) * x.element_size())
    y, aux = k.linear_act_fwd(x, w, b, act, True)
    dx, dw, db = k.linear_act_bwd(dy, x, w, b, aux, y if act == "relu" else x.new_empty(0), act)
    sync(dev)
    f = lambda x, w, b: linear_act_ref(x, w, b, act)  # noqa: E731
    (y64,), (dx64, dw64, db64) = tm(f, [x, w, b], [dy], F64)
    (yl,), (dxl, dwl, dbl) = tm(f, [x, w, b], [dy], dtype)
    o.add("y", y, y64, yl)
    o.add("dx", dx, dx64, dxl)
    o.add("dweight", dw, dw64, dwl)
    if bias:
        o.add("dbias", db, db64, dbl)


def _mlp(o, k, dev, g, dtype, rows, c, hidden, out, act, bias):
    x = randn(g, (rows, c), dtype, dev)
    w1, b1 = _params(g, dev, dtype, c, hidden, bias)
    w2, b2 = _params(g, dev, dtype, hidden, out, bias)
    dy = randn(g, (rows, out), dtype, dev)
    poison(dev, 4 * (rows * hidden + w1.numel() + w2.numel()) * x.element_size())
    y, pre, h = k.mlp_fwd(x, w1, b1, w2, b2, act, True)
    dx, dw1, db1, dw2, db2 = k.mlp_bwd(dy, x, w1, b1, w2, b2, pre, h, act)
    sync(dev)
    f = lambda x, w1, b1, w2, b2: linear_act_ref(linear_act_ref(x, w1, b1, act), w2, b2, "none")  # noqa: E731
    (y64,), g64 = tm(f, [x, w1, b1, w2, b2], [dy], F64)
    (yl,), gl = tm(f, [x, w1, b1, w2, b2], [dy], dtype)
    o.add("y", y, y64, yl)
    for name, got, ref, base in zip(("dx", "dfc_weight", "dfc_bias", "dproj_weight", "dproj_bias"),
                                    (dx, dw1, db1, dw2, db2), g64, gl):
        if ref is not None:
            o.add(name, got, ref, base)


def check_mlp(k, device, quick=False):
    return (_run(k, device, quick, "mlp", "linear_act_fwd/bwd", LINEAR_CASES,
                 lambda dt, n, c, out, a, b: f"{dtype_name(dt)} {n}x{c}->{out} {a}{'' if b else ' no bias'}",
                 _linear_act, floor_ulps=4.0) +
            _run(k, device, quick, "mlp", "mlp_fwd/bwd", MLP_CASES,
                 lambda dt, n, c, h, out, a, b: f"{dtype_name(dt)} {n}x{c}->{h}->{out} {a}{'' if b else ' no bias'}",
                 _mlp, floor_ulps=4.0))


FAMILIES = {f.name: f for f in (
    Family("bias_act", "bias + activation", ("bias_act",), ("bias_act_fwd", "bias_act_bwd"), check_bias_act),
    Family("layer_norm", "LayerNorm, add + LayerNorm", ("layer_norm", "add_layer_norm"),
           ("layer_norm_fwd", "add_layer_norm_fwd", "layer_norm_bwd"), check_layer_norm),
    Family("cross_entropy", "cross-entropy", ("cross_entropy",), ("cross_entropy_fwd", "cross_entropy_scale_grad_"),
           check_cross_entropy),
    Family("linear_cross_entropy", "linear + cross-entropy", ("linear_cross_entropy",),
           ("linear_cross_entropy_fwd",), check_linear_cross_entropy),
    Family("mlp", "linear / MLP epilogues", ("linear_act", "mlp"),
           ("linear_act_fwd", "linear_act_bwd", "mlp_fwd", "mlp_bwd"), check_mlp),
    Family("attention", "attention fwd / bwd / decode", ("flash_attention", "flash_attention_varlen", "scaled_dot_product_attention"),
           ("flash_attn_fwd", "flash_attn_bwd", "flash_attn_decode", "flash_attn_varlen_fwd", "flash_attn_varlen_bwd",
            "flash_attn_varlen_decode"), attention_checks.check_attention),
)}
OP_FAMILY = {op: f.name for f in FAMILIES.values() for op in f.ops}
