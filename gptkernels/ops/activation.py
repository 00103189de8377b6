"""bias + activation: y = act(x + bias), act in {GELU (tanh approximation), GELU (erf), ReLU}.

Kernel: csrc/activation/bias_act.cu (torch.ops.gptkernels.bias_act_fwd / bias_act_bwd).
Reference: the same math in PyTorch, in fp32, cast back to x's dtype.
The backward recomputes u = x + bias from the saved input, so only x is kept for backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gptkernels import _backend
from gptkernels._checks import check_same_device, check_tensor, param_like

ACTIVATIONS = ("gelu_tanh", "gelu", "relu")  # gelu = exact (erf) GELU, as torch's approximate="none"


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def act_ref(u: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(u)
    return F.gelu(u, approximate="tanh" if activation == "gelu_tanh" else "none")


def act_grad_ref(u: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(u) / du, written out (no autograd), in u's dtype."""
    if activation == "relu":
        return (u > 0).to(u.dtype)
    if activation == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (u + 0.044715 * u**3))
        return 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * k * (1 + 3 * 0.044715 * u * u)
    return 0.5 * (1 + torch.erf(u / math.sqrt(2.0))) + u * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)


def bias_act_fwd_ref(x: torch.Tensor, bias: torch.Tensor, activation: str) -> torch.Tensor:
    return act_ref(x.float() + bias.float(), activation).to(x.dtype)


def bias_act_bwd_ref(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, activation: str):
    g = dy.float() * act_grad_ref(x.float() + bias.float(), activation)
    return g.to(x.dtype), g.sum(dim=tuple(range(g.dim() - 1))).to(bias.dtype)  # over all rows


# ---- torch.library registration (schemas come from the C++ extension) ---------------------
if _backend.EXT_LOADED:
    torch.library.register_fake("gptkernels::bias_act_fwd")(lambda x, bias, activation: torch.empty_like(x))
    torch.library.register_fake("gptkernels::bias_act_bwd")(
        lambda dy, x, bias, activation: (torch.empty_like(x), torch.empty_like(bias)))
    # The CPU implementation is the reference: the ops run (and opcheck) anywhere.
    torch.library.impl("gptkernels::bias_act_fwd", "CPU")(bias_act_fwd_ref)
    torch.library.impl("gptkernels::bias_act_bwd", "CPU")(bias_act_bwd_ref)

    def _setup(ctx, inputs, output):
        x, bias, activation = inputs
        ctx.save_for_backward(x, bias)
        ctx.activation = activation

    def _backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx, dbias = torch.ops.gptkernels.bias_act_bwd(dy.contiguous(), x, bias, ctx.activation)
        return dx, dbias, None

    torch.library.register_autograd("gptkernels::bias_act_fwd", _backward, setup_context=_setup)


def bias_act(x: torch.Tensor, bias: torch.Tensor, activation: str = "gelu_tanh") -> torch.Tensor:
    """y = act(x + bias) over the last dimension of x; differentiable in x and bias."""
    check_tensor("x", x, min_ndim=1)
    _check_activation(activation)
    check_tensor("bias", bias, ndim=1)
    check_same_device("bias", bias, "x", x)
    if bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias: expected shape ({x.shape[-1]},) to match x's last dimension, got {tuple(bias.shape)}")
    bias = param_like("bias", bias, x)
    if _backend.use_kernel("bias_act", (x, bias)):
        return torch.ops.gptkernels.bias_act_fwd(x.contiguous(), bias.contiguous(), activation)
    return act_ref(x + bias, activation)
