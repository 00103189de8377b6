"""Exact softmax attention: out = softmax(q k^T * scale + mask) v, and its log-sum-exp.

Layouts: "bhsd" (SDPA's (B, H, S, D)) or "bshd" ((B, S, H, D), what a fused QKV projection
yields, taken by strides without a transpose copy). Grouped-query attention: K/V may have
fewer heads, dividing the query heads; query head h uses K/V head h // (Hq // Hkv).

Causal masking is aligned to the bottom-right, as FlashAttention: with Sq queries and Sk keys,
query i sees keys j <= i + (Sk - Sq). So a decoding step (Sq = 1) sees the whole cache.
`kv_lens` (int32 [B], optional) limits batch b to its first kv_lens[b] keys (a KV cache filled
to different lengths); the causal alignment then uses kv_lens[b] in place of Sk. A query row that
sees no key (possible only when Sq > Sk under causal) outputs zeros with lse = -inf.

Paths (gptkernels._backend):
- kernel (csrc/attention/, torch.ops.gptkernels.*): flash_attn_fwd, a FlashAttention-2 style forward
  on tensor cores (mma.sync, sm_80 and sm_90), returning (out, lse); flash_attn_bwd, the backward from
  the saved lse (dk/dv summed over the query heads sharing a K/V head; not deterministic by default:
  fp32 atomics into dq; `deterministic=True` or torch.use_deterministic_algorithms(True) accumulates
  dq in a fixed order); flash_attn_decode, the split-KV forward (no autograd), which every call that
  needs no gradient runs: it picks its engine itself (a CUDA-core kernel for a few query rows per K/V
  head, else the tensor-core forward), splits the keys over several CTAs when one per query tile would
  leave SMs idle (decoding, chunked prefill, speculative decoding over a long cache), sizes the splits
  from kv_lens inside the kernel, and is the plain forward otherwise.
  Head dims, dtypes and length limits: LIMITS, from csrc/attention/attention_limits.h. The
  implementation is chosen per GPU in C++ (select_impl; `gptkernels info` prints it). On compute
  capability 9.0 the forward can also run the Hopper kernel (csrc/attention/sm90/: TMA, wgmma, warp
  specialisation; same semantics): opt in with set_attention_impl("sm90") or
  GPTKERNELS_ATTENTION_IMPL=sm90 until it has been verified on a GPU.
- torch (a GPU call the kernels do not take: other head dims, float32, gradients through kv_lens,
  no extension): attention_torch, torch's SDPA (flash / cuDNN / memory-efficient backends) with the
  bottom-right causal mask and kv_lens expressed exactly, plus the lse computed chunk by chunk.
- reference (CPU): attention_ref, the math written out; also every op's CPU implementation.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from gptkernels import _backend, _limits
from gptkernels._checks import FLOAT_DTYPES, check_same_device, check_same_dtype, check_tensor

LAYOUTS = ("bhsd", "bshd")


def to_bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhsd" else t.transpose(1, 2)


def attention_mask(sq: int, sk: int, causal: bool, kv_lens, batch: int, device, rows: range | None = None):
    """Boolean [B or 1, 1, Sq, Sk] mask of allowed (query, key) pairs, or None when all are allowed.
    rows: only these query rows (then [B or 1, 1, len(rows), Sk])."""
    if not causal and kv_lens is None:
        return None
    j = torch.arange(sk, device=device)
    i = torch.arange(sq, device=device) if rows is None else torch.arange(rows.start, rows.stop, device=device)
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
    if kv_lens is not None:  # a cache past its fill may hold anything (NaN): 0 * NaN would leak through p v
        kept = torch.arange(kb.shape[2], device=q.device)[None, :] < kv_lens.to(q.device).long()[:, None]
        vb = vb.masked_fill(~kept[:, None, :, None], 0.0)
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


def attention_bwd_ref(dout, q, k, v, out, lse, dlse, causal: bool, scale: float, layout: str = "bhsd"):
    """Gradients (dq, dk, dv) of attention_ref written out in fp32 from the saved lse, as the kernel
    computes them: P = exp(S*scale - lse), dV = P^T dO, dP = dO V^T, delta = rowsum(dO * O) - dlse,
    dS = P * (dP - delta), dQ = scale * dS K, dK = scale * dS^T Q; with GQA dk/dv are summed over the
    query heads sharing a K/V head. Outputs are contiguous in `layout`, in the inputs' dtype."""
    qb, kb, vb, ob, dob = (to_bhsd(t, layout).float() for t in (q, k, v, out, dout))
    B, Hq, Sq, D = qb.shape
    Hkv, Sk = kb.shape[1], kb.shape[2]
    g = Hq // Hkv
    kx = kb.repeat_interleave(g, dim=1) if g > 1 else kb
    vx = vb.repeat_interleave(g, dim=1) if g > 1 else vb
    s = torch.matmul(qb, kx.transpose(-1, -2)) * scale
    mask = attention_mask(Sq, Sk, causal, None, B, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse_ = lse.float()[..., None]
    p = torch.exp(s - lse_.masked_fill(lse_ == float("-inf"), float("inf")))
    dvx = torch.matmul(p.transpose(-1, -2), dob)
    dp = torch.matmul(dob, vx.transpose(-1, -2))
    delta = (dob * ob).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - dlse.float()[..., None]
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kx) * scale
    dkx = torch.matmul(ds.transpose(-1, -2), qb) * scale
    if g > 1:
        dkx = dkx.view(B, Hkv, g, Sk, D).sum(2)
        dvx = dvx.view(B, Hkv, g, Sk, D).sum(2)

    def back(t, like):
        t = t.to(like.dtype)
        return (t if layout == "bhsd" else t.transpose(1, 2)).contiguous()

    return back(dq, q), back(dkx, k), back(dvx, v)


