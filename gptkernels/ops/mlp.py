"""Linear layers with fused bias + activation epilogues, and the GPT feed-forward block.

  linear_act(x, W, b, act) = act(x @ W^T + b),  act in {"gelu_tanh", "gelu", "relu", "none"}
  fused_mlp(x, W1, b1, W2, b2, act) = act(x @ W1^T + b1) @ W2^T + b2   (the FFN: Linear -> act -> Linear)

Kernel: csrc/mlp/ (cuBLASLt GEMMs with fused epilogues, see mlp_binding.cpp for what each activation
saves and how its derivative is applied): torch.ops.gptkernels.linear_act_fwd / linear_act_bwd and
mlp_fwd / mlp_bwd. The FFN is one op each way, because the fusion that matters crosses the layers:
the backward applies GELU'/ReLU' of layer 1 in the epilogue of layer 2's input-gradient GEMM
(DGELU_BGRAD / DRELU_BGRAD), which also reduces layer 1's bias gradient, and layer 2's weight-gradient
GEMM gives its bias gradient (BGRADB). A standalone linear_act cannot do that (its backward needs the
derivative before its own GEMMs), so it applies the derivative with the bias_act kernel.

Paths (gptkernels._backend): the kernel path takes CUDA tensors of the dtypes and feature sizes of
csrc/mlp/mlp_limits.h (float16/bfloat16 with fp32 accumulate, features a multiple of 8; any number of
tokens); everything else (float32 included: torch's F.linear, with TF32 if the user enabled it), on a
GPU and on the CPU alike, runs torch's F.linear followed by the activation, which is also the
reference. When cuBLASLt has no algorithm for a fused epilogue, the kernel path itself falls back to
a plain GEMM plus the bias/activation kernels, with a one-time warning (csrc/mlp/mlp_binding.cpp).
Autocast: like F.linear, under torch.autocast the input and parameters are cast to the autocast dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gptkernels import _backend, _limits
from gptkernels._checks import autocast_inputs, check_same_device, check_tensor, param_like
from gptkernels.ops.activation import act_grad_ref, act_ref, bias_act_fwd_ref

LINEAR_ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "none")
MLP_ACTIVATIONS = ("gelu_tanh", "gelu", "relu")


def linear_act_ref(x, weight, bias, activation: str):
    y = F.linear(x, weight, bias)
    return y if activation == "none" else act_ref(y, activation)


def check_linear(x, weight, bias, activation: str, x_name: str = "x", prefix: str = ""):
    if activation not in LINEAR_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {LINEAR_ACTIVATIONS}, got {activation!r}")
    check_tensor(x_name, x, min_ndim=1)
    check_tensor(prefix + "weight", weight, ndim=2)
    check_same_device(prefix + "weight", weight, x_name, x)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{prefix}weight: expected shape (out_features, {x.shape[-1]}) to match {x_name}'s last "
                         f"dimension, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(prefix + "bias", bias, ndim=1)
        check_same_device(prefix + "bias", bias, x_name, x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return param_like(prefix + "weight", weight, x, x_name), param_like(prefix + "bias", bias, x, x_name)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


# ---- CPU / reference implementations of the ops (same outputs as the CUDA kernels) ----------

def _linear_act_fwd_ref(x, weight, bias, activation: str, save_for_backward: bool):
    empty = x.new_empty(0)
    if activation == "gelu":  # saves z = x W^T (bias not added), as the kernel
        z = F.linear(x, weight)
        b = bias if bias is not None else x.new_zeros(weight.shape[0])
        return bias_act_fwd_ref(z, b, "gelu"), (z if save_for_backward else empty)
    u = F.linear(x, weight, bias)
    if activation == "gelu_tanh":
        return act_ref(u, activation), (u if save_for_backward else empty)
    return (act_ref(u, activation) if activation == "relu" else u), empty


def _act_derivative(g, activation, pre, bias, out):
    """g * act'(u) in fp32. pre: u (gelu_tanh) or z = u - bias (gelu); out: act(u) (relu)."""
    if activation == "gelu_tanh":
        return g * act_grad_ref(pre.float(), "gelu_tanh")
    if activation == "gelu":
        u = pre.float() + (bias.float() if bias is not None else 0.0)
        return g * act_grad_ref(u, "gelu")
    if activation == "relu":
        return g * (out > 0)
    return g


