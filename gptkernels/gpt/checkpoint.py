"""Checkpoint files: writing them atomically with checksums, reading them safely, and turning one
(or a Hugging Face GPT-2 folder) back into a model.

A training checkpoint (`<out_dir>/ckpt.pt`, written by gptkernels.gpt.train) is a dict of plain
data: format/version, step, tokens, model (a full state_dict), optimizer (keyed by parameter
name), scheduler, data position, every rank's RNG state, model_config and train_config (plain
dicts), world_size, data_dir and the tokenizer (tokenizer.json as a string). It is read with
torch.load(weights_only=True): tensors and containers only, nothing arbitrary is unpickled.

Checksums: save_atomic adds "checksums" to every dict it writes: a CRC-32 of each tensor's bytes
(keyed by its place, e.g. "model/transformer.wte.weight") and one of everything else (configs,
tokenizer, step numbers). load_checkpoint recomputes them and names what differs; verify=False
(`--no-verify`) skips that. A checkpoint without checksums (tests/data/ckpt_v1, written by an
earlier release, which must keep loading) loads unverified, with a note.
"""
from __future__ import annotations

import os
import zlib

import torch

from gptkernels.gpt.atomic import AtomicFile
from gptkernels.gpt.config import GPTConfig
from gptkernels.gpt.errors import file_op, first_line
from gptkernels.gpt.model import GPT
from gptkernels.gpt.tokenizer import Tokenizer, TokenizerError

CKPT_FORMAT = "gptkernels-checkpoint"
CKPT_VERSION = 2  # 2: with checksums; 1 (no checksums) still loads
CKPT_NAME = "ckpt.pt"
CHECKSUMS = "checksums"
_REQUIRED = {"model": dict, "model_config": dict, "tokenizer": str}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, is not one of ours, or is corrupt."""


# ---- checksums -----------------------------------------------------------------------------------

def _tensors_and_rest(obj, where: str, tensors: dict, rest: list) -> None:
    """Collect the tensors of a nested dict/list by their place, and a canonical text of the rest."""
    if isinstance(obj, torch.Tensor):
        tensors[where] = obj
        rest.append(f"<{where}:{obj.dtype}:{tuple(obj.shape)}>")
    elif isinstance(obj, dict):
        rest.append("{")
        for k in sorted(obj, key=repr):
            rest.append(f"{k!r}:")
            _tensors_and_rest(obj[k], f"{where}/{k}" if where else str(k), tensors, rest)
        rest.append("}")
    elif isinstance(obj, (list, tuple)):
        rest.append("[")
        for i, v in enumerate(obj):
            _tensors_and_rest(v, f"{where}/{i}", tensors, rest)
        rest.append("]")
    else:
        rest.append(repr(obj) + ",")


def _crc_tensor(t: torch.Tensor) -> int:
    b = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(b)


def content_checksums(obj: dict) -> dict:
    """{"algorithm": "crc32", "tensors": {place: crc}, "other": crc of everything that is not a tensor}."""
    tensors, rest = {}, []
    _tensors_and_rest({k: v for k, v in obj.items() if k != CHECKSUMS}, "", tensors, rest)
    return {"algorithm": "crc32", "tensors": {k: _crc_tensor(t) for k, t in tensors.items()},
            "other": zlib.crc32("".join(rest).encode("utf-8", "surrogatepass"))}


def verify_checksums(obj: dict, path: str) -> bool:
    """True when obj carries checksums and they match; False when it has none; CheckpointError
    naming the corrupt parts otherwise."""
    stored = obj.get(CHECKSUMS)
    if stored is None:
        return False
    if not isinstance(stored, dict) or stored.get("algorithm") != "crc32":
        raise CheckpointError(f"corrupt checkpoint: unreadable checksum record ({path})")
    now = content_checksums(obj)
    bad = sorted(k for k in set(now["tensors"]) | set(stored.get("tensors", {}))
                 if now["tensors"].get(k) != stored.get("tensors", {}).get(k))
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"corrupt checkpoint: {len(bad)} tensor(s) fail their CRC-32 check ("
                              f"{', '.join(bad[:3])}{more}); the file changed after it was written "
                              f"(--no-verify loads it anyway) ({path})")
    if now["other"] != stored.get("other"):
        raise CheckpointError(f"corrupt checkpoint: its settings/tokenizer fail their CRC-32 check; the file changed "
                              f"after it was written (--no-verify loads it anyway) ({path})")
    return True


# ---- writing and reading -------------------------------------------------------------------------

def save_atomic(obj, path: str, what: str = "the checkpoint") -> None:
    """torch.save(obj) to path via a temporary file and a rename (see atomic.py); a dict gets its
    checksums. On any failure the temporary file is removed and the error names `what` and path
    (a full disk: "cannot write the checkpoint: no space left on the device (path)")."""
    if isinstance(obj, dict):
        obj = {**obj, CHECKSUMS: content_checksums(obj)}
    with file_op(f"write {what}", path):
        out = AtomicFile(path)
        try:
            torch.save(obj, out.file)
        except BaseException as e:
            out.abort()
            if out.write_error is not None and not isinstance(e, OSError):
                raise out.write_error from None  # torch wraps the OSError in a RuntimeError
            raise
        out.commit()


def load_checkpoint(path: str, verify: bool = True, log=None) -> dict:
    """A checkpoint written by training (ckpt.pt, or the run folder holding it), checked: it is
    one of ours, holds what a model needs, and (verify) its checksums match. log(note) says when
    an older checkpoint without checksums was loaded unverified."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CKPT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found ({path})")
    with file_op("read the checkpoint", path):
        with open(path, "rb") as f:  # (permissions: then whatever torch.load says is about the contents)
            empty = not f.read(1)
    if empty:
        raise CheckpointError(f"not a readable checkpoint: the file is empty ({path})")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, EOFError, ...)
        why = first_line(e).split(". ")[0][:120]  # (torch's messages run on: the first sentence)
        raise CheckpointError(f"not a readable checkpoint, truncated or corrupt ({why}) ({path})") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"not a gptkernels checkpoint ({path})")
    for key, kind in _REQUIRED.items():
        if not isinstance(ck.get(key), kind):
            raise CheckpointError(f"incomplete checkpoint: no {key!r} ({kind.__name__}) in it ({path})")
    if verify and not verify_checksums(ck, path) and log is not None:
        log(f"note: {path} has no checksums (written by an earlier release); loaded without verifying it")
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