# ---- torch's fast path (a GPU call the kernels do not take) -------------------------------------

def _lse_chunks(q, k, scale: float, causal: bool, kv_lens):
    """(rows, fp32 scores [B, Hq, len(rows), Sk] masked with -inf) for chunks of query rows, small
    enough (about 64 MiB each) that the [Sq, Sk] scores never exist at once. q: [B, Hq, Sq, D],
    k: [B, Hkv, Sk, D]; query head h reads K/V head h // (Hq // Hkv) without a copy of K."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    kf = k.float().transpose(-1, -2)  # [B, Hkv, D, Sk]
    step = max(1, min(Sq, (1 << 24) // max(1, B * Hq * Sk)))
    for i0 in range(0, Sq, step):
        rows = range(i0, min(Sq, i0 + step))
        qc = q[:, :, i0:rows.stop].float().reshape(B, Hkv, g * len(rows), D)
        s = torch.matmul(qc, kf).reshape(B, Hq, len(rows), Sk) * scale
        mask = attention_mask(Sq, Sk, causal, kv_lens, B, q.device, rows)
        yield rows, (s if mask is None else s.masked_fill(~mask, float("-inf")))


class _AttentionLse(torch.autograd.Function):
    """lse = log-sum-exp over the visible keys of q k^T * scale (fp32), chunk by chunk of query rows
    (torch's SDPA returns out but not lse). The backward recomputes each chunk's probabilities:
    d lse_i / d s_ij = p_ij, so dq = scale * (p * dlse) k and dk = scale * (p * dlse)^T q."""

    @staticmethod
    def forward(ctx, q, k, scale, causal, kv_lens):
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        for rows, s in _lse_chunks(q, k, scale, causal, kv_lens):
            lse[:, :, rows.start:rows.stop] = torch.logsumexp(s, dim=-1)
        ctx.save_for_backward(q, k, lse, kv_lens)
        ctx.scale, ctx.causal = scale, causal
        return lse

    @staticmethod
    def backward(ctx, dlse):
        q, k, lse, kv_lens = ctx.saved_tensors
        B, Hq, Sq, D = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        g = Hq // Hkv
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        kf = k.float()
        for rows, s in _lse_chunks(q, k, ctx.scale, ctx.causal, kv_lens):
            r = slice(rows.start, rows.stop)
            lse_c = lse[:, :, r, None]
            p = torch.exp(s - lse_c.masked_fill(lse_c == float("-inf"), float("inf")))  # 0 where no key is seen
            w = (p * dlse[:, :, r, None].float()).reshape(B, Hkv, g * len(rows), Sk)
            dq[:, :, r] = torch.matmul(w, kf).reshape(B, Hq, len(rows), D) * ctx.scale
            qc = q[:, :, r].float().reshape(B, Hkv, g * len(rows), D)
            dk += torch.matmul(w.transpose(-1, -2), qc) * ctx.scale
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None


def attention_torch(q, k, v, causal: bool = False, scale: float | None = None, layout: str = "bhsd", kv_lens=None):
    """(out, lse) as attention_ref computes them, from torch's fused SDPA (flash / cuDNN /
    memory-efficient backends on a GPU), with our semantics expressed exactly: causal bottom-right
    as is_causal (Sq == Sk), torch's lower-right causal bias (Sq < Sk), or the last Sk rows as a
    square causal call with zeros above (Sq > Sk); kv_lens as an explicit mask, with the keys past it
    zeroed first (a cache past its fill may hold NaN) and rows that see no key set to zero. lse comes
    from _AttentionLse (the scores once more, chunk by chunk). out is contiguous in `layout`."""
    from torch.nn.attention.bias import causal_lower_right

    qb, kb, vb = (to_bhsd(t, layout) for t in (q, k, v))
    B, Hq, Sq, D = qb.shape
    Hkv, Sk = kb.shape[1], kb.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kw = dict(scale=scale, enable_gqa=Hq != Hkv)
    if kv_lens is not None:
        kept = (torch.arange(Sk, device=q.device)[None, :] < kv_lens.to(q.device).long()[:, None])[:, None, :, None]
        kb, vb = torch.where(kept, kb, 0), torch.where(kept, vb, 0)
    if Sk == 0 or qb.numel() == 0:
        out = qb.new_zeros(qb.shape)
    elif kv_lens is not None:
        mask = attention_mask(Sq, Sk, causal, kv_lens, B, q.device)
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
    lse = _AttentionLse.apply(qb, kb, scale, causal, kv_lens)
    return (out if layout == "bhsd" else out.transpose(1, 2)).contiguous(), lse


# ---- registration: fake, CPU implementation (the reference), autograd; schemas come from C++ ------

def _out_like(q):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _lse_like(q, layout):
    B, H, S = (q.shape[0], q.shape[1], q.shape[2]) if layout == "bhsd" else (q.shape[0], q.shape[2], q.shape[1])
    return torch.empty((B, H, S), dtype=torch.float32, device=q.device)


def _fwd_ref_op(q, k, v, causal, scale, layout, kv_lens):
    out, lse = attention_ref(q, k, v, causal, scale, layout, kv_lens)
    return out.contiguous(), lse.contiguous()


if _backend.has_kernel("flash_attn_fwd"):
    def _fwd_fake(q, k, v, causal, scale, layout, kv_lens, deterministic):
        return _out_like(q), _lse_like(q, layout)

    def _fwd_cpu(q, k, v, causal, scale, layout, kv_lens, deterministic):
        return _fwd_ref_op(q, k, v, causal, scale, layout, kv_lens)

    torch.library.register_fake("gptkernels::flash_attn_fwd")(_fwd_fake)
    torch.library.impl("gptkernels::flash_attn_fwd", "CPU")(_fwd_cpu)

    if _backend.has_kernel("flash_attn_bwd"):
        def _bwd_fake(dout, q, k, v, out, lse, dlse, causal, scale, layout, deterministic):
            return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                    torch.empty(k.shape, dtype=k.dtype, device=k.device),
                    torch.empty(v.shape, dtype=v.dtype, device=v.device))

        def _bwd_cpu(dout, q, k, v, out, lse, dlse, causal, scale, layout, deterministic):
            return attention_bwd_ref(dout, q, k, v, out, lse, dlse, causal, scale, layout)

        torch.library.register_fake("gptkernels::flash_attn_bwd")(_bwd_fake)
        torch.library.impl("gptkernels::flash_attn_bwd", "CPU")(_bwd_cpu)

    if _backend.has_kernel("flash_attn_decode"):
        def _decode_fake(q, k, v, causal, scale, layout, kv_lens):
            return _out_like(q), _lse_like(q, layout)

        torch.library.register_fake("gptkernels::flash_attn_decode")(_decode_fake)
        torch.library.impl("gptkernels::flash_attn_decode", "CPU")(_fwd_ref_op)

    def _setup(ctx, inputs, output):
        q, k, v, causal, scale, layout, kv_lens, deterministic = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.layout, ctx.deterministic = causal, scale, layout, deterministic
        ctx.has_kv_lens = kv_lens is not None

    def _backward(ctx, dout, dlse):
        if ctx.has_kv_lens:
            raise NotImplementedError("gptkernels.flash_attention: gradients with kv_lens are not supported "
                                      "(flash_attention takes the PyTorch paths when they are needed)")
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if not _HAVE_BWD:
            dq, dk, dv = attention_bwd_ref(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale, ctx.layout)
        else:
            dq, dk, dv = torch.ops.gptkernels.flash_attn_bwd(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale,
                                                             ctx.layout, ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None

    torch.library.register_autograd("gptkernels::flash_attn_fwd", _backward, setup_context=_setup)


# ---- dispatch ---------------------------------------------------------------------------------
LIMITS = _limits.family("attention")
_HAVE_FWD = _backend.has_kernel("flash_attn_fwd")
_HAVE_BWD = _backend.has_kernel("flash_attn_bwd")
_HAVE_DECODE = _backend.has_kernel("flash_attn_decode")
# GPTKERNELS_ATTENTION_IMPL values: the names of the rows of the C++ implementation table (flash_api.cu)
ATTENTION_IMPLS = ("auto", "sm80", "sm90")
_IMPL_ENV = "GPTKERNELS_ATTENTION_IMPL"


def set_attention_impl(impl: str) -> None:
    """Which attention kernels run on a GPU: "auto" (the default: the verified kernels, today sm80),
    "sm80" (the mma.sync kernels) or "sm90" (the Hopper forward and backward: TMA, wgmma, warp
    specialisation; on compute capability 9.0 in a build for sm_90a, for the calls they take, else
    sm80; opt-in because they have not run on a GPU). Sets GPTKERNELS_ATTENTION_IMPL, which the
    extension reads at every call (select_impl in csrc/attention/flash_api.cu). Decode is sm80's either way."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"set_attention_impl: expected one of {ATTENTION_IMPLS}, got {impl!r}")
    os.environ[_IMPL_ENV] = impl


