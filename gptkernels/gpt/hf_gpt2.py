"""Reading a Hugging Face GPT-2 checkpoint directory (local files only; nothing is downloaded).

  config = read_config(path, dropout)          config.json -> GPTConfig (unsupported variants refused)
  state, source = read_weights(path)           model.safetensors, a sharded index, or pytorch_model.bin
  to_gpt_state_dict(state, expected, tie, source)  GPT-2 names and layouts -> ours

Weights are read with safetensors or torch.load(weights_only=True): nothing arbitrary is
unpickled. The names map one to one: GPT-2's transformer.h.i.{ln_1, attn.c_attn, attn.c_proj,
ln_2} are ours (each Block owns the LayerNorms it applies, as in GPT-2); mlp.c_fc / mlp.c_proj are
FusedMLP's mlp.fc / mlp.proj. GPT-2's Conv1D weights are stored (in, out) and are transposed to
nn.Linear's (out, in); c_attn is already our fused q|k|v. GPT.from_pretrained puts it together.
"""
from __future__ import annotations

import json
import os

import torch

from gptkernels.gpt.config import GPTConfig

# GPT-2's activation_function names -> ours (gelu_new, gelu_fast and gelu_pytorch_tanh are all the
# tanh approximation).
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu": "gelu", "relu": "relu"}
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_config(path: str, dropout: float = 0.0) -> GPTConfig:
    """The GPTConfig of a GPT-2 checkpoint directory's config.json (dropout is ours to choose)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory (from_pretrained reads a local Hugging Face GPT-2 "
                                "checkpoint directory; nothing is downloaded)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: not found (a Hugging Face checkpoint directory has config.json)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(d).__name__}")
    if d.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{cfg_path}: model_type {d['model_type']!r} is not supported (expected 'gpt2')")
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if k not in d]
    if missing:
        raise ValueError(f"{cfg_path}: missing GPT-2 config fields {missing}")
    act = d.get("activation_function", "gelu_new")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{cfg_path}: activation_function {act!r} is not supported (expected one of "
                         f"{sorted(HF_ACTIVATIONS)})")
    if d.get("n_inner") not in (None, 4 * d["n_embd"]):
        raise ValueError(f"{cfg_path}: n_inner={d['n_inner']} is not supported (the MLP is 4 * n_embd wide)")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if d.get(key, ok) != ok:
            raise ValueError(f"{cfg_path}: {key}={d[key]} is not supported (expected {ok})")
    try:
        return GPTConfig(vocab_size=d["vocab_size"], block_size=d["n_positions"], n_layer=d["n_layer"],
                         n_head=d["n_head"], n_embd=d["n_embd"], dropout=dropout, bias=True,
                         pos_embedding="learned", activation=HF_ACTIVATIONS[act],
                         tie_embeddings=bool(d.get("tie_word_embeddings", True)),
                         layer_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)))
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None


def _load_safetensors(file: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def read_weights(path: str):
    """(the checkpoint's tensors by name, the file(s) they came from)."""
    st = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        return _load_safetensors(st), st
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        state = {}
        for shard in shards:
            file = os.path.join(path, shard)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file}: listed in {index} but not found")
            state.update(_load_safetensors(file))
        return state, index
    if os.path.isfile(pt):
        try:  # weights_only: tensors and plain containers; anything else is refused, never run
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, EOFError, ...)
            raise ValueError(f"{pt}: not a readable weights-only PyTorch checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{pt}: expected a dict of tensors (a state_dict)")
        return state, pt
    raise FileNotFoundError(f"{path}: no weights found (expected model.safetensors, model.safetensors.index.json "
                            "or pytorch_model.bin)")


def to_gpt_state_dict(state: dict, expected: dict, tie_embeddings: bool, source: str) -> dict:
    """Rename and transpose a GPT-2 checkpoint's tensors into our GPT's state_dict (`expected`:
    the state_dict of a GPT built from read_config); clear errors for missing, unexpected or
    mis-shaped tensors."""
    out = {}
    for key, t in state.items():
        name = key.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal-mask buffers older GPT-2 checkpoints carry
        if name != "lm_head.weight":
            if name.endswith(_CONV1D_WEIGHTS):
                t = t.t()  # Conv1D (in, out) -> Linear (out, in)
            name = "transformer." + name.replace(".mlp.c_fc.", ".mlp.fc.").replace(".mlp.c_proj.", ".mlp.proj.")
        out[name] = t
    if tie_embeddings and "transformer.wte.weight" in out:
        head = out.get("lm_head.weight")
        if head is not None and not torch.equal(head, out["transformer.wte.weight"]):
            raise ValueError(f"{source}: lm_head.weight differs from wte.weight but config.json says "
                             "tie_word_embeddings=true")
        out["lm_head.weight"] = out["transformer.wte.weight"]
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: does not match a GPT-2 with this config.json: missing {missing[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{'...' if len(unexpected) > 8 else ''}")
    for name, t in out.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{source}: {name} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)} "
                             "from config.json")
        if not t.is_floating_point():
            raise ValueError(f"{source}: {name} has dtype {t.dtype}, expected a floating-point tensor")
    return out
