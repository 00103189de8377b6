"""A GPT language model (GPT-2 compatible) in which every heavy op is a gptkernels op.

On a CUDA device with the extension built, the ops run their kernels; anywhere else (and under
`gptkernels.backend("reference")`) their PyTorch references, so the two paths can be compared.

  GPTConfig                      hyper-parameters (a dataclass; to_dict/from_dict for checkpoints)
  GPT(config)                    token + position embedding, pre-LayerNorm blocks, final LayerNorm,
                                 LM head weight-tied to the token embedding
  GPT.from_pretrained(dir)       a Hugging Face GPT-2 checkpoint directory (local files only)
  model(idx, targets)            -> (logits (B, T, V), loss or None)
  model.generate(idx, n, ...)    sampling with a preallocated KV cache, batched prompts of any length
  GPTForSequenceClassification   pools the last non-pad token into a linear classifier

The block, with each residual add fused into the LayerNorm that follows it:

    h = ln_1(x)                                         (first block only; later blocks get h)
    x, h = add_layer_norm(x, attn(h), ln_2)             x += attn(h);  h = ln_2(x)
    x, h = add_layer_norm(x, mlp(h), next ln_1 / ln_f)  x += mlp(h);   h = next_ln(x)

Attention: one Linear makes q|k|v, shape (B, T, (H + 2*Hkv) * D); viewed as (B, T, H + 2*Hkv, D)
its head slices are q, k, v in the "bshd" layout, handed to flash_attention without a copy.
Parameter names follow GPT-2 (transformer.wte, transformer.h.0.attn.c_attn, ...; the MLP's
c_fc / c_proj are FusedMLP's fc / proj), so a GPT-2 checkpoint maps onto them by name.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from gptkernels.nn.functional import add_layer_norm, cross_entropy, flash_attention, linear_act
from gptkernels.nn.modules import FusedMLP, LayerNorm

ACTIVATIONS = ("gelu_tanh", "gelu", "relu")  # GPT-2 uses gelu_tanh; "gelu" is the exact (erf) GELU
POS_EMBEDDINGS = ("learned", "sinusoidal")


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

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown fields {unknown}; expected some of {sorted(known)}")
        return cls(**d)


def sinusoidal_positions(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim) fixed encoding: even columns sin(pos / 10000^(2i/dim)), odd columns cos(...)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(n_pos, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)[:, : dim // 2]
    return pe.float()


class KVCache:
    """Keys and values of every layer for generation: per layer two (B, max_len, Hkv, D) buffers,
    allocated once (at the first write, in the dtype the projections produce, e.g. under autocast)
    and then written in place. Sequence b of a batch writes at its own positions."""

    def __init__(self, n_layer: int, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_pos: torch.Tensor | None):
        """Store k, v (B, T, Hkv, D) at positions cache_pos[b] + t (positions 0..T-1 when cache_pos
        is None); return this layer's full (k, v) buffers."""
        B, T, Hkv, D = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, self.max_len, Hkv, D)
            self.v[layer] = v.new_zeros(B, self.max_len, Hkv, D)
        kc, vc = self.k[layer], self.v[layer]
        if cache_pos is None:
            kc[:, :T] = k
            vc[:, :T] = v
        else:
            rows = torch.arange(B, device=k.device)[:, None]
            cols = cache_pos[:, None] + torch.arange(T, device=k.device)
            kc[rows, cols] = k
            vc[rows, cols] = v
        return kc, vc


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_width = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_width, bias=config.bias)  # q | k | v, GPT-2's fused layout
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, cache: KVCache | None = None, cache_pos: torch.Tensor | None = None):
        """x (B, T, C). With a cache: store this chunk's k, v; when cache_pos (B,) is given the
        chunk starts at position cache_pos[b] and attends to the cache's first cache_pos[b] + T keys
        (causal, bottom-right aligned); without it the chunk is positions 0..T-1."""
        B, T, C = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        qkv = linear_act(x, self.c_attn.weight, self.c_attn.bias).view(B, T, H + 2 * Hkv, self.head_dim)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=2)  # views in the "bshd" layout, no copies
        kv_lens = None
        if cache is not None:
            kc, vc = cache.write(self.layer_idx, k, v, cache_pos)
            if cache_pos is not None:
                k, v = kc, vc
                kv_lens = (cache_pos + T).to(torch.int32)
        y, _ = flash_attention(q, k, v, causal=True, layout="bshd", kv_lens=kv_lens)
        return linear_act(y.reshape(B, T, C), self.c_proj.weight, self.c_proj.bias)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.eps = config.layer_norm_eps
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = FusedMLP(config.n_embd, 4 * config.n_embd, activation=config.activation, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, h, next_ln: LayerNorm, cache=None, cache_pos=None):
        """x: the residual stream; h = ln_1(x). Returns the new residual stream and next_ln of it
        (next_ln: the next block's ln_1, or the final ln_f)."""
        x, h = add_layer_norm(x, self.drop(self.attn(h, cache, cache_pos)), self.ln_2.weight, self.ln_2.bias,
                              self.eps)
        return add_layer_norm(x, self.drop(self.mlp(h)), next_ln.weight, next_ln.bias, next_ln.eps)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config: expected a GPTConfig, got {type(config).__name__}")
        self.config = config
        C = config.n_embd
        self.transformer = nn.ModuleDict()
        self.transformer["wte"] = nn.Embedding(config.vocab_size, C)
        if config.pos_embedding == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, C)
        else:  # fixed: a buffer, not a parameter, and not in the state_dict
            self.register_buffer("pos_enc", sinusoidal_positions(config.block_size, C), persistent=False)
        self.transformer["drop"] = nn.Dropout(config.dropout)
        self.transformer["h"] = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.transformer["ln_f"] = LayerNorm(C, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: the projections that write into the residual stream get std 0.02 / sqrt(2 * n_layer),
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.c_proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # With the fixed encoding (amplitude 1) the token embeddings are scaled up to match, as in the
        # original Transformer; at GPT-2's std 0.02 the positions would drown the tokens.
        self.emb_scale = math.sqrt(C) if config.pos_embedding == "sinusoidal" else 1.0
        if config.pos_embedding == "sinusoidal":
            nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=C ** -0.5)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # ---- sizes -------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (shared weights once). non_embedding=True leaves out the position
        embedding and, when the LM head is not tied to it, the token embedding: what remains is,
        up to LayerNorms and biases, the weights of the matmuls."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token, as PaLM (appendix B) and nanoGPT count them:
        6 N for the weights' matmuls plus 12 * n_layer * n_head * head_dim * T for attention
        (QK^T and PV at full, non-causal cost). T defaults to block_size."""
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * T

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s (tokens_per_s * flops_per_token) as a
        fraction of peak_flops (e.g. the GPU's dense bf16 peak, in FLOP/s)."""
        if peak_flops <= 0:
            raise ValueError(f"peak_flops: expected a positive FLOP/s figure, got {peak_flops!r}")
        return tokens_per_s * self.flops_per_token(seq_len) / peak_flops

    # ---- forward -----------------------------------------------------------------------------
    def _check_idx(self, idx, name: str = "idx"):
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}: expected int64 or int32 token ids, got {str(idx.dtype).replace('torch.', '')}")
        if idx.dim() != 2:
            raise ValueError(f"{name}: expected shape (batch, seq_len), got {tuple(idx.shape)}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"{name}: sequence length {idx.shape[1]} exceeds block_size={self.config.block_size}")
        if idx.shape[1] == 0:
            raise ValueError(f"{name}: expected at least one token, got shape {tuple(idx.shape)}")
        # Out-of-range ids raise here rather than as an index error (or a device assert) deep inside;
        # one host sync. Skipped while torch.compile traces (data-dependent control flow).
        if not torch.compiler.is_compiling():
            V = self.config.vocab_size
            bad = (idx < 0) | (idx >= V)
            if bool(bad.any()):
                raise ValueError(f"{name}: token ids must be in [0, {V}); found {idx[bad][0].item()}")

    def _embed(self, idx, positions):
        """Token + position embedding; positions (T,) or (B, T)."""
        tok = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            return self.transformer.drop(tok + self.transformer.wpe(positions))
        return self.transformer.drop(tok * self.emb_scale + self.pos_enc[positions].to(tok.dtype))

    def hidden_states(self, idx, cache: KVCache | None = None, cache_pos: torch.Tensor | None = None):
        """The final LayerNorm's output (B, T, C). With cache_pos (B,), sequence b's tokens sit at
        positions cache_pos[b], cache_pos[b] + 1, ... (generation); otherwise at 0..T-1."""
        T = idx.shape[1]
        if cache_pos is None:
            positions = torch.arange(T, device=idx.device)
        else:
            positions = cache_pos[:, None] + torch.arange(T, device=idx.device)
        x = self._embed(idx, positions)
        blocks = self.transformer.h
        h = blocks[0].ln_1(x)
        for i, block in enumerate(blocks):
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.transformer.ln_f
            x, h = block(x, h, next_ln, cache, cache_pos)
        return h

    def lm_logits(self, h):
        return linear_act(h, self.lm_head.weight, None)

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits (B, T, vocab_size), loss). loss is the mean cross-entropy
        against targets (B, T) (positions with -100 are ignored), or None without targets."""
        self._check_idx(idx)
        logits = self.lm_logits(self.hidden_states(idx))
        loss = None
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
                raise ValueError(f"targets: expected a tensor of shape {tuple(idx.shape)} like idx, got "
                                 f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
            loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss
