"""Functional API: drop-ins for torch.nn.functional, each running a gptkernels kernel on CUDA
(when the extension is built and the call is supported) and the PyTorch reference otherwise."""
from __future__ import annotations

import torch

from gptkernels.ops.activation import bias_act
from gptkernels.ops.attention import flash_attention, flash_attention_varlen, scaled_dot_product_attention
from gptkernels.ops.loss import cross_entropy, linear_cross_entropy
from gptkernels.ops.layernorm import add_layer_norm, layer_norm
from gptkernels.ops.mlp import fused_mlp, linear_act


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU(x + bias); approximate="tanh" (GPT-2) or "none" (exact erf), as torch's F.gelu."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate: expected 'tanh' or 'none', got {approximate!r}")
    return bias_act(x, bias, "gelu_tanh" if approximate == "tanh" else "gelu")


def bias_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ReLU(x + bias)."""
    return bias_act(x, bias, "relu")


__all__ = ["bias_gelu", "bias_relu", "layer_norm", "add_layer_norm", "scaled_dot_product_attention",
           "flash_attention", "flash_attention_varlen", "linear_act", "cross_entropy",
           "fused_mlp", "linear_cross_entropy"]