def _linear_act_bwd_ref(dy, x, weight, bias, aux, y, activation: str):
    g = _act_derivative(dy.float(), activation, aux, bias, y)
    dx = (g @ weight.float()).to(x.dtype)
    dw = (g.t() @ x.float()).to(weight.dtype)
    db = g.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx, dw, db


def _relu_mask_ref(u):
    """The ReLU bit mask saved on the kernel path: [n, H/8] bytes, bit j of byte k = u[:, 8k+j] > 0.
    (Only its shape must match the kernel's; the kernel's own bit order is cuBLASLt's and only
    mlp_bwd reads it.)"""
    n, h = u.shape
    bits = (u > 0).reshape(n, h // 8, 8).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=u.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def _mlp_fwd_ref(x, fc_weight, fc_bias, proj_weight, proj_bias, activation: str, save_for_backward: bool):
    hidden = fc_weight.shape[0]
    empty = x.new_empty(0)
    if activation == "gelu":
        z = F.linear(x, fc_weight)
        b = fc_bias if fc_bias is not None else x.new_zeros(hidden)
        h = bias_act_fwd_ref(z, b, "gelu")
        pre = z if save_for_backward else empty
    else:
        u = F.linear(x, fc_weight, fc_bias)
        h = act_ref(u, activation)
        if activation == "gelu_tanh":
            pre = u if save_for_backward else empty
        else:
            pre = _relu_mask_ref(u) if (save_for_backward and hidden % 128 == 0) else empty
    return F.linear(h, proj_weight, proj_bias), pre, h


def _mlp_bwd_ref(dy, x, fc_weight, fc_bias, proj_weight, proj_bias, pre, h, activation: str):
    g = dy.float()
    hf = h.float()
    dw2 = (g.t() @ hf).to(proj_weight.dtype)
    db2 = g.sum(0).to(proj_bias.dtype) if proj_bias is not None else x.new_empty(0)
    du = _act_derivative(g @ proj_weight.float(), activation, pre, fc_bias, hf)
    db1 = du.sum(0).to(fc_bias.dtype) if fc_bias is not None else x.new_empty(0)
    dw1 = (du.t() @ x.float()).to(fc_weight.dtype)
    dx = (du @ fc_weight.float()).to(x.dtype)
    return dx, dw1, db1, dw2, db2


def _pre_shape(activation, n, hidden, save):
    """Shape and dtype of mlp_fwd's saved `pre`: the pre-activation, the ReLU bit mask, or empty."""
    if not save:
        return (0,), None
    if activation == "relu":
        return ((n, hidden // 8), torch.uint8) if hidden % 128 == 0 else ((0,), None)
    return (n, hidden), None


def _check_saved(saved: bool, op: str) -> None:
    if not saved:
        raise RuntimeError(f"gptkernels.{op}: backward needs the forward to run with save_for_backward=True")


# ---- torch.library registration (schemas come from the C++ extension) ---------------------
if _backend.has_kernel("mlp_fwd"):
    @torch.library.register_fake("gptkernels::linear_act_fwd")
    def _(x, weight, bias, activation, save_for_backward):
        n, out = x.shape[0], weight.shape[0]
        keep = save_for_backward and activation in ("gelu", "gelu_tanh")
        return x.new_empty(n, out), (x.new_empty(n, out) if keep else x.new_empty(0))

    @torch.library.register_fake("gptkernels::linear_act_bwd")
    def _(dy, x, weight, bias, aux, y, activation):
        return torch.empty_like(x), torch.empty_like(weight), (torch.empty_like(bias) if bias is not None
                                                               else x.new_empty(0))

    @torch.library.register_fake("gptkernels::mlp_fwd")
    def _(x, fc_weight, fc_bias, proj_weight, proj_bias, activation, save_for_backward):
        n, hidden, out = x.shape[0], fc_weight.shape[0], proj_weight.shape[0]
        shape, dtype = _pre_shape(activation, n, hidden, save_for_backward)
        return x.new_empty(n, out), x.new_empty(shape, dtype=dtype or x.dtype), x.new_empty(n, hidden)

    @torch.library.register_fake("gptkernels::mlp_bwd")
    def _(dy, x, fc_weight, fc_bias, proj_weight, proj_bias, pre, h, activation):
        e = x.new_empty(0)
        return (torch.empty_like(x), torch.empty_like(fc_weight),
                torch.empty_like(fc_bias) if fc_bias is not None else e, torch.empty_like(proj_weight),
                torch.empty_like(proj_bias) if proj_bias is not None else x.new_empty(0))

    torch.library.impl("gptkernels::linear_act_fwd", "CPU")(_linear_act_fwd_ref)
    torch.library.impl("gptkernels::linear_act_bwd", "CPU")(_linear_act_bwd_ref)
    torch.library.impl("gptkernels::mlp_fwd", "CPU")(_mlp_fwd_ref)
    torch.library.impl("gptkernels::mlp_bwd", "CPU")(_mlp_bwd_ref)

    def _linear_setup(ctx, inputs, output):
        x, weight, bias, activation, save = inputs
        y, aux = output
        ctx.mark_non_differentiable(aux)
        ctx.set_materialize_grads(False)
        ctx.activation, ctx.saved = activation, save
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, bias, aux, y if activation == "relu" else None)

    def _linear_backward(ctx, dy, _daux):
        if dy is None:
            return None, None, None, None, None
        _check_saved(ctx.saved, "linear_act_fwd")
        x, weight, bias, aux, y = ctx.saved_tensors
        if y is None:
            y = x.new_empty(0)
        dx, dw, db = torch.ops.gptkernels.linear_act_bwd(dy.contiguous(), x, weight, bias, aux, y, ctx.activation)
        return dx, dw, (db if ctx.has_bias else None), None, None

    torch.library.register_autograd("gptkernels::linear_act_fwd", _linear_backward, setup_context=_linear_setup)

    def _mlp_setup(ctx, inputs, output):
        x, w1, b1, w2, b2, activation, save = inputs
        _y, pre, h = output
        ctx.mark_non_differentiable(pre, h)
        ctx.set_materialize_grads(False)
        ctx.activation, ctx.saved = activation, save
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.save_for_backward(x, w1, b1, w2, b2, pre, h)

    def _mlp_backward(ctx, dy, _dpre, _dh):
        if dy is None:
            return (None,) * 7
        _check_saved(ctx.saved, "mlp_fwd")
        x, w1, b1, w2, b2, pre, h = ctx.saved_tensors
        dx, dw1, db1, dw2, db2 = torch.ops.gptkernels.mlp_bwd(dy.contiguous(), x, w1, b1, w2, b2, pre, h,
                                                              ctx.activation)
        return dx, dw1, (db1 if ctx.has_b1 else None), dw2, (db2 if ctx.has_b2 else None), None, None

    torch.library.register_autograd("gptkernels::mlp_fwd", _mlp_backward, setup_context=_mlp_setup)

# ---- dispatch ---------------------------------------------------------------------------------
LIMITS = _limits.family("mlp")
_HAVE_LINEAR = _backend.has_kernel("linear_act_fwd")
_HAVE_MLP = _backend.has_kernel("mlp_fwd")


def _unsupported(have: bool, x, features) -> str | None:
    """None when the cuBLASLt path takes x (after autocast) and these feature sizes, else why not."""
    if not have:
        return "not in this build of the extension"
    if x.dtype not in _limits.dtypes(LIMITS):
        return (f"{str(x.dtype)[6:]} inputs take the reference (F.linear); the cuBLASLt path is "
                f"{', '.join(LIMITS['dtypes'])}")
    m = LIMITS["feature_multiple"]
    if any(f % m or f == 0 for f in features):
        return f"feature sizes {tuple(features)} must be positive multiples of {m} on the cuBLASLt path"
    return None


def _flat(t):
    return t.reshape(-1, t.shape[-1]).contiguous()


def _c(t):
    return None if t is None else t.contiguous()


def _linear_act_kernel(x, weight, bias, activation):
    y, _aux = torch.ops.gptkernels.linear_act_fwd(_flat(x), weight.contiguous(), _c(bias), activation,
                                                   _needs_grad(x, weight, bias))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _fused_mlp_kernel(x, fc_weight, fc_bias, proj_weight, proj_bias, activation):
    y, _pre, _h = torch.ops.gptkernels.mlp_fwd(_flat(x), fc_weight.contiguous(), _c(fc_bias),
                                                proj_weight.contiguous(), _c(proj_bias), activation,
                                                _needs_grad(x, fc_weight, fc_bias, proj_weight, proj_bias))
    return y.reshape(*x.shape[:-1], proj_weight.shape[0])


def _fused_mlp_torch(x, fc_weight, fc_bias, proj_weight, proj_bias, activation):
    return linear_act_ref(linear_act_ref(x, fc_weight, fc_bias, activation), proj_weight, proj_bias, "none")


# What each path (gptkernels._backend) runs: F.linear + activation is both torch's path and the reference.
LINEAR_ACT = {"kernel": _linear_act_kernel, "torch": linear_act_ref, "reference": linear_act_ref}
FUSED_MLP = {"kernel": _fused_mlp_kernel, "torch": _fused_mlp_torch, "reference": _fused_mlp_torch}


def linear_act(x, weight, bias=None, activation: str = "none"):
    """act(x @ weight^T + bias); differentiable in x, weight and bias."""
    weight, bias = check_linear(x, weight, bias, activation)
    x, weight, bias = autocast_inputs(x, weight, bias)
    why = _unsupported(_HAVE_LINEAR, x, (x.shape[-1], weight.shape[0]))
    return LINEAR_ACT[_backend.path("linear_act", (x, weight, bias), why)](x, weight, bias, activation)


def fused_mlp(x, fc_weight, fc_bias, proj_weight, proj_bias, activation: str = "gelu_tanh"):
    """proj(act(fc(x))) = act(x @ fc_weight^T + fc_bias) @ proj_weight^T + proj_bias: the GPT
    feed-forward block, differentiable in x and every parameter (biases may be None)."""
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {MLP_ACTIVATIONS}, got {activation!r}")
    fc_weight, fc_bias = check_linear(x, fc_weight, fc_bias, activation, prefix="fc_")
    check_tensor("proj_weight", proj_weight, ndim=2)
    if proj_weight.shape[1] != fc_weight.shape[0]:
        raise ValueError(f"proj_weight: expected shape (out_features, {fc_weight.shape[0]}) to match the hidden "
                         f"width of fc_weight, got {tuple(proj_weight.shape)}")
    check_same_device("proj_weight", proj_weight, "x", x)
    proj_weight = param_like("proj_weight", proj_weight, x)
    if proj_bias is not None:
        check_tensor("proj_bias", proj_bias, ndim=1)
        check_same_device("proj_bias", proj_bias, "x", x)
        if proj_bias.shape[0] != proj_weight.shape[0]:
            raise ValueError(f"proj_bias: expected shape ({proj_weight.shape[0]},), got {tuple(proj_bias.shape)}")
        proj_bias = param_like("proj_bias", proj_bias, x)
    x, fc_weight, fc_bias, proj_weight, proj_bias = autocast_inputs(x, fc_weight, fc_bias, proj_weight, proj_bias)
    params = (fc_weight, fc_bias, proj_weight, proj_bias)
    why = _unsupported(_HAVE_MLP, x, (x.shape[-1], fc_weight.shape[0], proj_weight.shape[0]))
    return FUSED_MLP[_backend.path("fused_mlp", (x,) + params, why)](x, *params, activation)
