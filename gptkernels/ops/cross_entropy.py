"""Softmax cross-entropy over the last dimension of logits (language-model loss).

  loss_i = logsumexp(logits_i) - logits_i[target_i]; rows with target == ignore_index count 0
  reduction "mean" divides by the number of non-ignored rows (nan when all are ignored, as torch),
  "sum" adds, "none" returns the per-row losses.
The loss is computed in fp32 and returned in fp32 (as torch does under autocast).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gptkernels._checks import check_same_device, check_tensor

REDUCTIONS = ("mean", "sum", "none")


def cross_entropy_ref(logits, target, ignore_index: int = -100, reduction: str = "mean"):
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)


def check_cross_entropy(logits, target, reduction: str):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    check_tensor("logits", logits, ndim=2)
    check_tensor("target", target, dtypes=(torch.int64, torch.int32), ndim=1)
    check_same_device("target", target, "logits", logits)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"target: expected shape ({logits.shape[0]},) to match logits' rows, got {tuple(target.shape)}")


def check_target_range(target, vocab: int, ignore_index: int):
    """Out-of-range targets raise here, not as a device-side assert. Syncs with the device once."""
    valid = target != ignore_index
    if bool(((target < 0) | (target >= vocab)).logical_and(valid).any()):
        bad = target[valid & ((target < 0) | (target >= vocab))][0].item()
        raise ValueError(f"target: values must be in [0, {vocab}) or ignore_index={ignore_index}; found {bad}")


def cross_entropy(logits, target, ignore_index: int = -100, reduction: str = "mean"):
    """Same arguments and result as torch.nn.functional.cross_entropy for (N, V) logits and (N,)
    class targets; the loss is fp32."""
    check_cross_entropy(logits, target, reduction)
    check_target_range(target, logits.shape[1], ignore_index)
    return cross_entropy_ref(logits, target.long(), ignore_index, reduction)
