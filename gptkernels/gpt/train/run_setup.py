"""Setting a training run up: the process's place in a torchrun job, the data, the model (DDP or
FSDP2), the optimizer and schedule, and the state a resumed run comes back to. train() (loop.py)
calls setup_run and then only steps.

FSDP2 (`fsdp=True`): torch.distributed.fsdp.fully_shard on each Block, then on the root (the
embeddings, the final LayerNorm and the tied LM head). A Block applies only its own LayerNorms
(see gptkernels/gpt/model.py), so each is one unit: its parameters are gathered for its forward
and backward and freed after.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gptkernels.gpt import data as gdata
from gptkernels.gpt import fs
from gptkernels.gpt.checkpoint import (CKPT_NAME, checkpoint_config, gpt_from_checkpoint, load_checkpoint,
                                       load_full_state_dicts)
from gptkernels.gpt.config import GPTConfig
from gptkernels.gpt.device import autocast, compute_dtype, resolve_device
from gptkernels.gpt.errors import UsageError, env_int
from gptkernels.gpt.model import GPT
from gptkernels.gpt.optim import CosineSchedule, adamw
from gptkernels.gpt.tokenizer import Tokenizer
from gptkernels.gpt.train.budget import check_budget
from gptkernels.gpt.train.config import TrainConfig, TrainError


class Dist:
    """The process's place in a torchrun job (or a single process) and its device."""

    def __init__(self, device_pref: str):
        self.world = env_int("WORLD_SIZE", 1, low=1)  # set by torchrun
        self.rank = env_int("RANK", 0)
        self.local_rank = env_int("LOCAL_RANK", 0)
        self.local_world = env_int("LOCAL_WORLD_SIZE", 1, low=1)
        if self.rank >= self.world:
            raise ValueError(f"RANK: expected a rank below WORLD_SIZE={self.world}, got {self.rank}")
        self.enabled = self.world > 1
        dev = resolve_device(device_pref)
        if dev.type == "cuda":
            if self.enabled or dev.index is None:  # under torchrun: the local rank's GPU
                dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        self.device = dev
        self.initialized_here = False
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                                 device_id=dev if dev.type == "cuda" else None)
            self.initialized_here = True
        self.master = self.rank == 0

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
        return t

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def close(self):
        if self.initialized_here:
            torch.distributed.destroy_process_group()


# ---- RNG state (dropout's stream continues exactly on resume) ----------------------------------

def rng_state(dev: torch.device) -> torch.Tensor:
    """This process's RNG states as one uint8 tensor: CPU generator, then the CUDA one (if any)."""
    parts = [torch.get_rng_state()]
    if dev.type == "cuda":
        parts.append(torch.cuda.get_rng_state(dev))
    return torch.cat(parts)


def set_rng_state(state: torch.Tensor, dev: torch.device) -> None:
    n = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n].clone())
    if dev.type == "cuda" and state.numel() > n:
        torch.cuda.set_rng_state(state[n:].clone(), dev)


def gather_rng(d: Dist) -> list[torch.Tensor]:
    """Every rank's rng_state, for the checkpoint (collective)."""
    mine = rng_state(d.device)
    if not d.enabled:
        return [mine]
    size = torch.tensor([mine.numel()], device=d.device)
    sizes = [torch.zeros_like(size) for _ in range(d.world)]
    torch.distributed.all_gather(sizes, size)
    if len({int(s) for s in sizes}) != 1:  # different devices kinds: keep only our own
        return [mine]
    out = [torch.zeros_like(mine, device=d.device) for _ in range(d.world)]
    torch.distributed.all_gather(out, mine.to(d.device))
    return [t.cpu() for t in out]


