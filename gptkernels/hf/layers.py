"""LayerNorm and GELU/ReLU MLP swaps for Hugging Face models, keeping every parameter object.

- LayerNorm: an existing `torch.nn.LayerNorm` becomes a `LayerNorm` below by class swap (same module
  object, same parameters, same state_dict keys). It is both a gptkernels.nn.LayerNorm (our forward)
  and a torch.nn.LayerNorm, so isinstance checks keep working (the HF Trainer keeps LayerNorm weights
  out of weight decay by `isinstance(m, nn.LayerNorm)`).
- MLP modules whose forward is exactly `[dropout](proj(act(fc(x))))` (listed in MLP_SPECS by class,
  with a GELU or ReLU `act`): forward replaced on the instance by
    nn.Linear weights:  gptkernels' fused MLP (one op each way: GEMM + bias + act epilogue, GEMM; the
                        backward applies act' in the epilogue of the second GEMM);
    GPT-2's Conv1D ([in, out] weights): x @ W as stored (no transposed copy), then our fused
                        bias + activation kernel, then the Conv1D projection.
- Layers that apply the activation right after their first projection inside a bigger forward
  (FC_ACT_SPECS, e.g. OPT's decoder layer): the projection runs `linear_act` (GEMM + bias + act
  epilogue) and the activation module becomes an identity (ActivationFusedInto).
Both check at each call that the projections are still the modules they were patched on, and run
the original computation otherwise (a LoRA wrapper added after patching keeps working).
"""
from __future__ import annotations

import types

import torch
from torch import nn
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation
from transformers.pytorch_utils import Conv1D

import gptkernels.nn as gnn
from gptkernels.nn import functional as GF


