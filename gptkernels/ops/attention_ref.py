"""Attention's references: the math written out in fp32 (the test oracles and every op's CPU
implementation), for dense (B, H, S, D) / (B, S, H, D) inputs and for packed variable-length
batches (total, H, D) described by cu_seqlens. Semantics: gptkernels.ops.attention's docstring.
"""
from __future__ import annotations

import math

import torch

NO_WINDOW = (-1, -1)


def to_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhsd" else t.transpose(1, 2)


def fold_causal(causal: bool, window) -> tuple[bool, int, int]:
    """(causal, window_left, window_right) with causal folded into the window: causal is exactly
    window_right == 0 (the right side of a checked window is then -1 or 0)."""
    wl, wr = int(window[0]), int(window[1])
    causal = bool(causal) or wr == 0
    return causal, wl, (0 if causal else wr)


def attention_mask(sq: int, sk: int, causal: bool, kv_lens, batch: int, device, rows: range | None = None,
                   window=NO_WINDOW):
    """Boolean [B or 1, 1, Sq, Sk] mask of allowed (query, key) pairs, or None when all are allowed.
    Key j is visible to query i iff j < Sk_b, and with offset = Sk_b - Sq (Sk_b = kv_lens[b] or Sk):
    j >= i + offset - wl (when wl >= 0) and j <= i + offset + wr (when wr >= 0; causal: wr = 0).
    rows: only these query rows (then [B or 1, 1, len(rows), Sk])."""
    causal, wl, wr = fold_causal(causal, window)
    if wl < 0 and wr < 0 and kv_lens is None:
        return None
    j = torch.arange(sk, device=device)[None, None, :]
    i = (torch.arange(sq, device=device) if rows is None else torch.arange(rows.start, rows.stop, device=device))
    i = i[None, :, None]
    lens = (kv_lens.to(device=device, dtype=torch.long) if kv_lens is not None
            else torch.full((1,), sk, device=device, dtype=torch.long))[:, None, None]
    allowed = (j < lens).expand(lens.shape[0], i.shape[1], sk)  # [B, rows, Sk]
    if wl >= 0:
        allowed = allowed & (j >= i + (lens - sq) - wl)
    if wr >= 0:
        allowed = allowed & (j <= i + (lens - sq) + wr)
    return allowed[:, None]


def cap_scores(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """softcap * tanh(s / softcap) when softcap > 0 (0 = off)."""
    return s if not softcap else torch.tanh(s / softcap) * softcap


def masked_softmax(s: torch.Tensor):
    """(p, lse) of scores masked with -inf, a row with no visible key giving p = 0 and lse = -inf,
    with finite gradients everywhere (autograd through it is the varlen reference's backward)."""
    m = s.detach().amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_zeros(s.shape[:-1] + (1,))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    total = e.sum(dim=-1, keepdim=True)
    seen = total != 0  # (NaN scores stay NaN: a NaN input must not read as a row that sees no key)
    safe = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, torch.log(safe) + m, torch.full_like(m, float("-inf")))
    return e / safe, lse[..., 0]


