"""Drop-in nn.Modules built on gptkernels.ops (state_dict-compatible with their torch twins)."""
from __future__ import annotations


import torch
from torch import nn

from gptkernels.ops.loss import REDUCTIONS, cross_entropy
from gptkernels.ops.layernorm import _normalized_shape, layer_norm
from gptkernels.ops.mlp import LINEAR_ACTIVATIONS, fused_mlp


class LayerNorm(nn.Module):
    """Same constructor, parameters and state_dict keys as torch.nn.LayerNorm."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **kw))
            self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **kw)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class FusedMLP(nn.Module):
    """proj(act(fc(x))): the GPT feed-forward block. Parameters fc.weight, fc.bias, proj.weight,
    proj.bias are ordinary nn.Linear parameters, so a GPT-2 checkpoint maps onto them."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 activation: str = "gelu", bias: bool = True, device=None, dtype=None):
        super().__init__()
        if activation not in LINEAR_ACTIVATIONS or activation == "none":
            raise ValueError(f"activation: expected 'gelu', 'gelu_tanh' or 'relu', got {activation!r}")
        self.activation = activation
        self.fc = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.proj = nn.Linear(hidden_features, out_features or in_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        # One op each way on the kernel path (torch.ops.gptkernels.mlp_fwd / mlp_bwd): the backward
        # applies act' in the epilogue of the proj input-gradient GEMM (see gptkernels/ops/mlp.py).
        return fused_mlp(x, self.fc.weight, self.fc.bias, self.proj.weight, self.proj.bias, self.activation)

    def extra_repr(self):
        return f"activation={self.activation!r}"


class CrossEntropyLoss(nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss with (N, V) logits and (N,) class targets."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, logits, target):
        return cross_entropy(logits, target, self.ignore_index, self.reduction)
