"""Training configuration: TrainConfig (every option of `gptkernels train`), the allowed range of
each (LIMITS), the presets, TrainError."""
from __future__ import annotations

from dataclasses import dataclass, fields

from gptkernels.gpt import limits
from gptkernels.gpt.config import ACTIVATIONS, POS_EMBEDDINGS, check_window, pad_vocab
from gptkernels.gpt.device import DTYPES, check_device_name
from gptkernels.gpt.errors import UsageError


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
    window: int | list | None = None  # sliding-window attention: W for every layer, or one entry per layer (-1: global)
    attn_softcap: float = 0.0  # attention score softcap (0: off)
    pad_vocab: int = 64
    document_masking: bool = False  # attention within each document of a packed row only, positions restart
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
    verify_data: bool = True  # CRC-check every shard at start (their token ids are checked either way)
    verify_checkpoint: bool = True  # check the checksums of the checkpoint resumed from
    force: bool = False  # start a CPU run even when its memory estimate exceeds the available memory
    peak_tflops: float | None = None  # for MFU; default: looked up from the GPU name
    inject_nan_at: int | None = None  # testing aid: make the loss NaN at this step

    def model_dict(self, vocab_size: int) -> dict:
        """The GPTConfig fields of this run for a tokenizer of vocab_size ids."""
        return dict(vocab_size=pad_vocab(vocab_size, self.pad_vocab), block_size=self.block_size,
                    n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_kv_head, n_embd=self.n_embd,
                    dropout=self.dropout, bias=self.bias, pos_embedding=self.pos_embedding,
                    activation=self.activation, tie_embeddings=self.tie_embeddings, window=self.window,
                    attn_softcap=self.attn_softcap)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TrainConfig":
        if name not in PRESETS:
            raise UsageError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        d = {**PRESETS[name], **{k: v for k, v in overrides.items()}}
        return cls(**d)

    def validate(self) -> None:
        """UsageError naming the first option outside its range (LIMITS) or choices."""
        for f in fields(self):
            if f.name in LIMITS:
                kind, optional = LIMITS[f.name]
                limits.check(f.name, kind, getattr(self, f.name), optional)
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise UsageError(f"{name}: expected one of {', '.join(map(str, choices))}, got {getattr(self, name)!r}")
        try:
            check_device_name(self.device)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if self.n_embd % self.n_head:
            raise UsageError(f"n_embd: {self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise UsageError(f"n_kv_head: {self.n_kv_head} does not divide n_head={self.n_head}")
        try:
            check_window(self.window, self.n_layer, "window")
        except ValueError as e:
            raise UsageError(str(e)) from None


# The range of every numeric option: field -> (kind, None allowed); see gptkernels/gpt/limits.py.
LIMITS = {
    "n_layer": ("int>=1", False), "n_head": ("int>=1", False), "n_kv_head": ("int>=1", True),
    "n_embd": ("int>=1", False), "block_size": ("int>=1", False), "dropout": ("[0,1)", False),
    "pad_vocab": ("int>=1", False), "batch_size": ("int>=1", False), "tokens_per_step": ("int>=1", True),
    "max_steps": ("int>=1", False), "lr": ("float>0", False), "min_lr_ratio": ("[0,1]", False),
    "warmup_steps": ("int>=0", False), "weight_decay": ("float>=0", False), "beta1": ("[0,1)", False),
    "beta2": ("[0,1)", False), "grad_clip": ("float>=0", False), "eval_interval": ("int>=1", False),
    "eval_samples": ("int>=1", False), "sample_interval": ("int>=0", False), "sample_tokens": ("int>=0", False),
    "log_interval": ("int>=1", False), "ckpt_interval": ("int>=1", False), "stop_at": ("int>=1", True),
    "seed": ("int>=0", False), "peak_tflops": ("float>0", True), "inject_nan_at": ("int>=1", True),
    "attn_softcap": ("float>=0", False),
}
CHOICES = {"corpus": ("stdlib", "stdlib-small"), "activation": ACTIVATIONS, "pos_embedding": POS_EMBEDDINGS,
           "dtype": DTYPES, "backend": ("auto", "kernel", "reference"),
           "compile_mode": (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")}


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
