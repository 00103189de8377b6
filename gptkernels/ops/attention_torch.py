"""Attention's torch path: what a GPU call runs when the kernels do not take it, built on torch's fast
built-ins with gptkernels' semantics (gptkernels.ops.attention's docstring) expressed exactly.

- dense, no softcap: F.scaled_dot_product_attention (flash / cuDNN / memory-efficient backends), the
  bottom-right causal rule as is_causal / causal_lower_right, kv_lens and a window as an exact boolean
  mask; a window with Sq == Sk in fp16/bf16 goes to FlashAttention-2's sliding window through
  torch.nn.attention.varlen.varlen_attn (one "sequence" per batch row), which skips the masked blocks.
- softcap: _ChunkedAttention, the fp32 math chunk by chunk of query rows with a recomputing backward.
- varlen: varlen_attn (FlashAttention-2 varlen, with its window) where its alignment is ours (every
  sequence has as many queries as keys, or no mask at all) and its limits allow; else a loop over the
  sequences running the dense path above.
lse: from varlen_attn where it ran (its +inf for a row that sees no key set to -inf), else _AttentionLse
(the scores once more, chunk by chunk); the gradient flowing into lse is added by _LseGrad (torch's
varlen backward ignores it), so every path is differentiable through out and lse.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gptkernels.ops.attention_ref import (NO_WINDOW, attention_mask, fold_causal, per_sequence, probs_from_lse,
                                          seq_bounds, to_bhsd)


def _score_chunks(q, k, scale: float, causal: bool, kv_lens, window=NO_WINDOW, softcap: float = 0.0):
    """(rows, fp32 scores [B, Hq, len(rows), Sk] capped and masked with -inf, tanh or None) for chunks
    of query rows, small enough (about 64 MiB each) that the [Sq, Sk] scores never exist at once.
    q: [B, Hq, Sq, D], k: [B, Hkv, Sk, D]; query head h reads K/V head h // (Hq // Hkv) without a copy."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    kf = k.float().transpose(-1, -2)  # [B, Hkv, D, Sk]
    step = max(1, min(Sq, (1 << 24) // max(1, B * Hq * Sk)))
    for i0 in range(0, Sq, step):
        rows = range(i0, min(Sq, i0 + step))
        qc = q[:, :, i0:rows.stop].float().reshape(B, Hkv, g * len(rows), D)
        s = torch.matmul(qc, kf).reshape(B, Hq, len(rows), Sk) * scale
        t = torch.tanh(s / softcap) if softcap else None
        if softcap:
            s = t * softcap
        mask = attention_mask(Sq, Sk, causal, kv_lens, B, q.device, rows, window)
        yield rows, (s if mask is None else s.masked_fill(~mask, float("-inf"))), t


def _lse_backward(q, k, lse, dlse, scale, causal, kv_lens, window, softcap):
    """(dq, dk) fp32 of lse alone: d lse_i / d s_ij = p_ij (times 1 - tanh^2 under a softcap)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    kf = k.float()
    for rows, s, t in _score_chunks(q, k, scale, causal, kv_lens, window, softcap):
        r = slice(rows.start, rows.stop)
        w = probs_from_lse(s, lse[:, :, r, None]) * dlse[:, :, r, None].float()
        if softcap:
            w = w * (1 - t * t)
        w = w.reshape(B, Hkv, g * len(rows), Sk)
        dq[:, :, r] = torch.matmul(w, kf).reshape(B, Hq, len(rows), D) * scale
        dk += torch.matmul(w.transpose(-1, -2), q[:, :, r].float().reshape(B, Hkv, g * len(rows), D)) * scale
    return dq, dk


class _AttentionLse(torch.autograd.Function):
    """lse = log-sum-exp over the visible keys of the (capped) scores, fp32, chunk by chunk of query
    rows (torch's SDPA returns out but not lse); the backward recomputes each chunk's probabilities."""

    @staticmethod
    def forward(ctx, q, k, scale, causal, kv_lens, window=NO_WINDOW, softcap=0.0):
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        for rows, s, _ in _score_chunks(q, k, scale, causal, kv_lens, window, softcap):
            lse[:, :, rows.start:rows.stop] = torch.logsumexp(s, dim=-1)
        ctx.save_for_backward(q, k, lse, kv_lens)
        ctx.args = (scale, causal, window, softcap)
        return lse

    @staticmethod
    def backward(ctx, dlse):
        q, k, lse, kv_lens = ctx.saved_tensors
        scale, causal, window, softcap = ctx.args
        dq, dk = _lse_backward(q, k, lse, dlse, scale, causal, kv_lens, window, softcap)
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None, None, None


class _LseGrad(torch.autograd.Function):
    """Returns lse (computed elsewhere, e.g. by varlen_attn, whose backward ignores a gradient into
    lse) and adds that gradient to q and k: dq, dk of lse alone, recomputed chunk by chunk.
    q: [B, Hq, Sq, D], k: [B, Hkv, Sk, D], lse: [B, Hq, Sq]."""

    @staticmethod
    def forward(ctx, q, k, lse, scale, causal, window, softcap):
        ctx.save_for_backward(q, k, lse)
        ctx.args = (scale, causal, window, softcap)
        return lse.clone()

    @staticmethod
    def backward(ctx, dlse):
        q, k, lse = ctx.saved_tensors
        scale, causal, window, softcap = ctx.args
        dq, dk = _lse_backward(q, k, lse, dlse, scale, causal, None, window, softcap)
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None, None, None


class _ChunkedAttention(torch.autograd.Function):
    """(out, lse) of the fp32 math chunk by chunk of query rows (what softcap runs: no fused built-in
    caps scores); the backward recomputes each chunk (attention_bwd_ref's formulas). [B, H, S, D]."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, kv_lens, window, softcap):
        B, Hq, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        g = Hq // Hkv
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
        vf = _zero_past(v, kv_lens).float()
        for rows, s, _ in _score_chunks(q, k, scale, causal, kv_lens, window, softcap):
            r = slice(rows.start, rows.stop)
            lse[:, :, r] = torch.logsumexp(s, dim=-1)
            p = probs_from_lse(s, lse[:, :, r, None]).reshape(B, Hkv, g * len(rows), Sk)
            out[:, :, r] = torch.matmul(p, vf).reshape(B, Hq, len(rows), D)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, kv_lens)
        ctx.args = (scale, causal, window, softcap)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, kv_lens = ctx.saved_tensors
        scale, causal, window, softcap = ctx.args
        B, Hq, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        g = Hq // Hkv
        dout = torch.zeros_like(out) if dout is None else dout
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        kf, vf = k.float(), _zero_past(v, kv_lens).float()
        delta = (dout.float() * out.float()).sum(-1, keepdim=True)
        if dlse is not None:
            delta = delta - dlse.float()[..., None]
        for rows, s, t in _score_chunks(q, k, scale, causal, kv_lens, window, softcap):
            r, n = slice(rows.start, rows.stop), len(rows)
            p = probs_from_lse(s, lse[:, :, r, None])
            do = dout[:, :, r].float()
            dp = torch.matmul(do.reshape(B, Hkv, g * n, D), vf.transpose(-1, -2)).reshape(B, Hq, n, Sk)
            ds = p * (dp - delta[:, :, r])
            if softcap:
                ds = ds * (1 - t * t)
            ds, p = ds.reshape(B, Hkv, g * n, Sk), p.reshape(B, Hkv, g * n, Sk)
            dq[:, :, r] = torch.matmul(ds, kf).reshape(B, Hq, n, D) * scale
            dk += torch.matmul(ds.transpose(-1, -2), q[:, :, r].float().reshape(B, Hkv, g * n, D)) * scale
            dv += torch.matmul(p.transpose(-1, -2), do.reshape(B, Hkv, g * n, D))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _zero_past(t, kv_lens):
    """Keys/values past kv_lens set to zero (a cache past its fill may hold NaN: 0 * NaN would leak)."""
    if kv_lens is None:
        return t
    kept = torch.arange(t.shape[2], device=t.device)[None, :] < kv_lens.to(t.device).long()[:, None]
    return torch.where(kept[:, None, :, None], t, 0)


# ---- FlashAttention-2 through torch.nn.attention.varlen.varlen_attn -----------------------------

def flash_varlen_ok(q, head_dim: int, softcap: float, needs_grad: bool, deterministic: bool) -> bool:
    """torch's varlen_attn (FlashAttention-2) can run this call: CUDA, fp16/bf16, head dim a multiple
    of 8 up to 256, no softcap, no deterministic backward (its dq accumulates with atomics)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
            and not softcap and not (needs_grad and deterministic))


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, window):
    """(out (total_q, Hq, D), lse (Hq, total_q) fp32) from varlen_attn; the caller has checked that its
    top-left alignment is ours (equal query and key lengths per sequence, or no mask)."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse = varlen_attn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k),
                           return_aux=AuxRequest(lse=True), scale=scale, window_size=tuple(window),
                           enable_gqa=q.shape[1] != k.shape[1])
    return out, lse.float().masked_fill(lse == float("inf"), float("-inf"))  # FA2: +inf where no key is seen


# ---- dense --------------------------------------------------------------------------------------

def attention_torch(q, k, v, causal: bool = False, scale: float | None = None, layout: str = "bhsd", kv_lens=None,
                    *, window=NO_WINDOW, softcap: float = 0.0, deterministic: bool = False):
    """(out, lse) as attention_ref computes them, from torch's fused built-ins (see the module
    docstring): causal bottom-right as is_causal (Sq == Sk), torch's lower-right causal bias (Sq < Sk),
    or the last Sk rows as a square causal call with zeros above (Sq > Sk); kv_lens and a window as an
    explicit mask, with the keys past kv_lens zeroed first and rows that see no key set to zero.
    out is contiguous in `layout`."""
    from torch.nn.attention.bias import causal_lower_right

    causal, wl, wr = fold_causal(causal, window)
    windowed = wl >= 0 or wr > 0
    window = (wl, wr) if windowed else NO_WINDOW
    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    B, Hq, Sq, D = qb.shape
    Hkv, Sk = kb.shape[1], kb.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if softcap:
        out, lse = _ChunkedAttention.apply(qb, kb, vb, scale, causal, kv_lens, window, float(softcap))
        return (out if layout == "bhsd" else out.transpose(1, 2)).contiguous(), lse
    if (windowed and kv_lens is None and Sq == Sk and Sq > 0
            and flash_varlen_ok(q, D, softcap, needs_grad, deterministic)):
        return _dense_as_varlen(q, k, v, layout, scale, causal, window)
    kw = dict(scale=scale, enable_gqa=Hq != Hkv)
    kb, vb = _zero_past(kb, kv_lens), _zero_past(vb, kv_lens)
    if Sk == 0 or qb.numel() == 0:
        out = qb.new_zeros(qb.shape)
    elif kv_lens is not None or windowed:
        mask = attention_mask(Sq, Sk, causal, kv_lens, B, q.device, window=window)
        seen = mask.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask | ~seen, **kw).masked_fill(~seen, 0.0)
    elif not causal or Sq == 1:  # a single query row sees every key under bottom-right causal
        out = F.scaled_dot_product_attention(qb, kb, vb, **kw)
    elif Sq == Sk:
        out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, **kw)
    elif Sq < Sk:
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=causal_lower_right(Sq, Sk), **kw)
    else:  # the first Sq - Sk rows see no key
        tail = F.scaled_dot_product_attention(qb[:, :, Sq - Sk:], kb, vb, is_causal=True, **kw)
        out = torch.cat([tail.new_zeros(B, Hq, Sq - Sk, D), tail], dim=2)
    lse = _AttentionLse.apply(qb, kb, scale, causal, kv_lens, window, 0.0)
    return (out if layout == "bhsd" else out.transpose(1, 2)).contiguous(), lse


