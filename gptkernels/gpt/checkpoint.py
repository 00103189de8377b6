"""Checkpoint files: writing them atomically, reading them safely, and turning one (or a Hugging
Face GPT-2 folder) back into a model.

A training checkpoint (`<out_dir>/ckpt.pt`, written by gptkernels.gpt.train) is a dict of plain
data: format/version, step, tokens, model (a full state_dict), optimizer (keyed by parameter
name), scheduler, data position, every rank's RNG state, model_config and train_config (plain
dicts), world_size, data_dir and the tokenizer (tokenizer.json as a string). It is read with
torch.load(weights_only=True): tensors and containers only, nothing arbitrary is unpickled.
tests/data/ckpt_v1 keeps one written by an earlier release; it must keep loading.
"""
from __future__ import annotations

import os

import torch

from gptkernels.gpt.atomic import AtomicFile
from gptkernels.gpt.config import GPTConfig
from gptkernels.gpt.model import GPT
from gptkernels.gpt.tokenizer import Tokenizer

CKPT_FORMAT = "gptkernels-checkpoint"
CKPT_VERSION = 1
CKPT_NAME = "ckpt.pt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or is not one of ours."""


def save_atomic(obj, path: str) -> None:
    """torch.save(obj) to path via a temporary file and a rename (see atomic.py)."""
    with AtomicFile(path) as f:
        torch.save(obj, f)


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by training (ckpt.pt, or the run folder holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, CKPT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: not a gptkernels checkpoint")
    return ck


def clean_gpt_state_dict(state_dict: dict, tie_embeddings: bool = True) -> dict:
    """A GPT state_dict as saved by a training run, ready for GPT.load_state_dict: drops the
    "_orig_mod." (torch.compile) and "module." (DDP) prefixes and restores lm_head.weight from the
    token embedding when the embeddings are tied and the head was not saved."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            k = k.removeprefix(prefix)
        out[k] = v
    if tie_embeddings and "lm_head.weight" not in out and "transformer.wte.weight" in out:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def gpt_from_checkpoint(ck: dict) -> GPT:
    """The GPT a training checkpoint holds (float32, on the CPU, in train mode)."""
    config = GPTConfig.from_dict(ck["model_config"])
    model = GPT(config)
    model.load_state_dict(clean_gpt_state_dict(ck["model"], config.tie_embeddings))
    return model


def load_model(source: str, device="cpu"):
    """(model in eval mode on device, tokenizer, kind) from a training checkpoint (ckpt.pt or its
    run folder; kind "ckpt") or a Hugging Face GPT-2 folder (config.json + model.safetensors /
    pytorch_model.bin + tokenizer files; kind "hf")."""
    source = os.fspath(source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"no such checkpoint or model folder: {source}")
    is_hf = (os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json"))
             and not os.path.isfile(os.path.join(source, CKPT_NAME)))
    if is_hf:
        model, tok, kind = GPT.from_pretrained(source), Tokenizer.load(source), "hf"
    else:
        ck = load_checkpoint(source)
        model, tok, kind = gpt_from_checkpoint(ck), Tokenizer.from_json_str(ck["tokenizer"]), "ckpt"
    return model.to(torch.device(device)).eval(), tok, kind


def full_state_dicts(model, optimizer):
    """Full (unsharded) model and optimizer state dicts on the CPU, keyed by parameter name, so a
    checkpoint moves between one process, DDP and FSDP (collective under FSDP: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model, optimizer, ck: dict) -> None:
    """The inverse of full_state_dicts, from a checkpoint (into a plain, DDP or FSDP model)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=ck["model"], optim_state_dict=ck["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
