"""LayerNorm over the last dimension, and the fused residual add + LayerNorm of a GPT block.

  y = (x - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps)   (biased variance)
  add_layer_norm: s = residual + x; y = LayerNorm(s); returns (s, y). The residual stream needs s.

Paths (gptkernels._backend): the kernel, csrc/layernorm/layer_norm.cu (torch.ops.gptkernels.layer_norm_fwd
/ add_layer_norm_fwd / layer_norm_bwd; rows of LIMITS["min_cols"] to LIMITS["max_cols"] elements, from
csrc/layernorm/layernorm_limits.h); otherwise, on a GPU and on the CPU alike, torch's F.layer_norm
(the math reference below, several times slower on a CPU, is the ops' CPU implementation and the
tests' oracle). References compute in fp32 and return the input's dtype; the forward also returns
the per-row mean and rstd (fp32, x's leading shape) that the backward uses.

Dtypes: x, residual, weight and bias share one dtype (fp32, fp16 or bf16); statistics and
accumulation are fp32. Under autocast, fp32 parameters are cast to x's dtype (_checks.param_like),
so a bf16 x is normalised in bf16 storage with fp32 math (torch's autocast would return fp32), and
the fp32 residual stream of an autocast GPT is normalised in fp32. add_layer_norm with residual and
x of different dtypes first casts both to the promoted dtype, as `residual + x` would.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gptkernels import _backend, _limits
from gptkernels._checks import check_same_device, check_tensor, param_like


def _normalized_shape(normalized_shape) -> tuple:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


# ---- references (fp32 math; float64 inputs are computed in float64, for tests) --------------

def _math(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def layer_norm_fwd_ref(x: torch.Tensor, weight, bias, eps: float):
    """x: [..., C] -> (y [..., C] in x's dtype, mean [...] fp32, rstd [...] fp32)."""
    xf = _math(x)
    mean = xf.mean(-1)
    var = (xf - mean.unsqueeze(-1)).pow(2).mean(-1)  # two-pass: no cancellation with a large mean
    rstd = torch.rsqrt(var + eps)
    y = (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * _math(weight)
    if bias is not None:
        y = y + _math(bias)
    return y.to(x.dtype), mean, rstd


def layer_norm_bwd_ref(dy: torch.Tensor, x: torch.Tensor, weight, mean: torch.Tensor, rstd: torch.Tensor,
                       ds: torch.Tensor | None = None):
    """Gradients of layer_norm_fwd_ref: (dx, dweight or None, dbias), fp32 math. dbias = sum of dy
    over rows (the caller drops it when there is no bias). ds, the gradient reaching the input
    directly (add_layer_norm's s), is added to dx before rounding."""
    xf, dyf = _math(x), _math(dy)
    xhat = (xf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    g = dyf * _math(weight) if weight is not None else dyf
    c = xf.shape[-1]
    dx = rstd.unsqueeze(-1) * (g - g.sum(-1, keepdim=True) / c - xhat * (g * xhat).sum(-1, keepdim=True) / c)
    if ds is not None:
        dx = dx + _math(ds)
    dw = (dyf * xhat).reshape(-1, c).sum(0).to(weight.dtype) if weight is not None else None
    db = dyf.reshape(-1, c).sum(0).to(weight.dtype if weight is not None else x.dtype)
    return dx.to(x.dtype), dw, db


def add_layer_norm_fwd_ref(residual: torch.Tensor, x: torch.Tensor, weight, bias, eps: float):
    """(s, y, mean, rstd) with s = residual + x rounded to x's dtype and y = LayerNorm(s)."""
    s = (_math(residual) + _math(x)).to(x.dtype)
    y, mean, rstd = layer_norm_fwd_ref(s, weight, bias, eps)
    return s, y, mean, rstd


def _layer_norm_bwd_op_ref(dy, x, weight, mean, rstd, has_bias: bool, ds=None):
    """The op gptkernels::layer_norm_bwd on the reference: absent gradients are empty tensors."""
    dx, dw, db = layer_norm_bwd_ref(dy, x, weight, mean, rstd, ds)
    return dx, dw if dw is not None else x.new_empty(0), db if has_bias else x.new_empty(0)


# ---- torch.library registration (schemas come from the C++ extension) ---------------------
if _backend.has_kernel("layer_norm_fwd"):
    def _stats_like(x):
        return x.new_empty(x.shape[:-1], dtype=torch.float32), x.new_empty(x.shape[:-1], dtype=torch.float32)

    @torch.library.register_fake("gptkernels::layer_norm_fwd")
    def _layer_norm_fwd_fake(x, weight, bias, eps):
        return (torch.empty_like(x), *_stats_like(x))

    @torch.library.register_fake("gptkernels::add_layer_norm_fwd")
    def _add_layer_norm_fwd_fake(residual, x, weight, bias, eps):
        return (torch.empty_like(x), torch.empty_like(x), *_stats_like(x))

    @torch.library.register_fake("gptkernels::layer_norm_bwd")
    def _layer_norm_bwd_fake(dy, x, weight, mean, rstd, has_bias, ds=None):
        return (torch.empty_like(x), torch.empty_like(weight) if weight is not None else x.new_empty(0),
                x.new_empty(x.shape[-1]) if has_bias else x.new_empty(0))

    # The CPU implementation is the reference: the ops run (and opcheck) anywhere.
    torch.library.impl("gptkernels::layer_norm_fwd", "CPU")(layer_norm_fwd_ref)
    torch.library.impl("gptkernels::add_layer_norm_fwd", "CPU")(add_layer_norm_fwd_ref)
    torch.library.impl("gptkernels::layer_norm_bwd", "CPU")(_layer_norm_bwd_op_ref)

    def _ln_setup(ctx, inputs, output):
        x, weight, bias, _eps = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, rstd)

    def _ln_backward(ctx, dy, _dmean, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.gptkernels.layer_norm_bwd(dy.contiguous(), x, weight, mean, rstd, ctx.has_bias, None)
        return dx, dw if ctx.has_weight else None, db if ctx.has_bias else None, None

    torch.library.register_autograd("gptkernels::layer_norm_fwd", _ln_backward, setup_context=_ln_setup)

    def _add_ln_setup(ctx, inputs, output):
        _residual, _x, weight, bias, _eps = inputs
        s, _y, mean, rstd = output
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, rstd)

    def _add_ln_backward(ctx, ds, dy, _dmean, _drstd):
        # ds_total = ds (s used downstream: the residual stream) + LayerNorm backward of dy, in one
        # kernel; d residual = d x = ds_total.
        s, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(s)
        dx, dw, db = torch.ops.gptkernels.layer_norm_bwd(dy.contiguous(), s, weight, mean, rstd, ctx.has_bias,
                                                         ds.contiguous() if ds is not None else None)
        return dx, dx, dw if ctx.has_weight else None, db if ctx.has_bias else None, None

    torch.library.register_autograd("gptkernels::add_layer_norm_fwd", _add_ln_backward, setup_context=_add_ln_setup)


# ---- dispatch ---------------------------------------------------------------------------------
LIMITS = _limits.family("layernorm")
_HAVE = _backend.has_kernel("layer_norm_fwd")


def _unsupported(x, cols: int) -> str | None:
    """None when the kernels take rows of `cols` elements of x's dtype, else why not."""
    if not _HAVE:
        return "not in this build of the extension"
    if x.dtype not in _limits.dtypes(LIMITS):
        return f"dtype {str(x.dtype)[6:]}"
    if not LIMITS["min_cols"] <= cols <= LIMITS["max_cols"]:
        return f"normalized size {cols} is outside the kernel's range [{LIMITS['min_cols']}, {LIMITS['max_cols']}]"
    return None


def _check_ln(x, normalized_shape, weight, bias, x_name="x"):
    check_tensor(x_name, x, min_ndim=1)
    shape = _normalized_shape(normalized_shape)
    if not shape or len(shape) > x.dim() or tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"normalized_shape: expected the trailing dimensions of {x_name} {tuple(x.shape)}, "
                         f"got {shape}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p)
            check_same_device(name, p, x_name, x)
            if tuple(p.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(p.shape)}")
    return shape, param_like("weight", weight, x, x_name), param_like("bias", bias, x, x_name)


def _flat(p, cols):
    return p.reshape(cols).contiguous() if p is not None else None


def _rows(x, shape):
    """x viewed as rows of the normalized size."""
    cols = math.prod(shape)
    return x.reshape(*x.shape[:x.dim() - len(shape)], cols), cols


def _layer_norm_kernel(x, shape, weight, bias, eps):
    x2, cols = _rows(x, shape)
    y, _, _ = torch.ops.gptkernels.layer_norm_fwd(x2.contiguous(), _flat(weight, cols), _flat(bias, cols), float(eps))
    return y.view(x.shape)


def _add_layer_norm_kernel(residual, x, weight, bias, eps):
    s, y, _, _ = torch.ops.gptkernels.add_layer_norm_fwd(residual.contiguous(), x.contiguous(), _c(weight), _c(bias),
                                                          float(eps))
    return s, y


def _add_layer_norm_torch(residual, x, weight, bias, eps):
    s = residual + x
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)


def _c(t):
    return t.contiguous() if t is not None else None


# What each path (gptkernels._backend) runs: torch's F.layer_norm off the kernel, on any device.
LAYER_NORM = {"kernel": _layer_norm_kernel, "torch": F.layer_norm, "reference": F.layer_norm}
ADD_LAYER_NORM = {"kernel": _add_layer_norm_kernel, "torch": _add_layer_norm_torch,
                  "reference": _add_layer_norm_torch}


def layer_norm(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """Same signature and result as torch.nn.functional.layer_norm (a multi-dimensional
    normalized_shape normalises the trailing dimensions together, as one row)."""
    shape, weight, bias = _check_ln(x, normalized_shape, weight, bias)
    fn = LAYER_NORM[_backend.path("layer_norm", (x, weight, bias), _unsupported(x, math.prod(shape)))]
    return fn(x, shape, weight, bias, eps)


def add_layer_norm(residual: torch.Tensor, x: torch.Tensor, weight=None, bias=None, eps: float = 1e-5):
    """s = residual + x; returns (s, layer_norm(s)) over the last dimension. Differentiable in
    residual, x, weight and bias (the gradient reaching s from both uses is summed)."""
    check_tensor("residual", residual, min_ndim=1)
    check_tensor("x", x, min_ndim=1)
    check_same_device("x", x, "residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"x: expected the shape of residual {tuple(residual.shape)}, got {tuple(x.shape)}")
    if residual.dtype != x.dtype:  # cast both to what residual + x would give
        dtype = torch.promote_types(residual.dtype, x.dtype)
        residual, x = residual.to(dtype), x.to(dtype)
    _, weight, bias = _check_ln(residual, (residual.shape[-1],), weight, bias, "residual")
    fn = ADD_LAYER_NORM[_backend.path("add_layer_norm", (residual, x, weight, bias),
                                      _unsupported(x, residual.shape[-1]))]
    return fn(residual, x, weight, bias, eps)