def checkpoint_config(ck: dict, path: str = "checkpoint") -> GPTConfig:
    """The GPTConfig of a checkpoint; CheckpointError naming the file when it is not a valid one."""
    try:
        return GPTConfig.from_dict(ck["model_config"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's model config is not valid: {first_line(e)[:300]} ({path})") from None


def gpt_from_checkpoint(ck: dict, path: str = "checkpoint") -> GPT:
    """The GPT a training checkpoint holds (float32, on the CPU, in train mode)."""
    config = checkpoint_config(ck, path)
    try:
        model = GPT(config)
        model.load_state_dict(clean_gpt_state_dict(ck["model"], config.tie_embeddings))
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"the checkpoint's model does not load: {first_line(e)[:300]} ({path})") from None
    return model


def load_model(source: str, device="cpu", verify: bool = True, log=None):
    """(model in eval mode on device, tokenizer, kind) from a training checkpoint (ckpt.pt or its
    run folder; kind "ckpt") or a Hugging Face GPT-2 folder (config.json + model.safetensors /
    pytorch_model.bin + tokenizer files; kind "hf"). verify, log: see load_checkpoint."""
    source = os.fspath(source)
    if not os.path.exists(source):
        raise FileNotFoundError(f"no such checkpoint or model folder ({source})")
    is_hf = (os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json"))
             and not os.path.isfile(os.path.join(source, CKPT_NAME)))
    if is_hf:
        model, tok, kind = GPT.from_pretrained(source), Tokenizer.load(source), "hf"
    else:
        ck = load_checkpoint(source, verify=verify, log=log)
        model = gpt_from_checkpoint(ck, source)
        try:
            tok = Tokenizer.from_json_str(ck["tokenizer"])
        except TokenizerError as e:
            raise CheckpointError(f"the checkpoint's tokenizer does not load: {e} ({source})") from None
        kind = "ckpt"
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
