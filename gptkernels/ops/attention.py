"""Exact softmax attention: out = softmax(q k^T * scale + mask) v, and its log-sum-exp.

Layouts: "bhsd" (SDPA's (B, H, S, D)) or "bshd" ((B, S, H, D), what a fused QKV projection
yields, taken by strides without a transpose copy). Grouped-query attention: K/V may have
fewer heads, dividing the query heads; query head h uses K/V head h // (Hq // Hkv).

Causal masking is aligned to the bottom-right, as FlashAttention: with Sq queries and Sk keys,
query i sees keys j <= i + (Sk - Sq). So a decoding step (Sq = 1) sees the whole cache.
`kv_lens` (int32 [B], optional) limits batch b to its first kv_lens[b] keys (a KV cache filled
to different lengths); the causal alignment then uses kv_lens[b] in place of Sk. A query row that
sees no key (possible only when Sq > Sk under causal) outputs zeros with lse = -inf.
"""
from __future__ import annotations

import math

import torch

from gptkernels._checks import HALF_DTYPES, FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor

LAYOUTS = ("bhsd", "bshd")


def to_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhsd" else t.transpose(1, 2)


def attention_mask(sq: int, sk: int, causal: bool, kv_lens, batch: int, device) -> torch.Tensor | None:
    """Boolean [B or 1, 1, Sq, Sk] mask of allowed (query, key) pairs, or None when all are allowed."""
    if not causal and kv_lens is None:
        return None
    j = torch.arange(sk, device=device)
    i = torch.arange(sq, device=device)
    lens = (kv_lens.to(device=device, dtype=torch.long) if kv_lens is not None
            else torch.full((1,), sk, device=device, dtype=torch.long))
    allowed = j[None, None, :] < lens[:, None, None]  # [B, 1, Sk]
    if causal:
        allowed = allowed & (j[None, None, :] <= i[None, :, None] + (lens[:, None, None] - sq))
    return allowed[:, None]


def attention_ref(q, k, v, causal: bool = False, scale: float | None = None, layout: str = "bhsd", kv_lens=None,
                  upcast: bool = True):
    """Math attention. Returns (out in q's layout and dtype, lse fp32 [B, Hq, Sq]).
    upcast=True computes in fp32 (the test reference); False in the inputs' dtype (the baseline
    whose error the kernel is compared with)."""
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    B, Hq, Sq, D = qb.shape
    Hkv = kb.shape[1]
    if Hkv != Hq:
        kb = kb.repeat_interleave(Hq // Hkv, dim=1)
        vb = vb.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dt = torch.float32 if upcast else q.dtype
    s = torch.matmul(qb.to(dt), kb.to(dt).transpose(-1, -2)).float() * scale
    mask = attention_mask(Sq, kb.shape[2], causal, kv_lens, B, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None].masked_fill(lse[..., None] == float("-inf"), 0.0))
    out = torch.matmul(p.to(dt), vb.to(dt)).to(q.dtype)
    out = out if layout == "bhsd" else out.transpose(1, 2)
    return out, lse


def check_attention_inputs(q, k, v, layout: str, kv_lens=None, dtypes=FLOAT_DTYPES):
    """Shapes (B, Hq, Sq, D) / (B, Hkv, Sk, D) in the given layout; returns (B, Hq, Hkv, Sq, Sk, D)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=dtypes, ndim=4)
    check_same_dtype("k", k, "q", q)
    check_same_dtype("v", v, "q", q)
    check_same_device("k", k, "q", q)
    check_same_device("v", v, "q", q)
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    B, Hq, Sq, D = qb.shape
    if kb.shape != vb.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if kb.shape[0] != B:
        raise ValueError(f"k: batch {kb.shape[0]} does not match q's batch {B}")
    if kb.shape[3] != D:
        raise ValueError(f"k: head dim {kb.shape[3]} does not match q's head dim {D}")
    Hkv, Sk = kb.shape[1], kb.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: its {Hkv} heads must divide q's {Hq} heads (grouped-query attention)")
    if kv_lens is not None:
        check_tensor("kv_lens", kv_lens, dtypes=(torch.int32, torch.int64), ndim=1)
        check_same_device("kv_lens", kv_lens, "q", q)
        if kv_lens.shape[0] != B:
            raise ValueError(f"kv_lens: expected shape ({B},), got {tuple(kv_lens.shape)}")
    return B, Hq, Hkv, Sq, Sk, D


def flash_attention(q, k, v, causal: bool = False, scale: float | None = None, layout: str = "bhsd", kv_lens=None):
    """(out, lse): exact attention, see the module docstring. Differentiable in q, k, v."""
    check_attention_inputs(q, k, v, layout, kv_lens)
    return attention_ref(q, k, v, causal, scale, layout, kv_lens)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention ((B, H, S, D) inputs), same
    arguments and semantics (is_causal is top-left aligned, as torch's). Calls the kernel covers
    run flash_attention; the rest (an explicit attn_mask, dropout, causal with Sq != Sk) run torch's
    own SDPA."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