def get_attention_impl() -> str:
    return os.environ.get(_IMPL_ENV) or "auto"


def kernel_implementation(op: str = "fwd", capability: tuple[int, int] | None = None) -> str | None:
    """The attention kernel the extension runs for `op` ("fwd", "bwd", "decode") on a GPU of this
    compute capability (default: the current GPU) under GPTKERNELS_ATTENTION_IMPL, as `gptkernels info`
    prints it (e.g. "sm80 mma.sync kernel; ..."); "" when none; None without the extension or a GPU."""
    if not (_backend.EXT_LOADED and hasattr(torch.ops.gptkernels, "attention_impl")) or (
            capability is None and not torch.cuda.is_available()):
        return None
    major, minor = capability or torch.cuda.get_device_capability()
    return torch.ops.gptkernels.attention_impl(op, major * 10 + minor)


def _unsupported(q, head_dim: int, sq: int, sk: int, scale: float, kv_lens, needs_grad: bool) -> str | None:
    """None when the attention kernels take this call, else a short reason they do not."""
    if not _HAVE_FWD:
        return "not in this build of the extension"
    if q.dtype not in _limits.dtypes(LIMITS):
        return f"dtype {str(q.dtype)[6:]} (the kernels take {', '.join(LIMITS['dtypes'])})"
    m, top = LIMITS["head_dim_multiple"], LIMITS["max_head_dim"]
    if head_dim <= 0 or head_dim % m or head_dim > top:
        return f"head_dim {head_dim} (the kernels take multiples of {m} up to {top})"
    if not (scale > 0 and math.isfinite(scale)):
        return f"scale {scale} (the kernels need a positive finite scale)"
    if max(sq, sk) > LIMITS["max_seq_len"]:
        return f"sequence length {max(sq, sk)} (the kernels take at most {LIMITS['max_seq_len']})"
    if needs_grad and kv_lens is not None:
        return "gradients with kv_lens"
    return None


