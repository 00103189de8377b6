"""Attention's argument checks: every bad input is one ValueError (TypeError for a non-tensor) naming
the argument and what was expected. The varlen value checks (cu_seqlens against the totals and the
max_seqlen bounds) read the bounds on the host once per call; they are skipped while torch.compile
traces and when the caller passes check_inputs=False.
"""
from __future__ import annotations

import math

import torch

from gptkernels._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor
from gptkernels.ops.attention_ref import to_bhsd

LAYOUTS = ("bhsd", "bshd")


def check_attention_inputs(q, k, v, layout: str, kv_lens=None, dtypes=FLOAT_DTYPES):
    """Shapes (B, Hq, Sq, D) / (B, Hkv, Sk, D) in the given layout; returns (B, Hq, Hkv, Sq, Sk, D)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    _check_qkv(q, k, v, 4, dtypes)
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    B, Hq, Sq, D = qb.shape
    if kb.shape[0] != B:
        raise ValueError(f"k: batch {kb.shape[0]} does not match q's batch {B}")
    Hkv, Sk = kb.shape[1], kb.shape[2]
    _check_heads(Hq, Hkv, D, kb.shape[3])
    if kv_lens is not None:
        check_tensor("kv_lens", kv_lens, dtypes=(torch.int32, torch.int64), ndim=1)
        check_same_device("kv_lens", kv_lens, "q", q)
        if kv_lens.shape[0] != B:
            raise ValueError(f"kv_lens: expected shape ({B},), got {tuple(kv_lens.shape)}")
    return B, Hq, Hkv, Sq, Sk, D


def _check_qkv(q, k, v, ndim, dtypes):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=dtypes, ndim=ndim)
    check_same_dtype("k", k, "q", q)
    check_same_dtype("v", v, "q", q)
    check_same_device("k", k, "q", q)
    check_same_device("v", v, "q", q)
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")


def _check_heads(hq, hkv, d, dk):
    if dk != d:
        raise ValueError(f"k: head dim {dk} does not match q's head dim {d}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k: its {hkv} heads must divide q's {hq} heads (grouped-query attention)")


def check_variant_args(causal, window, softcap) -> tuple[bool, int, int, float]:
    """(causal, window_left, window_right, softcap) checked and canonical: causal folded into the
    window (causal is exactly window_right == 0), softcap a float (0 = off)."""
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise ValueError(f"window: expected a pair of ints (left, right), -1 = unbounded, got {window!r}")
    wl, wr = window
    if wl < -1 or wr < -1:
        raise ValueError(f"window: each side must be -1 (unbounded) or >= 0, got {tuple(window)}")
    if causal and wr not in (-1, 0):
        raise ValueError(f"window: got {tuple(window)}; with causal=True the right side must be -1 or 0")
    if isinstance(softcap, torch.SymFloat):  # a traced model attribute: the call specialises on its value
        softcap = float(softcap)
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise ValueError(f"softcap: expected a number (0 = off), got {softcap!r}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap: expected a finite number >= 0 (0 = off), got {softcap}")
    causal = bool(causal) or wr == 0
    return causal, wl, (0 if causal else wr), float(softcap)


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, check_values: bool = True):
    """q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_seqlens int32 [B+1] on q's device; with
    check_values (one host sync) also cu[0] == 0, non-decreasing, cu[-1] == the totals and the
    max_seqlen bounds. Returns (B, Hq, Hkv, D, same_lengths): same_lengths is True when every sequence
    is known to have as many queries as keys (cu_seqlens_k is cu_seqlens_q, or equal values read)."""
    _check_qkv(q, k, v, 3, FLOAT_DTYPES)
    Hq, D, Hkv = q.shape[1], q.shape[2], k.shape[1]
    _check_heads(Hq, Hkv, D, k.shape[2])
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, dtypes=(torch.int32,), ndim=1)
        check_same_device(name, cu, "q", q)
        if cu.shape[0] < 1:
            raise ValueError(f"{name}: expected at least 1 entry (B + 1 for B sequences), got shape (0,)")
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.shape[0]} entries like cu_seqlens_q (B + 1), "
                         f"got {cu_seqlens_k.shape[0]}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {m!r}")
    same = cu_seqlens_k is cu_seqlens_q
    if check_values and not torch.compiler.is_compiling():
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for name, cu, total, mx, mname in (("cu_seqlens_q", cq, q.shape[0], max_seqlen_q, "max_seqlen_q"),
                                           ("cu_seqlens_k", ck, k.shape[0], max_seqlen_k, "max_seqlen_k")):
            if cu[0] != 0:
                raise ValueError(f"{name}: must start at 0, got {cu[0]}")
            lens = [b - a for a, b in zip(cu, cu[1:])]
            if any(n < 0 for n in lens):
                raise ValueError(f"{name}: must be non-decreasing, got {cu}")
            if cu[-1] != total:
                raise ValueError(f"{name}: last entry {cu[-1]} does not match the {total} rows of "
                                 f"{'q' if name == 'cu_seqlens_q' else 'k'}")
            if lens and max(lens) > mx:
                raise ValueError(f"{mname}: {mx} is smaller than the longest sequence ({max(lens)})")
        same = same or cq == ck
    return cu_seqlens_q.shape[0] - 1, Hq, Hkv, D, same