# ---- the run -------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything the loop needs, set up."""
    cfg: TrainConfig
    dist: Dist
    ckpt_path: str
    resumed: dict | None  # the checkpoint resumed from
    data_dir: str
    tok: Tokenizer
    train_split: gdata.TokenSplit
    val_split: gdata.TokenSplit | None
    loader: gdata.TokenBatches
    tokens_per_step: int
    accum: int  # micro-batches per optimizer step on each rank
    mcfg: GPTConfig
    raw: GPT  # the model itself (after fully_shard under FSDP: the same module, sharded)
    model: torch.nn.Module  # what the forward calls: raw, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    sched: CosineSchedule
    step: int
    dtype: str  # "bfloat16" (autocast) or "float32"
    amp: object  # the autocast context of the forward


def _data_dir(cfg: TrainConfig, d: Dist, ck: dict | None, msg) -> str:
    """--data, else the resumed run's data folder, else the bundled corpus (each node's local rank 0
    prepares it into the cache)."""
    if cfg.data is not None:
        return cfg.data
    if ck is not None and ck.get("data_dir") and os.path.isdir(ck["data_dir"]):
        return ck["data_dir"]
    if d.local_rank == 0:
        gdata.default_dataset(cfg.corpus, progress=cfg.progress and d.master, log=msg)
    d.barrier()
    return gdata.default_dataset(cfg.corpus, progress=False, log=msg)


def _open_splits(cfg: TrainConfig, data_dir: str, meta: dict, msg):
    """The train split, and the val split (None when there is none, or it is shorter than one
    sequence: then a note says how to get one). Every shard's token ids are checked against the
    vocabulary here (and its CRC-32 with verify_data), once, naming the shard."""
    train_split = gdata.TokenSplit(data_dir, "train", cfg.block_size, verify=cfg.verify_data)
    if not meta["tokens"].get("val"):
        return train_split, None
    try:
        return train_split, gdata.TokenSplit(data_dir, "val", cfg.block_size, verify=cfg.verify_data)
    except gdata.TooShortError as e:
        msg(f"note: no validation: the val split has {e.n_tokens} tokens, fewer than one sequence of "
            f"--block-size {cfg.block_size} needs ({cfg.block_size + 1}); prepare the data again with a larger "
            f"--val-fraction (or more text) to get one")
        return train_split, None


def _model_config(cfg: TrainConfig, tok: Tokenizer, ck: dict | None, msg) -> GPTConfig:
    asked = GPTConfig.from_dict(cfg.model_dict(tok.vocab_size))
    mcfg = checkpoint_config(ck) if ck is not None else asked
    if ck is not None:
        differ = sorted(k for k, v in asked.to_dict().items() if k != "block_size" and mcfg.to_dict().get(k) != v)
        if differ:
            msg(f"note: resuming: the model comes from the checkpoint ({', '.join(f'{k}={getattr(mcfg, k)}' for k in differ)}),"
                f" not from this run's settings")
    if mcfg.vocab_size < tok.vocab_size:
        raise TrainError(f"the model's vocabulary ({mcfg.vocab_size}) is smaller than the tokenizer's "
                         f"({tok.vocab_size})")
    if mcfg.block_size < cfg.block_size:
        raise UsageError(f"--block-size {cfg.block_size} exceeds the checkpoint model's {mcfg.block_size}")
    ids = tok.encode(cfg.sample_prompt)
    if len(ids) + 2 > mcfg.block_size:  # the end-of-text token that starts a document, and one new token
        raise UsageError(f"--sample-prompt: {len(ids)} tokens, too long for the model's context of {mcfg.block_size} "
                         f"(at most {mcfg.block_size - 2})")
    return mcfg


def _build_model(cfg: TrainConfig, d: Dist, mcfg: GPTConfig, ck: dict | None) -> GPT:
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = (gpt_from_checkpoint(ck, os.path.join(cfg.out_dir, CKPT_NAME)) if ck is not None else GPT(mcfg)).to(d.device)
    # Every shard's ids were checked against the vocabulary when the splits were opened, so the hot
    # path skips the per-step range check of the token ids, a host sync.
    model.check_token_ids = False
    return model