def _attention_kernel(q, k, v, causal, scale, layout, kv_lens, deterministic, needs_grad):
    kl = None if kv_lens is None else kv_lens.to(torch.int32)
    if not needs_grad and _HAVE_DECODE:  # (it picks its engine and number of key splits itself)
        return torch.ops.gptkernels.flash_attn_decode(q, k, v, causal, scale, layout, kl)
    return torch.ops.gptkernels.flash_attn_fwd(q, k, v, causal, scale, layout, kl, bool(deterministic))


def _attention_torch(q, k, v, causal, scale, layout, kv_lens, deterministic, needs_grad):
    return attention_torch(q, k, v, causal, scale, layout, kv_lens)


def _attention_reference(q, k, v, causal, scale, layout, kv_lens, deterministic, needs_grad):
    out, lse = attention_ref(q, k, v, causal, scale, layout, kv_lens)
    return out.contiguous(), lse


# What each path (gptkernels._backend) runs.
FLASH_ATTENTION = {"kernel": _attention_kernel, "torch": _attention_torch, "reference": _attention_reference}


def flash_attention(q, k, v, causal: bool = False, scale: float | None = None, layout: str = "bhsd", kv_lens=None,
                    deterministic: bool | None = None):
    """(out, lse): exact attention, see the module docstring. Differentiable in q, k, v (and through
    lse). out is contiguous in `layout` (a "bshd" out views as (B, S, H*D) without a copy); lse is
    fp32 [B, Hq, Sq]. deterministic: a backward with a fixed reduction order (default: follow
    torch.are_deterministic_algorithms_enabled(); the kernel's default backward is not)."""
    B, Hq, Hkv, Sq, Sk, D = check_attention_inputs(q, k, v, layout, kv_lens)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    why = _unsupported(q, D, Sq, Sk, scale, kv_lens, needs_grad)
    fn = FLASH_ATTENTION[_backend.path("flash_attention", (q, k, v, kv_lens), why)]
    return fn(q, k, v, causal, scale, layout, kv_lens, deterministic, needs_grad)