class LayerNorm(gnn.LayerNorm, nn.LayerNorm):
    """gptkernels.nn.LayerNorm that is also a torch.nn.LayerNorm (same constructor and attributes)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        nn.LayerNorm.__init__(self, normalized_shape, eps, elementwise_affine, bias, device, dtype)


def swap_layer_norm(module: nn.Module):
    """Turn an nn.LayerNorm (exactly that type) into our LayerNorm in place; returns the undo."""
    module.__class__ = LayerNorm

    def undo():
        module.__class__ = nn.LayerNorm
    return undo


# ---- activations ------------------------------------------------------------------------------------

def activation_name(act) -> str | None:
    """Our activation name for a transformers/torch activation module, or None if we have none
    computing exactly the same function."""
    t = type(act)
    if t in (NewGELUActivation, GELUTanh):  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return "gelu_tanh"
    if t is GELUActivation:                 # erf GELU (torch's or the Python formula)
        return "gelu"
    if t is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if t is nn.ReLU:
        return "relu"
    return None


def _bias_act(h, bias, activation: str):
    if activation == "relu":
        return GF.bias_relu(h, bias)
    return GF.bias_gelu(h, bias, approximate="tanh" if activation == "gelu_tanh" else "none")


# ---- MLP modules --------------------------------------------------------------------------------------

# class name -> (first projection, activation, second projection, dropout: module attr / "p:<float attr>" / None)
MLP_SPECS = {
    "GPT2MLP": ("c_fc", "act", "c_proj", "dropout"),
    "GPTNeoMLP": ("c_fc", "act", "c_proj", "dropout"),
    "GPTJMLP": ("fc_in", "act", "fc_out", "dropout"),
    "GPTBigCodeMLP": ("c_fc", "act", "c_proj", "dropout"),
    "GPTNeoXMLP": ("dense_h_to_4h", "act", "dense_4h_to_h", None),
    "PhiMLP": ("fc1", "activation_fn", "fc2", None),
    "FalconMLP": ("dense_h_to_4h", "act", "dense_4h_to_h", None),
    "Starcoder2MLP": ("c_fc", "act", "c_proj", "p:residual_dropout"),
}
# class name -> (projection followed directly by the activation, activation)
FC_ACT_SPECS = {
    "OPTDecoderLayer": ("fc1", "activation_fn"),
}


def _is_linear(m) -> bool:
    # FalconLinear computes x @ W.T + b as nn.Linear does
    return type(m) is nn.Linear or (isinstance(m, nn.Linear) and type(m).__name__ == "FalconLinear")


def _from_transformers(module) -> bool:
    return type(module).__module__.startswith("transformers.models.")


def mlp_plan(module) -> tuple | None:
    """(fc, activation, proj, dropout) when `module` is an MLP we fuse, else None."""
    spec = MLP_SPECS.get(type(module).__name__)
    if spec is None or not _from_transformers(module):
        return None
    fc_name, act_name, proj_name, drop = spec
    fc, act, proj = (getattr(module, n, None) for n in (fc_name, act_name, proj_name))
    activation = activation_name(act)
    if activation is None:
        return None
    conv = type(fc) is Conv1D and type(proj) is Conv1D
    if not conv and not (_is_linear(fc) and _is_linear(proj)):
        return None
    if drop is not None and not drop.startswith("p:") and not isinstance(getattr(module, drop, None), nn.Dropout):
        return None
    return fc_name, activation, proj_name, drop


def _fused_mlp_forward(self, hidden_states):
    fc_name, activation, proj_name, drop = self._gptkernels_mlp
    fc, proj = getattr(self, fc_name), getattr(self, proj_name)
    planned_fc, planned_proj = self._gptkernels_mlp_modules
    if fc is not planned_fc or proj is not planned_proj:  # replaced since patching (e.g. wrapped by LoRA)
        return type(self).forward(self, hidden_states)
    if type(fc) is Conv1D:  # weights [in, out]: the product as stored, then the fused bias + activation
        h = _bias_act(torch.matmul(hidden_states, fc.weight), fc.bias, activation)
        y = proj(h)
    else:
        y = GF.fused_mlp(hidden_states, fc.weight, fc.bias, proj.weight, proj.bias, activation)
    if drop is None:
        return y
    if drop.startswith("p:"):
        return nn.functional.dropout(y, p=getattr(self, drop[2:]), training=self.training)
    return getattr(self, drop)(y)


def swap_mlp(module: nn.Module, plan: tuple):
    """Install the fused forward on this MLP instance; returns the undo. If its projections are
    replaced later (a LoRA wrapper, a quantized layer), the module runs its own forward again."""
    module._gptkernels_mlp = plan
    module._gptkernels_mlp_modules = [getattr(module, plan[0]), getattr(module, plan[2])]  # a list: not submodules
    module.forward = types.MethodType(_fused_mlp_forward, module)

    def undo():
        for n in ("forward", "_gptkernels_mlp", "_gptkernels_mlp_modules"):
            delattr(module, n)
    return undo


# ---- projection + activation inside a layer --------------------------------------------------------

def fc_act_plan(module) -> tuple | None:
    """(projection name, activation name, activation) when `module` is a layer in FC_ACT_SPECS."""
    spec = FC_ACT_SPECS.get(type(module).__name__)
    if spec is None or not _from_transformers(module):
        return None
    fc_name, act_name = spec
    fc, act = getattr(module, fc_name, None), getattr(module, act_name, None)
    activation = activation_name(act)
    if activation is None or not _is_linear(fc):
        return None
    return fc_name, act_name, activation


class ActivationFusedInto(nn.Module):
    """Stands in for an activation that the preceding projection now applies (linear_act). Applies the
    original activation again if that projection has been replaced in its layer since (e.g. wrapped
    by a LoRA layer, which then calls it as its base layer and adds its own term)."""

    def __init__(self, act: nn.Module, owner: nn.Module, fc_name: str, fc: nn.Module):
        super().__init__()
        self.act = act
        self._site = [owner, fc_name, fc]  # a list: neither is a submodule of this one

    def forward(self, x):
        owner, fc_name, fc = self._site
        return x if getattr(owner, fc_name) is fc else self.act(x)


def _linear_act_forward(self, x):
    owner, fc_name, activation = self._gptkernels_fc_act
    if getattr(owner, fc_name) is not self:  # called as another module's base layer: a plain linear
        return type(self).forward(self, x)
    return GF.linear_act(x, self.weight, self.bias, activation)


def swap_fc_act(module: nn.Module, plan: tuple):
    """The projection applies the activation (linear_act), the activation module becomes identity."""
    fc_name, act_name, activation = plan
    fc, act = getattr(module, fc_name), getattr(module, act_name)
    fc._gptkernels_fc_act = [module, fc_name, activation]
    fc.forward = types.MethodType(_linear_act_forward, fc)
    setattr(module, act_name, ActivationFusedInto(act, module, fc_name, fc))

    def undo():
        setattr(module, act_name, act)
        del fc.forward
        del fc._gptkernels_fc_act
    return undo
