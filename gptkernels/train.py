"""Pretraining loop: `gptkernels train` (one process, or one per GPU under torchrun).

  from gptkernels.train import TrainConfig, train
  train(TrainConfig.from_preset("demo", max_steps=200))

What a step does: grad_accum micro-batches of (B, T) tokens per rank (DDP's gradient all-reduce
only on the last one), bf16 autocast on GPU (fp32 on CPU), gradient clipping, AdamW (torch's
fused implementation on GPU; weight decay on the >= 2-D parameters only), a cosine learning-rate
schedule after a linear warm-up.

Multi-GPU / multi-node: run under torchrun; DistributedDataParallel (NCCL on GPU, gloo on CPU),
or FSDP2 (`fsdp=True`: torch.distributed.fsdp.fully_shard on each block's attention and
MLP, then the root) for models
that do not fit one GPU. Every rank reads its own slice of each global batch (gptkernels.data).

Checkpoints (out_dir/ckpt.pt): model, optimizer, scheduler, data position, RNG states of every
rank, model + train config as plain dicts, and the tokenizer (tokenizer.json as a string).
Written atomically (temp file + rename) every ckpt_interval steps, at the end, and on
SIGINT/SIGTERM; read back with torch.load(weights_only=True). `resume=True` continues exactly:
on the CPU the losses after resuming equal those of an uninterrupted run bit for bit.
A non-finite loss or gradient norm stops the run with a message; no checkpoint is written after
it, so the last one on disk is the last good one.

Logs: a tqdm bar (loss, tokens/s, MFU, ETA), out_dir/metrics.jsonl, out_dir/loss.png at the end.

Default path: our kernels (backend "auto"), no torch.compile, no CUDA graphs. Reasons: the
kernels are what this package is for and run on every supported GPU without the compile start-up
cost (minutes for a GPT-2 on one GPU), and compile over custom ops plus CUDA graphs has not been
measured against them yet (`compile=True`, `compile_mode="reduce-overhead"` for CUDA graphs, are
options). benchmarks/e2e_train.py measures the choices side by side.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch

CKPT_FORMAT = "gptkernels-checkpoint"
CKPT_VERSION = 1


# ---- configuration ---------------------------------------------------------------------------

@dataclass
class TrainConfig:
    # data
    data: str | None = None  # a folder made by `gptkernels prepare`; None: the bundled corpus below
    corpus: str = "stdlib"  # bundled corpus when data is None: "stdlib" (~30 MB) or "stdlib-small"
    # model (vocab_size comes from the tokenizer, padded up to a multiple of pad_vocab)
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    n_embd: int = 768
    block_size: int = 1024
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu_tanh"
    pos_embedding: str = "learned"
    tie_embeddings: bool = True
    pad_vocab: int = 64
    # optimization
    batch_size: int = 16  # sequences per micro-batch per process
    tokens_per_step: int | None = None  # global tokens per optimizer step; None: batch_size * block_size * world
    max_steps: int = 5000
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # evaluation, sampling, logging
    eval_interval: int = 500
    eval_samples: int = 256  # validation sequences per evaluation (shared among the ranks)
    sample_interval: int = 0  # print samples every N steps (0: only at the end)
    sample_tokens: int = 96
    sample_prompt: str = ""  # empty: start a new document
    log_interval: int = 10
    progress: bool = True  # tqdm bar (else one line per log interval)
    # checkpoints
    out_dir: str = "runs/gpt"
    ckpt_interval: int = 1000
    resume: bool = False
    stop_at: int | None = None  # stop (and checkpoint) after this step, as if interrupted
    # system
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" (bfloat16 autocast on GPUs that have it, else float32), "float32", "bfloat16"
    backend: str = "auto"  # gptkernels backend: "auto", "kernel", "reference"
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode: None, "max-autotune", "reduce-overhead" (CUDA graphs)
    fsdp: bool = False
    seed: int = 1337
    verify_data: bool = True  # CRC-check every shard at start
    peak_tflops: float | None = None  # for MFU; default: looked up from the GPU name
    inject_nan_at: int | None = None  # testing aid: make the loss NaN at this step

    def model_dict(self, vocab_size: int) -> dict:
        V = vocab_size
        if self.pad_vocab and self.pad_vocab > 1:
            V = (V + self.pad_vocab - 1) // self.pad_vocab * self.pad_vocab
        return dict(vocab_size=V, block_size=self.block_size, n_layer=self.n_layer, n_head=self.n_head,
                    n_kv_head=self.n_kv_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                    pos_embedding=self.pos_embedding, activation=self.activation,
                    tie_embeddings=self.tie_embeddings)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        d = {**PRESETS[name], **{k: v for k, v in overrides.items()}}
        return cls(**d)

    def validate(self) -> None:
        def pos(name):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        for n in ("batch_size", "max_steps", "block_size", "log_interval", "eval_interval", "ckpt_interval",
                  "eval_samples"):
            pos(n)
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr: expected a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype: expected auto, float32 or bfloat16, got {self.dtype!r}")
        if self.tokens_per_step is not None and self.tokens_per_step < 1:
            raise ValueError(f"tokens_per_step: expected a positive integer, got {self.tokens_per_step}")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"stop_at: expected a positive step number, got {self.stop_at}")


PRESETS = {
    # A small GPT on the top-level stdlib modules: about two minutes on two CPU cores.
    "demo": dict(corpus="stdlib-small", n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16,
                 max_steps=600, lr=3e-3, warmup_steps=40, eval_interval=200, eval_samples=128,
                 log_interval=10, ckpt_interval=200, sample_tokens=128, out_dir="runs/demo", dropout=0.0),
    # For tests: seconds on a CPU.
    "tiny": dict(corpus="stdlib-small", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4,
                 max_steps=20, lr=3e-3, warmup_steps=2, eval_interval=10, eval_samples=8, log_interval=1,
                 ckpt_interval=10, sample_tokens=16, out_dir="runs/tiny", verify_data=True),
    # GPT-2 124M (12 x 12 x 768, T=1024), 0.5M tokens per step as in the GPT-3 paper's small model.
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, tokens_per_step=524288,
                 max_steps=19073, lr=6e-4, warmup_steps=715, eval_interval=250, eval_samples=512,
                 ckpt_interval=1000, sample_interval=1000, out_dir="runs/gpt2"),
    # GPT-2 350M (24 x 16 x 1024).
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, batch_size=8, tokens_per_step=524288,
                        max_steps=19073, lr=3e-4, warmup_steps=715, eval_interval=250, eval_samples=512,
                        ckpt_interval=1000, sample_interval=1000, out_dir="runs/gpt2-medium"),
}


class TrainError(RuntimeError):
    """The run cannot go on (non-finite loss, unusable checkpoint, bad geometry)."""


# ---- pieces ----------------------------------------------------------------------------------

class CosineSchedule:
    """lr(step) = lr * min(1, (step+1)/warmup) during warm-up, then a cosine from lr down to
    lr * min_ratio at max_steps (and flat after). `step` counts optimizer steps already taken."""

    def __init__(self, optimizer, lr: float, warmup: int, max_steps: int, min_ratio: float):
        self.optimizer, self.lr, self.warmup, self.max_steps, self.min_ratio = optimizer, lr, warmup, max_steps, min_ratio
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.max_steps - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def _apply(self):
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step_count)

    def step(self):
        self.step_count += 1
        self._apply()

    def state_dict(self):
        return {"step_count": self.step_count, "lr": self.lr, "warmup": self.warmup, "max_steps": self.max_steps,
                "min_ratio": self.min_ratio}

    def load_state_dict(self, sd):
        # The position comes from the checkpoint, the shape of the schedule from this run's config
        # (so a resumed run may extend max_steps).
        self.step_count = int(sd["step_count"])
        self._apply()


def make_optimizer(model, cfg: TrainConfig, device: torch.device):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **kw)


# Dense bf16 tensor-core peak, FLOP/s, by GPU name (SXM parts), for MFU.
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12),
             ("B200", 2250e12)]


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, f in PEAK_BF16:
        if key in name:
            return f
    return None


class _Dist:
    """The process's place in a torchrun job (or a single process)."""

    def __init__(self, device_pref: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        want_cuda = device_pref.startswith("cuda") or (device_pref == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise TrainError(f"device {device_pref!r} requested but no CUDA device is available")
        if want_cuda:
            self.device = torch.device(f"cuda:{self.local_rank}") if (self.enabled or device_pref in ("auto", "cuda")) \
                else torch.device(device_pref)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.initialized_here = False
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo",
                                                 device_id=self.device if self.device.type == "cuda" else None)
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


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # make the rename durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by train(): torch.load(weights_only=True), so nothing is unpickled."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise TrainError(f"{path}: not a gptkernels checkpoint")
    return ck


def _rng_state(dev: torch.device) -> torch.Tensor:
    """This process's RNG states as one uint8 tensor: CPU generator, then the CUDA one (if any)."""
    parts = [torch.get_rng_state()]
    if dev.type == "cuda":
        parts.append(torch.cuda.get_rng_state(dev))
    return torch.cat(parts)


def _set_rng_state(state: torch.Tensor, dev: torch.device) -> None:
    n = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n].clone())
    if dev.type == "cuda" and state.numel() > n:
        torch.cuda.set_rng_state(state[n:].clone(), dev)


