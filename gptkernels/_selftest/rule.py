"""The error rule every kernel check uses (the self-test and the CUDA tests): FlashAttention's.

A kernel's result `got` is compared with a high-precision reference `ref` of the same inputs (fp64,
or fp32 math where that is what the reference computes) and with `base`, the same math done by
PyTorch in the kernel's low precision. The kernel passes when

    max|got - ref|  <=  2 * max|base - ref|  +  floor_ulps * u(dtype) * max(max|ref|, min_scale)

u is the unit roundoff of the storage dtype. The floor covers outputs that torch's low-precision
math happens to get exactly right (its error 0); for an all-zero reference its scale is 1. A NaN in
`got` fails (the error is NaN); infinities of the same sign in `got` and `ref` count as equal (e.g.
the -inf log-sum-exp of a fully masked row).
"""
from __future__ import annotations

import math

import torch

# Unit roundoff of each storage type: the error of one rounding to that type, relative.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over all elements (0 for empty tensors); NaN when `a` has a NaN that `b` lacks."""
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:
        return 0.0
    same_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    d = (a - b).abs().masked_fill(same_inf, 0.0)
    if bool(torch.isnan(d).any()):
        return math.nan
    return d.max().item()


def max_abs(t: torch.Tensor) -> float:
    """max |t| over the finite elements (0 for none)."""
    t = t.detach().double()
    t = t[torch.isfinite(t)]
    return t.abs().max().item() if t.numel() else 0.0


def baseline_bound(ref: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, floor_ulps: float = 2.0,
                   min_scale: float = 0.0) -> float:
    """The largest error allowed for a kernel result stored in `dtype` (see the module docstring)."""
    scale = max(max_abs(ref), min_scale) or 1.0
    return 2.0 * max_err(base, ref) + floor_ulps * UNIT_ROUNDOFF[dtype] * scale


def compare(got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, floor_ulps: float = 2.0,
            min_scale: float = 0.0) -> tuple[float, float]:
    """(error of got, bound): the kernel passes when error <= bound (a NaN error never does)."""
    if tuple(got.shape) != tuple(ref.shape):
        raise ValueError(f"shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    return max_err(got, ref), baseline_bound(ref, base, dtype, floor_ulps, min_scale)