def _sdpa_unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """None when gptkernels' flash_attention computes exactly torch's SDPA for this call."""
    if attn_mask is not None:
        return "attn_mask"
    if dropout_p > 0:
        return "dropout"
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        return "inputs that are not 4-D"
    if key.shape[-2] != value.shape[-2] or key.shape[:-2] != value.shape[:-2] or query.shape[0] != key.shape[0]:
        return "mismatched shapes"
    if query.shape[-1] != key.shape[-1] or value.shape[-1] != key.shape[-1]:
        return "value head dim different from the query/key head dim"
    hq, hkv = query.shape[1], key.shape[1]
    if hq != hkv and not (enable_gqa and hkv > 0 and hq % hkv == 0):
        return "K/V heads different from Q heads without enable_gqa"
    if is_causal and query.shape[-2] != key.shape[-2]:
        return "is_causal with Sq != Sk (torch aligns it to the top-left)"
    if query.dtype != key.dtype or query.dtype != value.dtype:
        return "mixed dtypes"
    if not (query.device == key.device == value.device):
        return "tensors on different devices"
    D = query.shape[-1]
    s = 1.0 / math.sqrt(D) if scale is None else float(scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return _unsupported(query, D, query.shape[-2], key.shape[-2], s, None, needs_grad)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention ((B, H, S, D) inputs), same
    arguments and semantics (is_causal is top-left aligned, as torch's). Calls the kernel covers
    run flash_attention; the rest (an explicit attn_mask, dropout, causal with Sq != Sk, fp32, head
    dims the kernels lack, non-4-D inputs) run torch's own SDPA."""
    reason = _sdpa_unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    tensors = [t for t in (query, key, value) if isinstance(t, torch.Tensor)]
    if reason is None and _backend.use_kernel("scaled_dot_product_attention", tensors, unsupported=None):
        return flash_attention(query, key, value, causal=is_causal, scale=scale, layout="bhsd")[0]
    if reason is not None and _backend.get_backend() == "kernel" and all(t.is_cuda for t in tensors):
        raise ValueError(f"gptkernels.scaled_dot_product_attention: backend is 'kernel' but the kernel does not "
                         f"support this call: {reason}")
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
