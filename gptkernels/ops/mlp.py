"""Linear layers with fused bias + activation epilogues, and the GPT feed-forward block.

  linear_act(x, W, b, act) = act(x @ W^T + b),  act in {"gelu_tanh", "gelu", "relu", "none"}
  FFN: proj(act(fc(x))): Linear(C -> H) -> act -> Linear(H -> C)

The reference is torch's F.linear followed by the activation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gptkernels._checks import check_same_device, check_tensor, param_like
from gptkernels.ops.activation import act_ref

LINEAR_ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "none")


def linear_act_ref(x, weight, bias, activation: str):
    y = F.linear(x, weight, bias)
    return y if activation == "none" else act_ref(y, activation)


def check_linear(x, weight, bias, activation: str):
    if activation not in LINEAR_ACTIVATIONS:
        raise ValueError(f"activation: expected one of {LINEAR_ACTIVATIONS}, got {activation!r}")
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_same_device("weight", weight, "x", x)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected shape (out_features, {x.shape[-1]}) to match x's last dimension, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same_device("bias", bias, "x", x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return param_like("weight", weight, x), param_like("bias", bias, x)


def linear_act(x, weight, bias=None, activation: str = "none"):
    """act(x @ weight^T + bias); differentiable in x, weight and bias."""
    weight, bias = check_linear(x, weight, bias, activation)
    return linear_act_ref(x, weight, bias, activation)
