"""attn_implementation="gptkernels": Hugging Face attention through gptkernels.ops.flash_attention.

Registered under one name in two transformers registries:
- AttentionMaskInterface: `gptkernels_mask` builds exactly the mask "sdpa" would (None or a boolean
  [B, 1, Sq, Sk] tensor, transformers' own `sdpa_mask`) and, when it is a tensor, works out once per
  forward whether the kernels can express it (`MaskPlan`, kept on the tensor as an attribute);
- AttentionInterface: `gptkernels_attention_forward` runs each layer with the kernel when the call
  is exactly expressible, and otherwise calls transformers' `sdpa_attention_forward` with the very
  arguments it was given, so the result has the "sdpa" semantics in every case.

What the kernels express (flash_attention: causal aligned bottom-right, `kv_lens` = a per-batch
prefix of valid keys, GQA, any scale, a causal sliding window, softcap; no dropout, no bias):
- no mask (sdpa's `is_causal` path): causal when Sq > 1 (keys cropped to Sq when Sk > Sq, as the
  sdpa integration does for a static cache's prefill), full attention when Sq == 1 or non-causal;
- a mask equal to "causal bottom-right over the first kv_lens[b] keys" or "the first kv_lens[b]
  keys" (a right-padded KV cache, e.g. a static cache while decoding; a sliding window that does
  not bite);
- a right-padded causal square (training or prefill on right-padded batches): the kernel computes
  every row causally, which is exact for the valid rows; the rows past a sequence's end (they see
  all of its keys, not a causal prefix) are recomputed with sdpa and taken from there.
Everything else (left padding, packed sequences, dropout > 0, position_bias, a user-supplied float
mask, tracing under torch.compile) runs sdpa; with `softcap` (which sdpa refuses) the model's own
eager attention.

Sliding windows: HF passes `sliding_window` W to the attention function (Mistral, Qwen2, Gemma-2's
local layers) and builds the mask with masking_utils.sliding_window_overlay, `kv_idx > q_idx - W`
on top of causal_mask_function `kv_idx <= q_idx` (transformers 5.24): query i sees keys
i - W < j <= i, i.e. W keys, FlashAttention's window (W - 1, 0). W is only a hint here: the plan is
taken only when the mask tensor equals that window pattern (else sdpa, which reads the mask alone).
Softcap: Gemma-2's eager_attention_forward computes scores * scaling, then softcap * tanh(. / softcap)
before the mask, the order flash_attention's softcap uses.
"""
from __future__ import annotations

import collections
import dataclasses
import sys

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

import gptkernels
from gptkernels.ops import flash_attention

NAME = "gptkernels"
_PLAN_ATTR = "_gptkernels_mask_plan"
# Calls per path since import: "flash_attention" (our op: the kernel on a GPU, its reference on the CPU),
# "split" (of those, the right-padded squares whose padded rows were redone with sdpa), "sdpa" (the
# call was not expressible), "eager" (softcap calls, or padded rows of one, the kernels do not take: the
# model's eager attention). Tests read it to know which path ran.
PATHS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class MaskPlan:
    """How the kernels compute a boolean [B, 1, Sq, Sk] mask. kind "kernel": one flash_attention
    call (causal, kv_lens or None); kind "split": causal rows plus sdpa for the rows of each batch at
    or past lens[b] (from row `first_padded` on). window_left >= 0: the causal rows see only the keys
    j >= i + offset - window_left (flash_attention's window (window_left, 0))."""
    kind: str
    sq: int
    sk: int
    causal: bool = True
    kv_lens: torch.Tensor | None = None
    lens: torch.Tensor | None = None
    first_padded: int = 0
    window_left: int = -1