def _shard(cfg: TrainConfig, model: GPT) -> None:
    """FSDP2, in place: each Block a unit, then the root."""
    from torch.distributed.fsdp import fully_shard
    if not torch.distributed.is_initialized():
        raise UsageError("--fsdp needs torch.distributed: run under torchrun (e.g. torchrun "
                         "--nproc_per_node=8 -m gptkernels train --fsdp ...)")
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)


def _forward_module(cfg: TrainConfig, d: Dist, model: GPT) -> torch.nn.Module:
    """What the training forward calls: the model, compiled and/or wrapped in DDP."""
    fwd = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    if d.enabled and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(fwd, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return fwd


def setup_run(cfg: TrainConfig, d: Dist, msg) -> Run:
    """Data, model, optimizer and (with cfg.resume) the state of out_dir/ckpt.pt; see the module
    docstring. What can be checked cheaply is checked first: the output folder, the checkpoint
    resumed from, the dataset's description, memory and disk; then the shards are read and the
    model is built."""
    fs.output_dir(cfg.out_dir, "--out-dir")
    ckpt_path = os.path.join(cfg.out_dir, CKPT_NAME)
    ck = None
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ck = load_checkpoint(ckpt_path, verify=cfg.verify_checkpoint, log=msg)
    if ck is not None:
        planned = checkpoint_config(ck, ckpt_path)
    else:  # the vocabulary: from --data's meta.json, or the bundled corpus's (before preparing it)
        vocab = gdata.load_meta(cfg.data)["vocab_size"] if cfg.data else gdata.DEFAULT_CORPORA[cfg.corpus][1]
        planned = GPTConfig.from_dict(cfg.model_dict(vocab))
    check_budget(cfg, planned, d.device, d.local_world, msg)
    data_dir = _data_dir(cfg, d, ck, msg)
    meta = gdata.load_meta(data_dir)
    tok = gdata.load_tokenizer(data_dir, meta)
    mcfg = _model_config(cfg, tok, ck, msg)
    train_split, val_split = _open_splits(cfg, data_dir, meta, msg)

    per_micro = cfg.batch_size * cfg.block_size * d.world
    tps = cfg.tokens_per_step or per_micro
    if tps % per_micro:
        raise UsageError(f"tokens_per_step: {tps} is not a multiple of batch_size * block_size * world_size = "
                         f"{cfg.batch_size} * {cfg.block_size} * {d.world} = {per_micro}")
    accum = tps // per_micro
    loader = gdata.TokenBatches(train_split, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world,
                                grad_accum=accum)

    raw = _build_model(cfg, d, mcfg, ck)
    torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout differs between ranks
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.fsdp:
        _shard(cfg, raw)
    optimizer = adamw(raw.parameters(), cfg.lr, cfg.weight_decay, d.device, betas=(cfg.beta1, cfg.beta2))
    sched = CosineSchedule(optimizer, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    step = 0
    if ck is not None:
        load_full_state_dicts(raw, optimizer, ck)
        sched.load_state_dict(ck["scheduler"])
        loader.load_state_dict(ck["data"])
        step = int(ck["step"])
        rng = ck.get("rng") or []
        if len(rng) == d.world:
            set_rng_state(rng[d.rank], d.device)
        else:
            msg(f"note: the checkpoint was written by {len(rng)} processes, this run has {d.world}; "
                "dropout's random stream restarts from the seed")
            torch.manual_seed(cfg.seed + 1 + d.rank + 1000003 * step)
        msg(f"resumed from {ckpt_path} at step {step}")
    model = _forward_module(cfg, d, raw)
    return Run(cfg=cfg, dist=d, ckpt_path=ckpt_path, resumed=ck, data_dir=data_dir, tok=tok,
               train_split=train_split, val_split=val_split, loader=loader, tokens_per_step=tps, accum=accum,
               mcfg=raw.config, raw=raw, model=model, optimizer=optimizer, sched=sched, step=step,
               dtype=compute_dtype(d.device, cfg.dtype), amp=autocast(d.device, cfg.dtype))
