"""The kernels' limits, as the extension states them: read once, never retyped.

Each kernel family states its limits in one C++ header (csrc/<family>/<family>_limits.h: head dims,
row widths, length bounds, dtypes); the extension joins them into the op
`torch.ops.gptkernels.limits() -> str` (JSON), parsed here once. Without the extension there are no
kernels, and so no limits: `family()` returns {} and every op takes its PyTorch paths.
"""
from __future__ import annotations

import json

import torch

from gptkernels import _backend


def _load() -> dict:
    if not _backend.EXT_LOADED or not hasattr(torch.ops.gptkernels, "limits"):
        return {}
    return json.loads(torch.ops.gptkernels.limits())


LIMITS: dict = _load()


def family(name: str) -> dict:
    """The limits of one family ("attention", "layernorm", "loss", "mlp", "activation", "gemm")."""
    return LIMITS.get(name, {})


def dtypes(limits: dict) -> tuple:
    """The torch dtypes a family's "dtypes" entry names."""
    return tuple(getattr(torch, name) for name in limits.get("dtypes", ()))