def analyse_mask(mask: torch.Tensor, window_left: int = -1) -> MaskPlan | None:
    """The kernel plan equal to `mask` (boolean, [B, 1, Sq, Sk]), or None. One host sync.
    window_left >= 0: match the causal patterns within that window instead of unbounded ones."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or 0 in mask.shape:
        return None
    B, _, sq, sk = mask.shape
    m = mask[:, 0]
    dev = m.device
    i = torch.arange(sq, device=dev)[None, :, None]
    j = torch.arange(sk, device=dev)[None, None, :]
    # one past the last key seen by the last row: kv_lens of a causal plan (its diagonal key is seen)
    last = (m[:, -1, :] * (j[0] + 1)).amax(-1)
    # one past the last key seen by any row: a right-padded square's lengths (row j sees key j)
    lens = (m.any(1) * (j[0] + 1)).amax(-1)
    first = m[:, 0, :].sum(-1)                     # keys seen by the first row: kv_lens of a full plan

    def within(off):
        return True if window_left < 0 else j >= i + off - window_left

    off = (last - sq)[:, None, None]
    causal = (j < last[:, None, None]) & (j <= i + off) & within(off)
    full = (j < first[:, None, None]).expand(B, sq, sk)
    no = torch.zeros((), dtype=torch.bool, device=dev)
    tests = [(causal == m).all(), no if window_left >= 0 else (full == m).all(), (last == sk).all(),
             (first == sk).all(),
             ((j <= i) & (j < lens[:, None, None]) & within(0) == m).all() if sq == sk else no]
    flags = torch.stack([t.long() for t in tests] + [lens.min().long()]).tolist()
    if flags[0]:
        return MaskPlan("kernel", sq, sk, True, None if flags[2] else last.to(torch.int32), window_left=window_left)
    if flags[1]:
        return MaskPlan("kernel", sq, sk, False, None if flags[3] else first.to(torch.int32))
    if flags[4]:
        return MaskPlan("split", sq, sk, True, lens=lens, first_padded=flags[5], window_left=window_left)
    return None


_NONE = MaskPlan("sdpa", 0, 0)  # analysed: not expressible


def mask_plan(mask: torch.Tensor, window_left: int = -1) -> MaskPlan | None:
    """The plan of a boolean 4-D mask, analysed on first use and kept on the tensor (every layer of a
    forward gets the same mask object: one analysis, one host sync per forward and window). Without
    a window first (a window that does not bite needs no window), then within `window_left` when
    that is >= 0. None under tracing."""
    plans = getattr(mask, _PLAN_ATTR, None)
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if plans is None:
        if tracing:
            return None
        plans = {}
        setattr(mask, _PLAN_ATTR, plans)
    for wl in dict.fromkeys((-1, max(window_left, -1))):
        if wl not in plans:
            if tracing:
                return None
            plans[wl] = analyse_mask(mask, wl) or _NONE
        if plans[wl] is not _NONE:
            return plans[wl]
    return None


def gptkernels_mask(*args, **kwargs):
    """AttentionMaskInterface entry: exactly sdpa's mask (None or boolean [B, 1, Sq, Sk]), made
    contiguous (generate() calls .contiguous() on it, which must keep this object) and analysed."""
    mask = sdpa_mask(*args, **kwargs)
    if isinstance(mask, torch.Tensor):
        mask = mask.contiguous()
        mask_plan(mask)
    return mask


# ---- running the kernel -------------------------------------------------------------------------

_KERNEL_OK: dict[tuple, bool] = {}


def _flash(q, k, v, causal: bool, scale, kv_lens=None, window_left: int = -1, softcap: float = 0.0):
    """flash_attention on (B, H, S, D) views, read as "bshd" (the projections' own layout: no copies).
    Returns the output as (B, Sq, Hq, D), or None when on a GPU the kernel does not support the call
    (the caller then runs sdpa, or eager for a softcap, rather than our reference math). On the CPU:
    the op's reference path.
    window_left >= 0 (causal only): the window (window_left, 0); softcap > 0 caps the scores."""
    qs, ks, vs = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    window = (window_left, 0) if causal and window_left >= 0 else (-1, -1)

    def call():
        out = flash_attention(qs, ks, vs, causal=causal, scale=scale, layout="bshd", kv_lens=kv_lens,
                              window=window, softcap=softcap)[0]
        PATHS["flash_attention"] += 1
        return out

    if not q.is_cuda or gptkernels.get_backend() != "auto":
        return call()
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = (q.device, q.dtype, q.shape[-1], needs_grad, kv_lens is not None, window != (-1, -1), softcap > 0)
    ok = _KERNEL_OK.get(key)
    if ok is None:  # ask the op once per kind of call: in "kernel" mode it raises before computing
        try:
            with gptkernels.backend("kernel"):
                out = call()
            _KERNEL_OK[key] = True
            return out
        except (ValueError, RuntimeError) as e:
            if "backend is 'kernel'" not in str(e):
                raise
            _KERNEL_OK[key] = False
            return None
    return call() if ok else None


def _supported_shapes(query, key, value) -> bool:
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        return False
    if not (query.dtype == key.dtype == value.dtype) or not (query.device == key.device == value.device):
        return False
    B, hq, _, d = query.shape
    if key.shape[0] != B or value.shape[0] != B or key.shape[-1] != d or value.shape[-1] != d:
        return False
    hkv = key.shape[1]
    return value.shape[1] == hkv and value.shape[2] == key.shape[2] and hkv > 0 and hq % hkv == 0


def _split_rows(module, query, key, value, mask, plan: MaskPlan, scaling, out, softcap: float = 0.0):
    """Rows at or past each sequence's end (right padding) from sdpa (with a softcap: the model's eager
    attention), the others from `out`."""
    p = plan.first_padded
    if p >= plan.sq:
        return out
    if softcap:
        tail, _ = _eager_softcap(module, query[:, :, p:], key, value, mask[:, :, p:], 0.0, scaling, False,
                                 softcap=softcap)
    else:
        tail, _ = sdpa_attention_forward(module, query[:, :, p:], key, value, mask[:, :, p:], dropout=0.0,
                                         scaling=scaling, is_causal=False)
    rows = torch.arange(p, plan.sq, device=out.device)
    valid = (rows[None, :] < plan.lens.to(out.device)[:, None])[:, :, None, None]
    return torch.cat([out[:, :p], torch.where(valid, out[:, p:], tail.to(out.dtype))], dim=1)


def kernel_attention(module, query, key, value, attention_mask, dropout: float, scaling, is_causal,
                     within_causal: bool = False, window_left: int = -1,
                     softcap: float = 0.0) -> torch.Tensor | None:
    """The attention output (B, Sq, Hq, D) through the kernels, or None when not expressible.
    within_causal: the caller also applies a bottom-right causal mask (GPT-Neo), so a non-causal
    plan is exact only for one query row. window_left: the window the mask may hold (HF's
    sliding_window - 1; a hint, checked against the mask); no mask means no window that bites (HF
    materialises the mask whenever kv_length >= sliding_window). softcap: scores capped (0: off)."""
    if dropout or not _supported_shapes(query, key, value):
        return None
    sq, sk = query.shape[2], key.shape[2]
    if attention_mask is None:
        causal = sq > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        if causal and sk > sq:    # sdpa's crop of an empty static cache's tail (top-left alignment)
            key, value = key[:, :, :sq], value[:, :, :sq]
        elif causal and sk < sq:  # top-left causal with more queries than keys: not bottom-right
            return None
        return _flash(query, key, value, causal, scaling, softcap=softcap)
    plan = None
    if attention_mask.dtype == torch.bool and attention_mask.dim() == 4:
        plan = mask_plan(attention_mask, window_left)
    if plan is None or (plan.sq, plan.sk) != (sq, sk) or attention_mask.shape[0] != query.shape[0]:
        return None
    if within_causal and not plan.causal and sq > 1:
        return None
    kv_lens = None if plan.kv_lens is None else plan.kv_lens.to(query.device)
    if kv_lens is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return None  # the kernels have no backward through kv_lens
    out = _flash(query, key, value, plan.causal, scaling, kv_lens, plan.window_left, softcap)
    if out is None or plan.kind == "kernel":
        return out
    PATHS["split"] += 1
    return _split_rows(module, query, key, value, attention_mask, plan, scaling, out, softcap)


def gptkernels_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """AttentionInterface entry, same contract as transformers' sdpa_attention_forward: inputs
    (B, H, S, D), returns ((B, Sq, Hq, D), None). kwargs `sliding_window` (W: keys i - W < j <= i) and
    `softcap` (Gemma-2's attn_logit_softcapping) as HF passes them."""
    softcap = kwargs.get("softcap")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
        raise ValueError(f"softcap: expected a positive finite number or None, got {softcap!r}")
    window = kwargs.get("sliding_window")
    window_left = window - 1 if isinstance(window, int) and window > 0 else -1
    out = None
    if kwargs.get("position_bias") is None and kwargs.get("s_aux") is None:
        dev = query.device.type
        if torch.is_autocast_enabled(dev) and query.is_floating_point():
            # as torch's SDPA under autocast: all three in the autocast dtype (e.g. Llama's RoPE leaves
            # q and k in float32 next to a bfloat16 v)
            dt = torch.get_autocast_dtype(dev)
            query, key, value = query.to(dt), key.to(dt), value.to(dt)
        out = kernel_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                               window_left=window_left, softcap=float(softcap or 0.0))
    if out is not None:
        return out, None
    if softcap is not None:
        return _eager_softcap(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    PATHS["sdpa"] += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _eager_softcap(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    """A softcap call the kernels do not take: the model's own eager_attention_forward (the one its
    "eager" implementation runs; sdpa refuses softcap), on sdpa's mask made additive. Raises as
    before for a model whose module has no eager function."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError("attn_implementation='gptkernels' supports `softcap` only where the kernels take the "
                         "call or the model has an eager_attention_forward; use attn_implementation='eager'")
    mask = attention_mask
    sq, sk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if mask is None and causal and sq > 1:  # sdpa's is_causal: top-left
        mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril()[None, None]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    PATHS["eager"] += 1
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    """Make "gptkernels" a valid attn_implementation (idempotent)."""
    AttentionInterface.register(NAME, gptkernels_attention_forward)
    AttentionMaskInterface.register(NAME, gptkernels_mask)


# ---- GPT-Neo: its own attention class (no AttentionInterface), patched per module -------------------

def gpt_neo_attn(self, query, key, value, attention_mask=None):
    """Replacement for GPTNeoSelfAttention._attn (installed per module by gptkernels.hf.patch, with the
    model's masks built by `gptkernels_mask`). Same math as the eager original: no scaling, the
    module's bottom-right causal (or local-window) `bias` intersected with the model's mask; in the
    kernel when the window does not bite and the mask is expressible, otherwise in torch's SDPA on
    fp32 queries and keys (as eager upcasts them). Returns ((B, H, Sq, D), None)."""
    sq, sk = query.shape[-2], key.shape[-2]
    window = self.config.window_size if self.attention_type == "local" else None
    dropout = self.attn_dropout.p if self.training else 0.0
    if window is None or sk <= window:
        out = kernel_attention(self, query, key, value, attention_mask, dropout, 1.0, True, within_causal=True)
        if out is not None:
            return out.transpose(1, 2), None
    PATHS["sdpa"] += 1
    mask = self.bias[:, :, sk - sq: sk, :sk]
    if attention_mask is None:
        if 1 < sq < sk:  # the sdpa convention of a None mask: top-left causal
            mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=mask.device).tril()
    elif attention_mask.dtype == torch.bool:
        mask = mask & attention_mask
    else:  # an additive float mask (a user's 4-D mask)
        mask = torch.where(mask, attention_mask.float(), torch.finfo(torch.float32).min)
    out = torch.nn.functional.scaled_dot_product_attention(query.float(), key.float(), value.float(), attn_mask=mask,
                                                           dropout_p=dropout, scale=1.0)
    return out.to(value.dtype), None