def _dense_as_varlen(q, k, v, layout, scale, causal, window):
    """A dense call with Sq == Sk as B sequences of S tokens through FlashAttention-2's varlen."""
    qs, ks, vs = (t if layout == "bshd" else t.transpose(1, 2) for t in (q, k, v))
    B, S, Hq, D = qs.shape
    cu = torch.arange(0, (B + 1) * S, S, dtype=torch.int32, device=q.device)
    flat = [t.reshape(B * S, t.shape[2], D) for t in (qs, ks, vs)]
    out, lse = _flash_varlen(*flat, cu, cu, S, S, scale, window)
    lse = lse.view(Hq, B, S).transpose(0, 1)
    lse = _LseGrad.apply(to_bhsd(q, layout), to_bhsd(k, layout), lse, scale, causal, window, 0.0)
    out = out.view(B, S, Hq, D)
    return (out if layout == "bshd" else out.transpose(1, 2)).contiguous(), lse


# ---- varlen -------------------------------------------------------------------------------------

def attention_varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           causal: bool = False, scale: float | None = None, window=NO_WINDOW, softcap: float = 0.0,
                           deterministic: bool = False, same_lengths: bool = False):
    """(out (total_q, Hq, D), lse (Hq, total_q)) of packed variable-length attention: varlen_attn when
    it applies (same_lengths: every sequence has as many queries as keys, so its top-left alignment is
    ours; needed only under a mask), else attention_varlen_loop."""
    causal, wl, wr = fold_causal(causal, window)
    masked = causal or wl >= 0 or wr >= 0
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.shape[0] and (same_lengths or not masked) and flash_varlen_ok(q, D, softcap, needs_grad, deterministic):
        out, lse = _flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, (wl, wr))
        if needs_grad:
            lse = _VarlenLseGrad.apply(q, k, lse, cu_seqlens_q, cu_seqlens_k, scale, causal, (wl, wr))
        return out, lse
    return attention_varlen_loop(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, (wl, wr), softcap, deterministic)


