"""The causal-LM loss from the final hidden states: gptkernels' chunked linear_cross_entropy, with no
[N, vocab] logits on its kernel path (CUDA, bf16/fp16; its float32/CPU reference forms them).

Generic, no copy of any model's forward. Three small pieces on the model instance:
- its `forward` (wrapped, with the class forward's signature): when the model is training and
  `labels` are given (and `logits_to_keep` is 0), it arms the fusion for this one call;
- the output embedding's (lm_head, an nn.Linear) forward: when armed it keeps its input (the final
  hidden states) and returns a placeholder tensor on the "meta" device, shaped like the logits
  (no memory, no compute);
- `loss_function` (the property HF models call as `self.loss_function(logits, labels, vocab_size,
  **kwargs)`): when handed that very placeholder it computes HF's ForCausalLMLoss (labels shifted
  by one, ignore_index, "mean", or "sum" / num_items_in_batch; `shift_labels` honoured) as
  linear_cross_entropy(hidden, lm_head.weight, labels, lm_head.bias); otherwise it is HF's loss.
The output then carries the loss and `logits=None` (as Liger-Kernel does). Without labels, or in eval
mode, everything is HF's own path and logits are returned.

After `install`, patch() runs `probe` (eval mode, no grad, three tokens): the model must pass the lm_head's
output straight to its loss function and return that loss, and the fused loss must equal HF's on the
probe. Models that post-process logits before their loss (softcapping, scaling, ...) fail it and
keep HF's loss; at run time the same identity is checked on every call.
"""
from __future__ import annotations

import functools
import inspect
import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

from gptkernels.ops import linear_cross_entropy


class FusionState:
    """Per-model state shared by the wrapped forward, the lm_head and the loss function."""

    def __init__(self, head: nn.Linear):
        self.head = head
        self.armed = False
        self.hidden = None
        self.placeholder = None
        self.head_calls = 0
        self.loss_calls = 0
        self.signature = None

    def reset(self):
        self.armed, self.hidden, self.placeholder, self.head_calls, self.loss_calls = False, None, None, 0, 0


def _head_forward(self, x):
    """lm_head forward: HF's own unless the fusion is armed."""
    st = self._gptkernels_fusion
    if not st.armed:
        return type(self).forward(self, x)
    st.head_calls += 1
    st.hidden = x
    st.placeholder = torch.empty((*x.shape[:-1], self.out_features), dtype=x.dtype, device="meta")
    return st.placeholder


class FusedCausalLMLoss:
    """Stands in for `model.loss_function`; HF's ForCausalLMLoss whenever the fusion is not armed."""

    def __init__(self, state: FusionState):
        self.state = state

    def __call__(self, logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs):
        st = self.state
        if not st.armed:
            return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                   ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if logits is not st.placeholder:
            raise RuntimeError("gptkernels.hf: this model changes the lm_head output before its loss, so the fused "
                               "loss cannot stand in for it; patch it with cross_entropy=False")
        st.loss_calls += 1
        return causal_lm_loss(st.hidden, st.head, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels)


def causal_lm_loss(hidden, head: nn.Linear, labels, vocab_size: int, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels=None):
    """HF's ForCausalLMLoss(head(hidden), labels, ...) through linear_cross_entropy."""
    if vocab_size != head.out_features:
        raise ValueError(f"vocab_size: the loss was asked for {vocab_size} classes but lm_head has "
                         f"{head.out_features} outputs")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.to(hidden.device).reshape(hidden.shape[:-1])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = linear_cross_entropy(hidden, head.weight, target, bias=head.bias, ignore_index=ignore_index,
                                reduction=reduction)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _call_args(state: FusionState, cls_forward, args, kwargs) -> dict:
    if not args:
        return kwargs
    if state.signature is None:
        state.signature = inspect.signature(cls_forward)
    try:
        bound = state.signature.bind_partial(None, *args, **kwargs)
    except TypeError:
        return kwargs
    return bound.arguments


def _drop_placeholder(out, placeholder):
    if isinstance(out, tuple):
        return tuple(v for v in out if v is not placeholder)
    if hasattr(out, "keys") and out.get("logits") is placeholder:
        return type(out)(**{k: (None if v is placeholder else v) for k, v in out.items()})
    return out


