"""GPTConfig: the model's hyper-parameters (a dataclass; to_dict/from_dict for checkpoints)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

ACTIVATIONS = ("gelu_tanh", "gelu", "relu")  # GPT-2 uses gelu_tanh; "gelu" is the exact (erf) GELU
POS_EMBEDDINGS = ("learned", "sinusoidal")


def pad_vocab(vocab_size: int, multiple: int = 64) -> int:
    """vocab_size rounded up to a multiple (GPT-2's 50257 -> 50304): matmul-friendly LM head rows.
    The padded ids are never produced by the tokenizer."""
    if multiple and multiple > 1:
        return (vocab_size + multiple - 1) // multiple * multiple
    return vocab_size


def check_window(window, n_layer: int, name: str = "window"):
    """The canonical form of a sliding-window setting: None (every layer global), an int W >= 0
    (every layer local), or a list of n_layer ints (-1: global, W >= 0: local); -1 alone and a list
    entry None mean global. ValueError naming `name` for anything else."""
    def entry(v):
        if v is None:
            return -1
        if isinstance(v, bool) or not isinstance(v, int) or v < -1:
            raise ValueError(f"{name}: expected None, -1 (global) or a window W >= 0 per layer, got {v!r}")
        return v

    if isinstance(window, (list, tuple)):
        if len(window) != n_layer:
            raise ValueError(f"{name}: expected one entry per layer ({n_layer}), got {len(window)}: {list(window)!r}")
        out = [entry(v) for v in window]
        return None if all(v == -1 for v in out) else out
    if window is None or isinstance(window, int) and not isinstance(window, bool):
        return None if entry(window) == -1 else window
    raise ValueError(f"{name}: expected None, an int W >= 0 (every layer) or a list of one entry per layer, "
                     f"got {window!r}")


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 tokens padded up to a multiple of 64
    block_size: int = 1024  # the longest sequence (context length)
    n_layer: int = 12
    n_head: int = 12  # query heads
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None means n_head
    n_embd: int = 768  # model width; the head dim is n_embd // n_head
    dropout: float = 0.0  # on the embeddings and on each residual branch (not inside attention)
    bias: bool = True  # biases in the Linears and LayerNorms, as GPT-2
    # "learned" (GPT-2) or "sinusoidal": the fixed sin/cos encoding of "Attention Is All You Need", used
    # as there: token embeddings (initialised with std n_embd**-0.5) times sqrt(n_embd), plus the encoding
    pos_embedding: str = "learned"
    activation: str = "gelu_tanh"  # MLP activation: "gelu_tanh" (GPT-2), "gelu" (exact erf) or "relu"
    tie_embeddings: bool = True  # the LM head shares the token embedding's weight
    layer_norm_eps: float = 1e-5
    # Sliding-window attention: None (every layer global), an int W (every layer local: a token sees
    # itself and the W tokens before it), or a list with one entry per layer (-1 or None: global).
    window: int | list | None = None
    attn_softcap: float = 0.0  # scores become c * tanh(s / c) before the softmax (Gemma 2); 0: off

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"GPTConfig.{name}: expected a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd: {self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_kv_head: {self.n_kv_head} must divide n_head={self.n_head}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(f"GPTConfig.pos_embedding: expected one of {POS_EMBEDDINGS}, got {self.pos_embedding!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout: expected a probability in [0, 1), got {self.dropout!r}")
        self.window = check_window(self.window, self.n_layer, "GPTConfig.window")
        c = self.attn_softcap
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(f"GPTConfig.attn_softcap: expected a finite number >= 0 (0: off), got {c!r}")
        self.attn_softcap = float(c)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_window(self, layer: int) -> int:
        """The left window of a layer's attention: -1 (global) or W (keys i - W .. i)."""
        if self.window is None or isinstance(self.window, int):
            return -1 if self.window is None else self.window
        return self.window[layer]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown fields {unknown}; expected some of {sorted(known)}")
        return cls(**d)