def _gather_rng(d: _Dist) -> list[torch.Tensor]:
    mine = _rng_state(d.device)
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


def plot_metrics(metrics_path: str, png_path: str, title: str = "") -> bool:
    """Loss curve (train and val against step) from a metrics.jsonl; the last record per step wins."""
    train, val = {}, {}
    try:
        with open(metrics_path) as f:
            for line in f:
                r = json.loads(line)
                if "loss" in r:
                    train[r["step"]] = r["loss"]
                if "val_loss" in r:
                    val[r["step"]] = r["val_loss"]
    except (OSError, ValueError):
        return False
    if not train:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    s = sorted(train)
    ax.plot(s, [train[k] for k in s], label="train", lw=1)
    if val:
        v = sorted(val)
        ax.plot(v, [val[k] for k in v], "o-", label="val", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


# ---- the run -----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    step: int
    stopped: str  # "done", "interrupted", "stop_at"
    losses: dict = field(default_factory=dict)  # step -> train loss (at log intervals)
    val_losses: dict = field(default_factory=dict)
    checkpoint: str | None = None
    tokens_per_s: float | None = None


def train(cfg: TrainConfig, log=None) -> TrainResult:
    """Run (or resume) a pretraining run; see the module docstring."""
    import gptkernels
    from gptkernels import data as gdata
    from gptkernels.model import GPT, GPTConfig
    from gptkernels.tokenizer import Tokenizer

    cfg.validate()
    d = _Dist(cfg.device)
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    msg = (lambda s: say(s)) if d.master else (lambda s: None)
    from gptkernels.ops import loss as gloss

    old_backend, old_target_check = gptkernels.get_backend(), gloss.get_target_check()
    gptkernels.set_backend(cfg.backend)
    stop_signal = {"sig": None}
    old_handlers = {}

    def on_signal(signum, frame):
        stop_signal["sig"] = signum
        signal.signal(signum, old_handlers.get(signum, signal.SIG_DFL))  # a second one stops at once

    try:
        # -- resume state, data -------------------------------------------------------------
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        ck = None
        if cfg.resume:
            if not os.path.isfile(ckpt_path):
                raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
            ck = load_checkpoint(ckpt_path)
        data_dir = cfg.data
        if data_dir is None:
            if ck is not None and ck.get("data_dir") and os.path.isdir(ck["data_dir"]):
                data_dir = ck["data_dir"]
            else:  # the bundled corpus: each node's local rank 0 prepares it into the cache
                if d.local_rank == 0:
                    data_dir = gdata.default_dataset(cfg.corpus, progress=cfg.progress and d.master, log=msg)
                d.barrier()
                data_dir = gdata.default_dataset(cfg.corpus, progress=False, log=msg)
        meta = gdata.load_meta(data_dir)
        tok = Tokenizer.load(os.path.join(data_dir, meta["tokenizer"]))
        train_split = gdata.TokenSplit(data_dir, "train", cfg.block_size, verify=cfg.verify_data)
        val_split = gdata.TokenSplit(data_dir, "val", cfg.block_size, verify=cfg.verify_data) \
            if meta["tokens"].get("val") else None

        # -- geometry -------------------------------------------------------------------------
        per_micro = cfg.batch_size * cfg.block_size * d.world
        tps = cfg.tokens_per_step or per_micro
        if tps % per_micro:
            raise ValueError(f"tokens_per_step: {tps} is not a multiple of batch_size * block_size * world_size = "
                             f"{cfg.batch_size} * {cfg.block_size} * {d.world} = {per_micro}")
        accum = tps // per_micro
        loader = gdata.TokenBatches(train_split, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world,
                                    grad_accum=accum)

        # -- model ----------------------------------------------------------------------------
        mcfg = GPTConfig.from_dict(ck["model_config"]) if ck else GPTConfig.from_dict(cfg.model_dict(tok.vocab_size))
        if ck is not None:
            asked = GPTConfig.from_dict(cfg.model_dict(tok.vocab_size)).to_dict()
            differ = sorted(k for k, v in asked.items() if k != "block_size" and mcfg.to_dict().get(k) != v)
            if differ:
                msg(f"note: resuming: the model comes from the checkpoint ({', '.join(f'{k}={getattr(mcfg, k)}' for k in differ)}),"
                    f" not from this run's settings")
        if mcfg.vocab_size < tok.vocab_size:
            raise TrainError(f"the model's vocabulary ({mcfg.vocab_size}) is smaller than the tokenizer's "
                             f"({tok.vocab_size})")
        if mcfg.block_size < cfg.block_size:
            raise TrainError(f"block_size {cfg.block_size} exceeds the checkpoint model's {mcfg.block_size}")
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = GPT(mcfg).to(d.device)
        if ck is not None:
            model.load_state_dict(ck["model"])
        # The shards' ids are below the tokenizer's vocabulary (checked at prepare time and above), so the
        # hot path skips the per-step range checks, each a host sync: token ids in the model, targets in
        # the loss ("deferred": a bad target still raises, a step later).
        model.check_token_ids = False
        gloss.set_target_check("deferred")
        torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout differs between ranks
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        dtype = cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if d.device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        amp = (torch.autocast(d.device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
               else contextlib.nullcontext())

        raw = model
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard
            if not torch.distributed.is_initialized():
                raise TrainError("--fsdp needs torch.distributed: run under torchrun (e.g. torchrun "
                                 "--nproc_per_node=8 -m gptkernels train --fsdp ...)")
            # Shard each block's attention and MLP (where nearly all the weights are) as units; the
            # LayerNorms stay with the root, because the model fuses each residual add into the
            # *next* block's LayerNorm (Block.forward calls blocks[i + 1].ln_1), which a per-Block
            # unit would call while still sharded.
            for block in model.transformer.h:
                fully_shard(block.attn)
                fully_shard(block.mlp)
            fully_shard(model)
        optimizer = make_optimizer(model, cfg, d.device)
        sched = CosineSchedule(optimizer, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        step = 0
        if ck is not None:
            _load_train_state(model, optimizer, ck, cfg.fsdp)
            sched.load_state_dict(ck["scheduler"])
            loader.load_state_dict(ck["data"])
            step = int(ck["step"])
            rng = ck.get("rng") or []
            if len(rng) == d.world:
                _set_rng_state(rng[d.rank], d.device)
            else:
                msg(f"note: the checkpoint was written by {len(rng)} processes, this run has {d.world}; "
                    "dropout's random stream restarts from the seed")
                torch.manual_seed(cfg.seed + 1 + d.rank + 1000003 * step)
            msg(f"resumed from {ckpt_path} at step {step}")
        fwd_model = model
        if cfg.compile:
            fwd_model = torch.compile(model, mode=cfg.compile_mode)
        if d.enabled and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            fwd_model = DDP(fwd_model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

        n_params = raw.num_params()
        peak = peak_flops(d.device, cfg.peak_tflops)
        msg(f"model: {n_params / 1e6:.2f}M parameters (non-embedding), {mcfg.n_layer} layers x {mcfg.n_head} heads x "
            f"{mcfg.n_embd}, vocab {mcfg.vocab_size}, T={cfg.block_size}")
        msg(f"data: {data_dir}: {train_split.n_tokens:,} train tokens ({train_split.n_windows:,} sequences)"
            f"{f', {val_split.n_tokens:,} val' if val_split else ', no val split'}")
        msg(f"step: {tps:,} tokens = {cfg.batch_size} x {cfg.block_size} x {d.world} process(es) x {accum} "
            f"accumulation; {dtype} on {d.device}{', FSDP' if cfg.fsdp else ', DDP' if d.enabled else ''}"
            f"{', torch.compile' if cfg.compile else ''}; gptkernels backend {cfg.backend}")

        os.makedirs(cfg.out_dir, exist_ok=True)
        metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        mf = open(metrics_path, "a" if ck is not None else "w") if d.master else None

        def record(r):
            if mf:
                mf.write(json.dumps(r) + "\n")
                mf.flush()

        if d.master and ck is None:
            if os.path.isfile(ckpt_path):
                msg(f"note: {ckpt_path} from an earlier run will be overwritten (pass --resume to continue it)")
            record({"event": "start", "train_config": dataclasses.asdict(cfg), "model_config": mcfg.to_dict(),
                    "world_size": d.world, "device": str(d.device), "dtype": dtype})

        def save_checkpoint(s):
            msd, osd = _train_state(model, optimizer, cfg.fsdp)
            rng = _gather_rng(d)
            if d.master:
                _atomic_save({
                    "format": CKPT_FORMAT, "version": CKPT_VERSION, "step": s, "tokens": s * tps,
                    "model": msd, "optimizer": osd, "scheduler": sched.state_dict(), "data": loader.state_dict(),
                    "rng": rng, "model_config": mcfg.to_dict(), "train_config": dataclasses.asdict(cfg),
                    "world_size": d.world, "data_dir": os.path.abspath(data_dir), "tokenizer": tok.to_json_str(),
                }, ckpt_path)
            d.barrier()

        def evaluate():
            if val_split is None:
                return None
            model.eval()
            wins = gdata.eval_windows(val_split, cfg.eval_samples, d.rank, d.world)
            tot = torch.zeros(2, device=d.device, dtype=torch.float64)
            with torch.no_grad(), amp:
                for w in gdata.batched(wins, cfg.batch_size):
                    buf = torch.from_numpy(val_split.gather(w))
                    x, y = (t.to(d.device, non_blocking=True) for t in (buf[:, :-1], buf[:, 1:]))
                    _, loss = model(x, y)
                    tot[0] += loss.double() * y.numel()
                    tot[1] += y.numel()
            d.all_reduce(tot)
            model.train()
            return (tot[0] / tot[1]).item() if tot[1] > 0 else None

        def sample(s):
            if not hasattr(raw, "generate") or not d.master or cfg.fsdp:  # (FSDP: sampling not supported)
                return
            raw.eval()
            ids = [tok.eos_id] + tok.encode(cfg.sample_prompt)
            n = min(cfg.sample_tokens, mcfg.block_size - len(ids))
            if n <= 0:
                raw.train()
                return
            idx = torch.tensor([ids], device=d.device)
            with torch.no_grad(), amp:
                out = raw.generate(idx, n, temperature=0.8, top_k=50, eos_token_id=tok.eos_id, seed=cfg.seed + s)
            raw.train()
            text = tok.decode([t for t in out[0, 1:].tolist() if t < tok.vocab_size])
            if d.master:
                _write(f"--- sample at step {s} ---\n{text}\n---", bar, say)
                record({"step": s, "sample": text})

        # -- loop -----------------------------------------------------------------------------
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                old_handlers[sig] = signal.signal(sig, on_signal)
        bar = None
        if d.master and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        result = TrainResult(step=step, stopped="done")
        model.train()
        acc = torch.zeros(3, device=d.device, dtype=torch.float32)  # loss sum, micro-steps, non-finite count
        last_norm = torch.zeros((), device=d.device)
        t_last, step_last = time.perf_counter(), step
        last_good_ckpt = step if ck is not None else None
        stopped = "done"
        while step < cfg.max_steps:
            for m in range(accum):
                x, y = loader.next_batch()
                if d.device.type == "cuda":
                    x, y = x.pin_memory().to(d.device, non_blocking=True), y.pin_memory().to(d.device, non_blocking=True)
                sync = not d.enabled or cfg.fsdp or m == accum - 1
                ctx = fwd_model.no_sync() if not sync else contextlib.nullcontext()
                if cfg.fsdp and d.enabled:
                    model.set_requires_gradient_sync(m == accum - 1)
                with ctx, amp:
                    _, loss = fwd_model(x, y)
                if cfg.inject_nan_at is not None and step + 1 == cfg.inject_nan_at:
                    loss = loss * float("nan")
                (loss / accum).backward()
                acc[0] += loss.detach().float()
                acc[1] += 1
            if cfg.grad_clip > 0:
                last_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if hasattr(last_norm, "full_tensor"):
                    last_norm = last_norm.full_tensor()
                acc[2] += (~torch.isfinite(last_norm)).float()
            acc[2] += (~torch.isfinite(acc[0])).float()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            if bar is not None:
                bar.update(1)

            boundary = (step % cfg.log_interval == 0 or step == cfg.max_steps or step % cfg.eval_interval == 0
                        or step % cfg.ckpt_interval == 0 or step == cfg.stop_at
                        or (cfg.sample_interval and step % cfg.sample_interval == 0))
            if not d.enabled and stop_signal["sig"] is not None:
                boundary = True
            if not boundary:
                continue
            # One all-reduce (and host sync) per log boundary: loss, count, non-finite flag, stop signal.
            red = torch.cat([acc, torch.tensor([1.0 if stop_signal["sig"] is not None else 0.0], device=d.device)])
            d.all_reduce(red)
            loss_sum, n_micro, bad, sigs = red.tolist()
            acc.zero_()
            if bad > 0 or not math.isfinite(loss_sum):
                where = (f"the last good checkpoint is {ckpt_path} (step {last_good_ckpt})" if last_good_ckpt
                         else "no checkpoint was written")
                raise TrainError(f"non-finite loss or gradient (loss {loss_sum / max(n_micro, 1)}) in steps "
                                 f"{step_last + 1}..{step}; stopping. {where}. Try a lower lr, or resume from the "
                                 f"checkpoint.")
            now = time.perf_counter()
            dt = now - t_last
            tok_s = (step - step_last) * tps / dt if dt > 0 else float("nan")
            t_last, step_last = now, step
            train_loss = loss_sum / max(n_micro, 1)
            mfu = raw.estimate_mfu(tok_s, peak, cfg.block_size) if peak else None
            norm = float(last_norm) if cfg.grad_clip > 0 else None
            rec = {"step": step, "loss": train_loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": norm,
                   "tokens": step * tps, "tokens_per_s": tok_s, "mfu": mfu, "time": time.time()}
            record(rec)
            result.losses[step] = train_loss
            result.tokens_per_s = tok_s
            if bar is not None:
                post = {"loss": f"{train_loss:.4f}", "tok/s": f"{tok_s:,.0f}"}
                if mfu is not None:
                    post["mfu"] = f"{100 * mfu:.1f}%"
                bar.set_postfix(post, refresh=False)
            elif d.master and step % cfg.log_interval == 0:
                say(f"step {step}/{cfg.max_steps}: loss {train_loss:.4f}, lr {rec['lr']:.2e}, {tok_s:,.0f} tok/s"
                    + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""))
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                vl = evaluate()
                if vl is not None:
                    record({"step": step, "val_loss": vl})
                    result.val_losses[step] = vl
                    if d.master:
                        _write(f"step {step}: train loss {train_loss:.4f}, val loss {vl:.4f}", bar, say)
                t_last = time.perf_counter()  # evaluation time is not training time
            if cfg.sample_interval and step % cfg.sample_interval == 0 and step != cfg.max_steps:
                sample(step)
                t_last = time.perf_counter()
            interrupted = sigs > 0
            if interrupted or step % cfg.ckpt_interval == 0 or step == cfg.max_steps or step == cfg.stop_at:
                save_checkpoint(step)
                last_good_ckpt = step
                result.checkpoint = ckpt_path
                t_last = time.perf_counter()
            if interrupted:
                stopped = "interrupted"
                break
            if step == cfg.stop_at:
                stopped = "stop_at"
                break
        if bar is not None:
            bar.close()
        result.step, result.stopped = step, stopped
        if stopped == "done":
            sample(step)
        if d.master:
            record({"event": "end", "step": step, "stopped": stopped})
            mf.close()
            png = os.path.join(cfg.out_dir, "loss.png")
            if plot_metrics(metrics_path, png, f"{n_params / 1e6:.1f}M params, {cfg.out_dir}"):
                say(f"loss curve: {png}")
            if stopped == "interrupted":
                say(f"interrupted at step {step}; checkpoint {ckpt_path}; continue with --resume")
            elif stopped == "stop_at":
                say(f"stopped at step {step} (stop_at); checkpoint {ckpt_path}; continue with --resume")
            else:
                say(f"done: {step} steps; checkpoint {ckpt_path}")
        return result
    finally:
        for sig, h in old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, h)
        gptkernels.set_backend(old_backend)
        gloss.set_target_check(old_target_check)
        d.close()


def _write(s: str, bar, say) -> None:
    if bar is not None:
        bar.write(s, file=sys.stderr)
    else:
        say(s)


def _train_state(model, optimizer, fsdp: bool):
    """Full (unsharded) model and optimizer state dicts on CPU, keyed by parameter name, so a
    checkpoint moves between one process, DDP and FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    return msd, osd


def _load_train_state(model, optimizer, ck, fsdp: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=ck["model"], optim_state_dict=ck["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
