"""gptkernels.hf.patch(model): swap a Hugging Face model's layers for gptkernels' in place.

Every swap keeps the model's parameter objects (same storage, same state_dict keys), so optimizers,
checkpoints and save_pretrained keep working. All swaps are planned first and applied together; if
one fails, the ones already applied are undone before the error propagates (nothing half-patched).
What was done is recorded in `model.gptkernels_patched` (a PatchReport).
"""
from __future__ import annotations

import dataclasses
import types
import warnings

from torch import nn

from gptkernels.hf import attention as _attention
from gptkernels.hf import layers as _layers
from gptkernels.hf import loss as _loss

# model_type of the architectures the test suite checks patched against unpatched
TESTED = ("gpt2", "gpt_neo", "gptj", "opt", "gpt_neox", "llama", "mistral", "phi", "gpt_bigcode", "starcoder2",
          "falcon", "bloom")


@dataclasses.dataclass
class PatchReport:
    """What gptkernels.hf.patch changed on a model."""
    model_type: str
    layer_norm: list = dataclasses.field(default_factory=list)   # module names now gptkernels LayerNorm
    mlp: list = dataclasses.field(default_factory=list)          # module names with the fused MLP forward
    attention: str | None = None                                 # how attention is routed, or None
    cross_entropy: bool = False                                  # fused LM loss installed
    skipped: dict = dataclasses.field(default_factory=dict)      # requested part -> why it was not done

    def __deepcopy__(self, memo):  # copy.deepcopy(model) makes a patched twin (the swaps are per instance)
        return dataclasses.replace(self, layer_norm=list(self.layer_norm), mlp=list(self.mlp),
                                   skipped=dict(self.skipped))

    def __reduce__(self):
        raise TypeError("a model patched by gptkernels.hf cannot be pickled whole (its forwards are replaced "
                        "per instance): save its state_dict() or use save_pretrained(), and patch after loading")

    def summary(self) -> str:
        parts = [f"{len(self.layer_norm)} LayerNorm", f"{len(self.mlp)} MLP",
                 f"attention: {self.attention or 'unchanged'}",
                 f"loss: {'linear_cross_entropy' if self.cross_entropy else 'unchanged'}"]
        skipped = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return f"gptkernels.hf.patch({self.model_type}): " + ", ".join(parts) + (f" (skipped {skipped})" if skipped
                                                                                  else "")


def _attention_plan(model):
    """("interface", None) | ("gpt_neo", [modules]) | (None, reason)."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return None, "attention logit softcapping (neither the kernels nor sdpa compute it)"
    neo = [m for m in model.modules() if type(m).__name__ == "GPTNeoSelfAttention" and _layers._from_transformers(m)]
    if neo:
        if config._attn_implementation not in ("eager", "sdpa", _attention.NAME):
            return None, f"GPT-Neo with attn_implementation={config._attn_implementation!r}"
        return "gpt_neo", neo
    if type(model)._can_set_attn_implementation():
        return "interface", None
    return None, f"{type(model).__name__} does not route its attention through transformers' AttentionInterface"


def _apply_attention(model, kind, modules):
    if kind == "interface":
        previous = model.config._attn_implementation
        model.set_attn_implementation(_attention.NAME)
        if model.config._attn_implementation != _attention.NAME:
            raise RuntimeError(f"set_attn_implementation({_attention.NAME!r}) did not take effect")
        return (lambda: model.set_attn_implementation(previous)), f"attn_implementation={_attention.NAME!r}"
    previous = model.config._attn_implementation
    for m in modules:
        m._attn = types.MethodType(_attention.gpt_neo_attn, m)
    model.config._attn_implementation = _attention.NAME  # masks from gptkernels_mask (GPT-Neo's modules are built)

    def undo():
        model.config._attn_implementation = previous
        for m in modules:
            vars(m).pop("_attn", None)
    return undo, f"GPT-Neo self-attention modules ({len(modules)}), masks from {_attention.NAME!r}"


def patch(model, *, layer_norm: bool = True, mlp: bool = True, attention: bool = True, cross_entropy: bool = True):
    """Swap `model`'s layers for gptkernels' in place and return it. See gptkernels/hf/__init__.py."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers PreTrainedModel), got "
                        f"{type(model).__name__}")
    if getattr(model, "gptkernels_patched", None) is not None:
        raise ValueError("model: already patched by gptkernels.hf.patch (see model.gptkernels_patched)")
    config = getattr(model, "config", None)
    report = PatchReport(getattr(config, "model_type", type(model).__name__))

    # ---- plan (nothing changes yet) ----
    ln = [(n, m) for n, m in model.named_modules() if type(m) is nn.LayerNorm] if layer_norm else []
    mlps, fc_acts = [], []
    if mlp:
        for n, m in model.named_modules():
            if (p := _layers.mlp_plan(m)) is not None:
                mlps.append((n, m, p))
            elif (p := _layers.fc_act_plan(m)) is not None:
                fc_acts.append((n, m, p))
        if not mlps and not fc_acts:
            report.skipped["mlp"] = "no GELU/ReLU MLP of a known form"
    attn_kind, attn_arg = (None, None)
    if attention:
        if config is None:
            report.skipped["attention"] = "no transformers config"
        else:
            attn_kind, attn_arg = _attention_plan(model)
            if attn_kind is None:
                report.skipped["attention"] = attn_arg
    loss_ok = False
    if cross_entropy:
        why = _loss.unsupported_reason(model)
        loss_ok = why is None
        if why:
            report.skipped["cross_entropy"] = why

    # ---- apply, undoing everything on any error ----
    undos = []
    try:
        for n, m in ln:
            undos.append(_layers.swap_layer_norm(m))
            report.layer_norm.append(n)
        for n, m, p in mlps:
            undos.append(_layers.swap_mlp(m, p))
            report.mlp.append(n)
        for n, m, p in fc_acts:
            undos.append(_layers.swap_fc_act(m, p))
            report.mlp.append(f"{n}.{p[0]}+{p[1]}")
        if attn_kind is not None:
            undo, how = _apply_attention(model, attn_kind, attn_arg)
            undos.append(undo)
            report.attention = how
        if loss_ok:
            undos.append(_loss.install(model))
            why = _loss.probe(model)
            if why is None:
                report.cross_entropy = True
            else:
                undos.pop()()
                report.skipped["cross_entropy"] = why
        model.gptkernels_patched = report
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise
    if report.model_type not in TESTED:
        warnings.warn(report.summary() + " [architecture not in gptkernels' tests]", stacklevel=2)
    return model
