"""LayerNorm over the last dimension, and the fused residual add + LayerNorm of a GPT block.

  y = (x - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps)   (biased variance)
  add_layer_norm: s = residual + x; y = LayerNorm(s); returns (s, y). The residual stream needs s.

References compute in fp32 and return the input's dtype; the forward also returns the per-row
mean and rstd (fp32) that the backward uses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gptkernels._checks import check_same_device, check_tensor, param_like


def _normalized_shape(normalized_shape) -> tuple:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


def layer_norm_fwd_ref(x: torch.Tensor, weight, bias, eps: float):
    """x: [rows, C] -> (y [rows, C] in x's dtype, mean [rows] fp32, rstd [rows] fp32)."""
    xf = x.float()
    mean = xf.mean(-1)
    var = (xf - mean[:, None]).pow(2).mean(-1)
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), mean, rstd


def layer_norm_bwd_ref(dy: torch.Tensor, x: torch.Tensor, weight, mean: torch.Tensor, rstd: torch.Tensor):
    """Gradients of layer_norm_fwd_ref: (dx, dweight or None, dbias), fp32 math. dbias = sum of dy
    over rows (the caller drops it when there is no bias)."""
    xf, dyf = x.float(), dy.float()
    xhat = (xf - mean[:, None]) * rstd[:, None]
    g = dyf * weight.float() if weight is not None else dyf
    c = xf.shape[-1]
    dx = rstd[:, None] * (g - g.sum(-1, keepdim=True) / c - xhat * (g * xhat).sum(-1, keepdim=True) / c)
    dw = (dyf * xhat).sum(0).to(weight.dtype) if weight is not None else None
    db = dyf.sum(0).to(weight.dtype if weight is not None else x.dtype)
    return dx.to(x.dtype), dw, db


def _check_ln(x, normalized_shape, weight, bias, x_name="x"):
    check_tensor(x_name, x, min_ndim=1)
    shape = _normalized_shape(normalized_shape)
    if tuple(x.shape[-len(shape):]) != shape or len(shape) > x.dim():
        raise ValueError(f"normalized_shape: expected the trailing dimensions of {x_name} {tuple(x.shape)}, "
                         f"got {shape}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p)
            check_same_device(name, p, x_name, x)
            if tuple(p.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(p.shape)}")
    return shape, param_like("weight", weight, x, x_name), param_like("bias", bias, x, x_name)


def layer_norm(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """Same signature and result as torch.nn.functional.layer_norm."""
    shape, weight, bias = _check_ln(x, normalized_shape, weight, bias)
    return F.layer_norm(x, shape, weight, bias, eps)


def add_layer_norm(residual: torch.Tensor, x: torch.Tensor, weight=None, bias=None, eps: float = 1e-5):
    """s = residual + x; returns (s, layer_norm(s)) over the last dimension."""
    check_tensor("residual", residual, min_ndim=1)
    check_tensor("x", x, min_ndim=1)
    check_same_device("x", x, "residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"x: expected the shape of residual {tuple(residual.shape)}, got {tuple(x.shape)}")
    s = residual + x
    _, weight, bias = _check_ln(s, (s.shape[-1],), weight, bias, "residual")
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
