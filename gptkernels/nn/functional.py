"""Functional API: drop-ins for torch.nn.functional, each running a gptkernels kernel on CUDA
(when the extension is built and the call is supported) and the PyTorch reference otherwise."""
from __future__ import annotations

import torch

from gptkernels.ops.activation import bias_act


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GELU(x + bias); approximate="tanh" (GPT-2) or "none" (exact erf), as torch's F.gelu."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate: expected 'tanh' or 'none', got {approximate!r}")
    return bias_act(x, bias, "gelu_tanh" if approximate == "tanh" else "gelu")


def bias_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ReLU(x + bias)."""
    return bias_act(x, bias, "relu")


__all__ = ["bias_gelu", "bias_relu"]