def probs_from_lse(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(s - lse) for masked scores s and lse [..., 1]: 0 where no key is seen (lse = -inf)."""
    return torch.exp(s - lse.masked_fill(lse == float("-inf"), float("inf")))


def attention_ref(q, k, v, causal: bool = False, scale: float | None = None, layout: str = "bhsd", kv_lens=None,
                  upcast: bool = True, *, window=NO_WINDOW, softcap: float = 0.0):
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
    s = cap_scores(torch.matmul(qb.to(dt), kb.to(dt).transpose(-1, -2)).float() * scale, softcap)
    mask = attention_mask(Sq, kb.shape[2], causal, kv_lens, B, q.device, window=window)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if kv_lens is not None:  # a cache past its fill may hold anything (NaN): 0 * NaN would leak through p v
        kept = torch.arange(kb.shape[2], device=q.device)[None, :] < kv_lens.to(q.device).long()[:, None]
        vb = vb.masked_fill(~kept[:, None, :, None], 0.0)
    p, lse = masked_softmax(s)
    out = torch.matmul(p.to(dt), vb.to(dt)).to(q.dtype)
    out = out if layout == "bhsd" else out.transpose(1, 2)
    return out, lse


def attention_bwd_ref(dout, q, k, v, out, lse, dlse, causal: bool, scale: float, layout: str = "bhsd", *,
                      window=NO_WINDOW, softcap: float = 0.0):
    """Gradients (dq, dk, dv) of attention_ref written out in fp32 from the saved lse, as the kernel
    computes them: S = cap(Q K^T * scale), P = exp(S - lse), dV = P^T dO, dP = dO V^T,
    delta = rowsum(dO * O) - dlse, dS = P * (dP - delta), times 1 - tanh^2 under a softcap,
    dQ = scale * dS K, dK = scale * dS^T Q; with GQA dk/dv are summed over the query heads sharing
    a K/V head. Outputs are contiguous in `layout`, in the inputs' dtype."""
    qb, kb, vb, ob, dob = (to_bhsd(t, layout).float() for t in (q, k, v, out, dout))
    B, Hq, Sq, D = qb.shape
    Hkv, Sk = kb.shape[1], kb.shape[2]
    g = Hq // Hkv
    kx = kb.repeat_interleave(g, dim=1) if g > 1 else kb
    vx = vb.repeat_interleave(g, dim=1) if g > 1 else vb
    s = torch.matmul(qb, kx.transpose(-1, -2)) * scale
    t = torch.tanh(s / softcap) if softcap else None
    if softcap:
        s = t * softcap
    mask = attention_mask(Sq, Sk, causal, None, B, q.device, window=window)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = probs_from_lse(s, lse.float()[..., None])
    dvx = torch.matmul(p.transpose(-1, -2), dob)
    dp = torch.matmul(dob, vx.transpose(-1, -2))
    delta = (dob * ob).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.float()[..., None]
    ds = p * (dp - delta)
    if softcap:
        ds = ds * (1 - t * t)
    dq = torch.matmul(ds, kx) * scale
    dkx = torch.matmul(ds.transpose(-1, -2), qb) * scale
    if g > 1:
        dkx = dkx.view(B, Hkv, g, Sk, D).sum(2)
        dvx = dvx.view(B, Hkv, g, Sk, D).sum(2)

    def back(x, like):
        x = x.to(like.dtype)
        return (x if layout == "bhsd" else x.transpose(1, 2)).contiguous()

    return back(dq, q), back(dkx, k), back(dvx, v)


# ---- variable-length batches: per sequence, the dense math with batch 1 and layout "bshd" ---------

def seq_bounds(cu_seqlens_q, cu_seqlens_k):
    """[(q0, q1, k0, k1)] per sequence, read on the host (one sync)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def per_sequence(fn, q, k, v, cu_seqlens_q, cu_seqlens_k):
    """Packed (out (total_q, Hq, D), lse (Hq, total_q)) from fn(q_b, k_b, v_b) -> (out, lse) run on each
    sequence as a dense batch of 1 in layout "bshd"."""
    outs, lses = [], []
    for q0, q1, k0, k1 in seq_bounds(cu_seqlens_q, cu_seqlens_k):
        o, l = fn(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1])
        outs.append(o[0])
        lses.append(l[0])
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((q.shape[1], 0), dtype=torch.float32)
    return out.contiguous(), lse.contiguous()


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool = False, scale: float | None = None,
                         window=NO_WINDOW, softcap: float = 0.0):
    """Packed variable-length attention in fp32: q (total_q, Hq, D), k/v (total_k, Hkv, D); sequence b
    is q[cu_q[b]:cu_q[b+1]] against k/v[cu_k[b]:cu_k[b+1]] under the dense rule. Returns
    (out (total_q, Hq, D) in q's dtype, lse fp32 (Hq, total_q)); differentiable (autograd through
    the math, finite also for rows that see no key)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return per_sequence(lambda qb, kb, vb: attention_ref(qb, kb, vb, causal, scale, "bshd", window=window,
                                                         softcap=softcap), q, k, v, cu_seqlens_q, cu_seqlens_k)


def attention_varlen_bwd_ref(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, causal: bool, scale: float,
                             window=NO_WINDOW, softcap: float = 0.0):
    """(dq, dk, dv) of attention_varlen_ref from the saved lse (Hq, total_q), written out per sequence
    with attention_bwd_ref; keys of a sequence with no query get zero gradients."""
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    for q0, q1, k0, k1 in seq_bounds(cu_seqlens_q, cu_seqlens_k):
        if q1 == q0 or k1 == k0:
            continue
        g = attention_bwd_ref(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                              out[None, q0:q1], lse[None, :, q0:q1], None if dlse is None else dlse[None, :, q0:q1],
                              causal, scale, "bshd", window=window, softcap=softcap)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv
