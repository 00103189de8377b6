"""Exact softmax attention: out = softmax(cap(q k^T * scale) + mask) v, and its log-sum-exp.

Layouts: "bhsd" (SDPA's (B, H, S, D)) or "bshd" ((B, S, H, D), what a fused QKV projection
yields, taken by strides without a transpose copy). Grouped-query attention: K/V may have
fewer heads, dividing the query heads; query head h uses K/V head h // (Hq // Hkv).

Masking, one rule for every path: with Sq queries and Sk_b keys (Sk_b = kv_lens[b] when given, else
Sk; kv_lens is an int32 [B] KV-cache fill) and offset = Sk_b - Sq (bottom-right alignment, as
FlashAttention), key j is visible to query i iff j < Sk_b and, with window = (wl, wr) (-1 = unbounded
on that side), j >= i + offset - wl (wl >= 0) and j <= i + offset + wr (wr >= 0). causal=True is
exactly wr = 0 (so a decoding step, Sq = 1, sees the whole cache, or its last wl + 1 keys). softcap > 0
caps the scores: s = softcap * tanh(s / softcap) (Gemma-2); 0 = off. lse is the log-sum-exp of the
(capped) visible scores; a query row that sees no key outputs zeros with lse = -inf.

Variable-length batches (flash_attention_varlen, FlashAttention's layout): q (total_q, Hq, D), k/v
(total_k, Hkv, D), cu_seqlens_q / cu_seqlens_k int32 [B+1] (0, then running totals); sequence b is
q[cu_q[b]:cu_q[b+1]] against k/v[cu_k[b]:cu_k[b+1]] under the rule above; out (total_q, Hq, D),
lse fp32 (Hq, total_q). Empty sequences are allowed.

Paths (gptkernels._backend):
- kernel (csrc/attention/, torch.ops.gptkernels.*): flash_attn_fwd, a FlashAttention-2 style forward
  on tensor cores (mma.sync, sm_80 and sm_90), returning (out, lse); flash_attn_bwd, the backward from
  the saved lse (dk/dv summed over the query heads sharing a K/V head; not deterministic by default:
  fp32 atomics into dq; `deterministic=True` or torch.use_deterministic_algorithms(True) accumulates
  dq in a fixed order); flash_attn_decode, the split-KV forward (no autograd), which every call that
  needs no gradient runs: it picks its engine itself (a CUDA-core kernel for a few query rows per K/V
  head, else the tensor-core forward), splits the keys over several CTAs when one per query tile would
  leave SMs idle (decoding, chunked prefill, speculative decoding over a long cache), sizes the splits
  from kv_lens inside the kernel, and is the plain forward otherwise. flash_attn_varlen_{fwd,bwd,decode}
  are the same for packed batches. A call using a variant ("window", "softcap", "varlen") takes the
  kernels only when the extension's limits name it in LIMITS["variants"] (what forward, backward and
  decode all implement).
  Head dims, dtypes and length limits: LIMITS, from csrc/attention/attention_limits.h. The
  implementation is chosen per GPU in C++ (select_impl; `gptkernels info` prints it). On compute
  capability 9.0 the forward can also run the Hopper kernel (csrc/attention/sm90/: TMA, wgmma, warp
  specialisation; same semantics): opt in with set_attention_impl("sm90") or
  GPTKERNELS_ATTENTION_IMPL=sm90 until it has been verified on a GPU.
- torch (a GPU call the kernels do not take: other head dims, float32, gradients through kv_lens, a
  variant the kernels lack, no extension): attention_torch / attention_varlen_torch
  (gptkernels.ops.attention_torch): SDPA with the masks expressed exactly, FlashAttention-2's sliding
  window and varlen through torch.nn.attention.varlen.varlen_attn where its alignment is ours, a
  chunked fp32 computation for softcap, a loop over the sequences otherwise; lse chunk by chunk.
- reference (CPU): attention_ref / attention_varlen_ref (gptkernels.ops.attention_ref), the math
  written out in fp32; also every op's CPU implementation.

  path       dense                                  varlen
  kernel     flash_attn_fwd / _bwd / _decode        flash_attn_varlen_fwd / _bwd / _decode
  torch      SDPA (+ mask), varlen_attn (window),   varlen_attn (equal q/k lengths or no mask),
             _ChunkedAttention (softcap)            else a loop of the dense torch path
  reference  attention_ref (+ attention_bwd_ref)    attention_varlen_ref (+ attention_varlen_bwd_ref)
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from gptkernels import _backend, _limits
from gptkernels.ops.attention_args import (LAYOUTS, check_attention_inputs, check_variant_args,  # noqa: F401
                                           check_varlen_inputs)
from gptkernels.ops.attention_ref import (NO_WINDOW, attention_bwd_ref, attention_mask, attention_ref,  # noqa: F401
                                          attention_varlen_bwd_ref, attention_varlen_ref, to_bhsd)
from gptkernels.ops.attention_torch import attention_torch, attention_varlen_loop, attention_varlen_torch  # noqa: F401


def variants_used(window_left: int, window_right: int, softcap: float) -> tuple[str, ...]:
    """The LIMITS["variants"] names a call with this canonical window (causal folded into
    window_right = 0, which is no variant) and softcap uses."""
    return (("window",) if window_left >= 0 or window_right > 0 else ()) + (("softcap",) if softcap else ())


def _takes_variant_args(op: str) -> bool:
    """The built op's schema has the trailing window_left, window_right, softcap (VARLEN_SPEC)."""
    return _backend.has_kernel(op) and any(a.name == "window_left"
                                           for a in getattr(torch.ops.gptkernels, op).default._schema.arguments)


# Per dense op: whether its schema takes them. Calls pass them whenever it does (causal folded into
# window_right = 0, so a kernel may read the window alone), and never to an older build's schema
# (where no call using a variant reaches the kernels: LIMITS has no "variants" there).
_VARIANT_ARGS = {op: _takes_variant_args(op) for op in ("flash_attn_fwd", "flash_attn_bwd", "flash_attn_decode")}


def _variant_args(op: str, window_left: int, window_right: int, softcap: float) -> tuple:
    """The trailing (window_left, window_right, softcap) for `op`, or () where its schema lacks them."""
    return (int(window_left), int(window_right), float(softcap)) if _VARIANT_ARGS.get(op) else ()


# ---- registration: fake, CPU implementation (the reference), autograd; schemas come from C++ ------
# The dense ops' trailing window_left=-1, window_right=-1, softcap=0.0 default in the schema: the
# functions below take them with the same defaults, so they serve the schemas with and without them.

def _out_like(q):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _lse_like(q, layout):
    B, H, S = (q.shape[0], q.shape[1], q.shape[2]) if layout == "bhsd" else (q.shape[0], q.shape[2], q.shape[1])
    return torch.empty((B, H, S), dtype=torch.float32, device=q.device)


def _grads_like(q, k, v):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _fwd_ref_op(q, k, v, causal, scale, layout, kv_lens, window_left=-1, window_right=-1, softcap=0.0):
    out, lse = attention_ref(q, k, v, causal, scale, layout, kv_lens, window=(window_left, window_right),
                             softcap=softcap)
    return out.contiguous(), lse.contiguous()


def _fwd_fake(q, k, v, causal, scale, layout, kv_lens, deterministic, window_left=-1, window_right=-1, softcap=0.0):
    return _out_like(q), _lse_like(q, layout)


def _fwd_cpu(q, k, v, causal, scale, layout, kv_lens, deterministic, window_left=-1, window_right=-1, softcap=0.0):
    return _fwd_ref_op(q, k, v, causal, scale, layout, kv_lens, window_left, window_right, softcap)


def _bwd_fake(dout, q, k, v, out, lse, dlse, causal, scale, layout, deterministic, window_left=-1, window_right=-1,
              softcap=0.0):
    return _grads_like(q, k, v)


def _bwd_cpu(dout, q, k, v, out, lse, dlse, causal, scale, layout, deterministic, window_left=-1, window_right=-1,
             softcap=0.0):
    return attention_bwd_ref(dout, q, k, v, out, lse, dlse, causal, scale, layout, window=(window_left, window_right),
                             softcap=softcap)


def _decode_fake(q, k, v, causal, scale, layout, kv_lens, window_left=-1, window_right=-1, softcap=0.0):
    return _out_like(q), _lse_like(q, layout)


def _setup(ctx, inputs, output):
    q, k, v, causal, scale, layout, kv_lens, deterministic = inputs[:8]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.layout, ctx.deterministic = causal, scale, layout, deterministic
    ctx.variant = tuple(inputs[8:]) + (-1, -1, 0.0)[len(inputs) - 8:]  # (window_left, window_right, softcap)
    ctx.n_inputs = len(inputs)
    ctx.has_kv_lens = kv_lens is not None


def _backward(ctx, dout, dlse):
    if ctx.has_kv_lens:
        raise NotImplementedError("gptkernels.flash_attention: gradients with kv_lens are not supported "
                                  "(flash_attention takes the PyTorch paths when they are needed)")
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    wl, wr, softcap = ctx.variant
    if not _HAVE_BWD:
        dq, dk, dv = attention_bwd_ref(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale, ctx.layout,
                                       window=(wl, wr), softcap=softcap)
    else:
        dq, dk, dv = torch.ops.gptkernels.flash_attn_bwd(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale,
                                                         ctx.layout, ctx.deterministic,
                                                         *_variant_args("flash_attn_bwd", *ctx.variant))
    return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)


if _backend.has_kernel("flash_attn_fwd"):
    torch.library.register_fake("gptkernels::flash_attn_fwd")(_fwd_fake)
    torch.library.impl("gptkernels::flash_attn_fwd", "CPU")(_fwd_cpu)
    if _backend.has_kernel("flash_attn_bwd"):
        torch.library.register_fake("gptkernels::flash_attn_bwd")(_bwd_fake)
        torch.library.impl("gptkernels::flash_attn_bwd", "CPU")(_bwd_cpu)
    if _backend.has_kernel("flash_attn_decode"):
        torch.library.register_fake("gptkernels::flash_attn_decode")(_decode_fake)
        torch.library.impl("gptkernels::flash_attn_decode", "CPU")(_fwd_ref_op)
    torch.library.register_autograd("gptkernels::flash_attn_fwd", _backward, setup_context=_setup)


# Varlen ops (schemas in VARLEN order: tensors, cu_seqlens, max_seqlens, causal, scale, window, softcap[, det]).

def _varlen_lse_like(q):
    return torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)


def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
                     window_right, softcap, deterministic):
    return _out_like(q), _varlen_lse_like(q)


def _varlen_fwd_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left,
                    window_right, softcap, deterministic):
    return attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, (window_left, window_right),
                                softcap)


def _varlen_bwd_fake(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                     scale, window_left, window_right, softcap, deterministic):
    return _grads_like(q, k, v)


def _varlen_bwd_cpu(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                    scale, window_left, window_right, softcap, deterministic):
    return attention_varlen_bwd_ref(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, causal, scale,
                                    (window_left, window_right), softcap)


def _varlen_decode_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                        window_left, window_right, softcap):
    return _out_like(q), _varlen_lse_like(q)


def _varlen_decode_cpu(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                       window_left, window_right, softcap):
    return attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, (window_left, window_right),
                                softcap)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, wl, wr, softcap, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale, wl, wr, softcap, deterministic)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, causal, scale, wl, wr, softcap, deterministic = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    if _HAVE_VARLEN_BWD:
        dq, dk, dv = torch.ops.gptkernels.flash_attn_varlen_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q,
                                                                max_k, causal, scale, wl, wr, softcap, deterministic)
    else:
        dq, dk, dv = attention_varlen_bwd_ref(dout, q, k, v, out, lse, dlse, cu_q, cu_k, causal, scale, (wl, wr),
                                              softcap)
    return (dq, dk, dv) + (None,) * 10


if _backend.has_kernel("flash_attn_varlen_fwd"):
    torch.library.register_fake("gptkernels::flash_attn_varlen_fwd")(_varlen_fwd_fake)
    torch.library.impl("gptkernels::flash_attn_varlen_fwd", "CPU")(_varlen_fwd_cpu)
    if _backend.has_kernel("flash_attn_varlen_bwd"):
        torch.library.register_fake("gptkernels::flash_attn_varlen_bwd")(_varlen_bwd_fake)
        torch.library.impl("gptkernels::flash_attn_varlen_bwd", "CPU")(_varlen_bwd_cpu)
    if _backend.has_kernel("flash_attn_varlen_decode"):
        torch.library.register_fake("gptkernels::flash_attn_varlen_decode")(_varlen_decode_fake)
        torch.library.impl("gptkernels::flash_attn_varlen_decode", "CPU")(_varlen_decode_cpu)
    torch.library.register_autograd("gptkernels::flash_attn_varlen_fwd", _varlen_backward, setup_context=_varlen_setup)


# ---- dispatch ---------------------------------------------------------------------------------
LIMITS = _limits.family("attention")
_HAVE_FWD = _backend.has_kernel("flash_attn_fwd")
_HAVE_BWD = _backend.has_kernel("flash_attn_bwd")
_HAVE_DECODE = _backend.has_kernel("flash_attn_decode")
_HAVE_VARLEN_FWD = _backend.has_kernel("flash_attn_varlen_fwd")
_HAVE_VARLEN_BWD = _backend.has_kernel("flash_attn_varlen_bwd")
_HAVE_VARLEN_DECODE = _backend.has_kernel("flash_attn_varlen_decode")
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


def _unsupported(q, head_dim: int, sq: int, sk: int, scale: float, kv_lens, needs_grad: bool,
                 variants: tuple[str, ...] = ()) -> str | None:
    """None when the attention kernels take this call, else a short reason they do not. variants:
    the LIMITS["variants"] names the call uses (variants_used(); "varlen" for flash_attention_varlen)."""
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
    missing = [name for name in variants if name not in LIMITS.get("variants", ())]
    if missing:
        return f"{', '.join(missing)} (not among the kernels' variants {list(LIMITS.get('variants', ()))})"
    return None


def _attention_kernel(q, k, v, causal, scale, layout, kv_lens, deterministic, needs_grad, window=NO_WINDOW,
                      softcap=0.0):
    kl = None if kv_lens is None else kv_lens.to(torch.int32)
    if not needs_grad and _HAVE_DECODE:  # (it picks its engine and number of key splits itself)
        return torch.ops.gptkernels.flash_attn_decode(q, k, v, causal, scale, layout, kl,
                                                      *_variant_args("flash_attn_decode", *window, softcap))
    return torch.ops.gptkernels.flash_attn_fwd(q, k, v, causal, scale, layout, kl, bool(deterministic),
                                               *_variant_args("flash_attn_fwd", *window, softcap))


def _attention_torch(q, k, v, causal, scale, layout, kv_lens, deterministic, needs_grad, window=NO_WINDOW,
                     softcap=0.0):
    return attention_torch(q, k, v, causal, scale, layout, kv_lens, window=window, softcap=softcap,
                           deterministic=bool(deterministic))


def _attention_reference(q, k, v, causal, scale, layout, kv_lens, deterministic, needs_grad, window=NO_WINDOW,
                         softcap=0.0):
    out, lse = attention_ref(q, k, v, causal, scale, layout, kv_lens, window=window, softcap=softcap)
    return out.contiguous(), lse