class _VarlenLseGrad(torch.autograd.Function):
    """_LseGrad for a packed batch: per sequence, the gradient flowing into lse (Hq, total_q)."""

    @staticmethod
    def forward(ctx, q, k, lse, cu_q, cu_k, scale, causal, window):
        ctx.save_for_backward(q, k, lse, cu_q, cu_k)
        ctx.args = (scale, causal, window)
        return lse.clone()

    @staticmethod
    def backward(ctx, dlse):
        q, k, lse, cu_q, cu_k = ctx.saved_tensors
        scale, causal, window = ctx.args
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
        for q0, q1, k0, k1 in seq_bounds(cu_q, cu_k):
            if q1 > q0 and k1 > k0:
                gq, gk = _lse_backward(q[None, q0:q1].transpose(1, 2), k[None, k0:k1].transpose(1, 2),
                                       lse[None, :, q0:q1], dlse[None, :, q0:q1], scale, causal, None, window, 0.0)
                dq[q0:q1], dk[k0:k1] = gq[0].transpose(0, 1), gk[0].transpose(0, 1)
        return dq, dk, None, None, None, None, None, None


def attention_varlen_loop(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool = False, scale: float | None = None,
                          window=NO_WINDOW, softcap: float = 0.0, deterministic: bool = False):
    """Packed variable-length attention as a loop over the sequences, each the dense torch path
    (attention_torch, batch 1, layout "bshd"); one host sync for the bounds. Differentiable."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return per_sequence(lambda qb, kb, vb: attention_torch(qb, kb, vb, causal, scale, "bshd", window=window,
                                                           softcap=softcap, deterministic=deterministic),
                        q, k, v, cu_seqlens_q, cu_seqlens_k)
