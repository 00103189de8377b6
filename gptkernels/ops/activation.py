"""bias + activation: y = act(x + bias), act in {GELU (tanh approximation), GELU (erf), ReLU}.

Paths (gptkernels._backend): the kernel, csrc/activation/bias_act.cu (torch.ops.gptkernels.bias_act_fwd
/ bias_act_bwd; any shape, the dtypes of csrc/activation/activation_limits.h); on a GPU otherwise torch's
F.gelu / F.relu of x + bias; the reference, the same math in fp32 cast back to x's dtype.
The backward recomputes u = x + bias from the saved input, so only x is kept for backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gptkernels import _backend, _limits
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
if _backend.has_kernel("bias_act_fwd"):
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


# ---- dispatch ---------------------------------------------------------------------------------
LIMITS = _limits.family("activation")
_HAVE = _backend.has_kernel("bias_act_fwd")


def _unsupported(x) -> str | None:
    """None when the kernel takes this call, else why not."""
    if not _HAVE:
        return "not in this build of the extension"
    if x.dtype not in _limits.dtypes(LIMITS):
        return f"dtype {str(x.dtype)[6:]}"
    return None


def _bias_act_kernel(x, bias, activation):
    return torch.ops.gptkernels.bias_act_fwd(x.contiguous(), bias.contiguous(), activation)


def _bias_act_torch(x, bias, activation):
    return act_ref(x + bias, activation)


# What each path (gptkernels._backend) runs.
BIAS_ACT = {"kernel": _bias_act_kernel, "torch": _bias_act_torch, "reference": bias_act_fwd_ref}


def bias_act(x: torch.Tensor, bias: torch.Tensor, activation: str = "gelu_tanh") -> torch.Tensor:
    """y = act(x + bias) over the last dimension of x; differentiable in x and bias."""
    check_tensor("x", x, min_ndim=1)
    _check_activation(activation)
    check_tensor("bias", bias, ndim=1)
    check_same_device("bias", bias, "x", x)
    if bias.shape[0] != x.shape[-1]:
        raise ValueError(f"bias: expected shape ({x.shape[-1]},) to match x's last dimension, got {tuple(bias.shape)}")
    bias = param_like("bias", bias, x)
    return BIAS_ACT[_backend.path("bias_act", (x, bias), _unsupported(x))](x, bias, activation)