# What each path (gptkernels._backend) runs.
FLASH_ATTENTION = {"kernel": _attention_kernel, "torch": _attention_torch, "reference": _attention_reference}


def flash_attention(q, k, v, causal: bool = False, scale: float | None = None, layout: str = "bhsd", kv_lens=None,
                    deterministic: bool | None = None, window=NO_WINDOW, softcap: float = 0.0):
    """(out, lse): exact attention, see the module docstring. Differentiable in q, k, v (and through
    lse). out is contiguous in `layout` (a "bshd" out views as (B, S, H*D) without a copy); lse is
    fp32 [B, Hq, Sq]. window = (left, right): sliding-window attention (-1 = unbounded; (w, 0) with
    causal=True is a causal window of w + 1 keys); softcap > 0 caps the scores. deterministic: a
    backward with a fixed reduction order (default: follow torch.are_deterministic_algorithms_enabled();
    the kernel's default backward is not)."""
    B, Hq, Hkv, Sq, Sk, D = check_attention_inputs(q, k, v, layout, kv_lens)
    causal, wl, wr, softcap = check_variant_args(causal, window, softcap)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    why = _unsupported(q, D, Sq, Sk, scale, kv_lens, needs_grad, variants_used(wl, wr, softcap))
    fn = FLASH_ATTENTION[_backend.path("flash_attention", (q, k, v, kv_lens), why)]
    return fn(q, k, v, causal, scale, layout, kv_lens, deterministic, needs_grad, (wl, wr), softcap)


def _varlen_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, deterministic, needs_grad,
                   same_lengths):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # (the kernels need a unit last stride)
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    if not needs_grad and _HAVE_VARLEN_DECODE:
        return torch.ops.gptkernels.flash_attn_varlen_decode(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale,
                                                             window[0], window[1], softcap)
    return torch.ops.gptkernels.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window[0],
                                                      window[1], softcap, bool(deterministic))


def _varlen_torch(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, deterministic, needs_grad,
                  same_lengths):
    return attention_varlen_torch(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap,
                                  bool(deterministic), same_lengths)


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, deterministic, needs_grad,
                      same_lengths):
    return attention_varlen_ref(q, k, v, cu_q, cu_k, causal, scale, window, softcap)


FLASH_ATTENTION_VARLEN = {"kernel": _varlen_kernel, "torch": _varlen_torch, "reference": _varlen_reference}


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           causal: bool = False, scale: float | None = None, window=NO_WINDOW, softcap: float = 0.0,
                           deterministic: bool | None = None, check_inputs: bool = True):
    """(out (total_q, Hq, D) contiguous, lse fp32 (Hq, total_q)): attention over a packed batch of
    variable-length sequences (module docstring; FlashAttention's flash_attn_varlen_func layout).
    q/k/v may be strided views (e.g. of a packed (total, 3, H, D) QKV) with a contiguous last dim.
    Differentiable in q, k, v (and through lse). check_inputs=True also checks the cu_seqlens values
    against the totals and the max_seqlen bounds (one host sync; skipped while torch.compile traces);
    False checks only shapes, dtypes and devices."""
    B, Hq, Hkv, D, same = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              check_values=check_inputs)
    causal, wl, wr, softcap = check_variant_args(causal, window, softcap)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    why = ("varlen not in this build of the extension" if not _HAVE_VARLEN_FWD else
           _unsupported(q, D, max_seqlen_q, max_seqlen_k, scale, None, needs_grad,
                        ("varlen",) + variants_used(wl, wr, softcap)))
    path = _backend.path("flash_attention_varlen", (q, k, v, cu_seqlens_q, cu_seqlens_k), why)
    return FLASH_ATTENTION_VARLEN[path](q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                                        (wl, wr), softcap, deterministic, needs_grad, same)


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