def fused_call(model, cls_forward, args, kwargs):
    """Run the class forward with the fusion armed; check that the loss came from our function."""
    st = model._gptkernels_fusion
    st.reset()
    st.armed = True
    try:
        out = cls_forward(model, *args, **kwargs)
        if st.head_calls != 1 or st.loss_calls != 1:
            raise RuntimeError(f"gptkernels.hf: expected the model to call its lm_head and its loss function once "
                               f"each, got {st.head_calls} and {st.loss_calls}; patch it with cross_entropy=False")
        return _drop_placeholder(out, st.placeholder)
    finally:
        st.reset()


def _wants_fusion(model, state, cls_forward, args, kwargs) -> bool:
    if not model.training:
        return False
    a = _call_args(state, cls_forward, args, kwargs)
    keep = a.get("logits_to_keep", 0)
    if a.get("labels") is None or isinstance(keep, torch.Tensor) or keep not in (0, None):
        return False
    return model.get_output_embeddings() is state.head and model.loss_function is model._gptkernels_loss_fn


def _make_forward(cls_forward):
    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        if _wants_fusion(self, self._gptkernels_fusion, cls_forward, args, kwargs):
            return fused_call(self, cls_forward, args, kwargs)
        return cls_forward(self, *args, **kwargs)
    return forward


def unsupported_reason(model) -> str | None:
    """Why the fused loss cannot be installed (before any probe), or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return "no output embedding (not a causal LM)"
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return f"the lm_head is a {type(head).__name__}, not an nn.Linear"
    loss_type = getattr(model, "loss_type", None)
    if "_loss_function" in vars(model) or LOSS_MAPPING.get(loss_type, ForCausalLMLoss) is not ForCausalLMLoss:
        return "the model's loss is not transformers' ForCausalLMLoss"
    if "forward" in vars(model) or "forward" in vars(head):
        return "the model's or the lm_head's forward is already replaced on the instance"
    return None


def install(model):
    """Install the fusion (see the module docstring); returns the undo."""
    head = model.get_output_embeddings()
    state = FusionState(head)
    model._gptkernels_fusion = state
    head._gptkernels_fusion = state
    head.forward = types.MethodType(_head_forward, head)
    model._gptkernels_loss_fn = FusedCausalLMLoss(state)
    model.loss_function = model._gptkernels_loss_fn
    model.forward = types.MethodType(_make_forward(type(model).forward), model)

    def undo():
        for obj, names in ((model, ("forward", "_loss_function", "_gptkernels_loss_fn", "_gptkernels_fusion")),
                           (head, ("forward", "_gptkernels_fusion"))):
            for n in names:
                if n in vars(obj):
                    delattr(obj, n)
    return undo


def probe(model) -> str | None:
    """Run HF's loss and the fused one on three tokens (eval, no grad); None when they agree and the
    model's structure is the one the fusion relies on, else the reason."""
    emb = model.get_input_embeddings()
    if emb is None or not hasattr(emb, "weight") or emb.weight.device.type == "meta":
        return "no input embedding on a real device to run the probe"
    vocab = model.get_output_embeddings().out_features
    ids = (torch.arange(3, device=emb.weight.device) % max(vocab, 1))[None]
    modes = {m: m.training for m in model.modules()}
    cls_forward = type(model).forward
    try:
        model.eval()
        with torch.no_grad():
            ref = cls_forward(model, input_ids=ids, labels=ids, use_cache=False)
            out = fused_call(model, cls_forward, (), dict(input_ids=ids, labels=ids, use_cache=False))
    except Exception as e:  # any failure: keep HF's loss, say why
        return f"probe failed: {type(e).__name__}: {str(e)[:200]}"
    finally:
        for m, t in modes.items():
            m.training = t
    ref_loss = ref["loss"] if hasattr(ref, "keys") else ref[0]
    loss = out["loss"] if hasattr(out, "keys") else out[0]
    tol = 1e-4 if ref_loss.dtype == torch.float32 and model.get_output_embeddings().weight.dtype == torch.float32 \
        else 2e-2
    if not (math.isfinite(float(loss)) and abs(float(loss) - float(ref_loss)) <= tol * max(1.0, abs(float(ref_loss)))):
        return f"probe: fused loss {float(loss):.6g} differs from the model's {float(ref_loss):.6g}"
    return None
