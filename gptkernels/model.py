"""A GPT language model (GPT-2 compatible) in which every heavy op is a gptkernels op.

On a CUDA device with the extension built, the ops run their kernels; anywhere else (and under
`gptkernels.backend("reference")`) their PyTorch references, so the two paths can be compared.

  GPTConfig                      hyper-parameters (a dataclass; to_dict/from_dict for checkpoints)
  GPT(config)                    token + position embedding, pre-LayerNorm blocks, final LayerNorm,
                                 LM head weight-tied to the token embedding
  GPT.from_pretrained(dir)       a Hugging Face GPT-2 checkpoint directory (local files only)
  model(idx, targets)            -> (logits (B, T, V), loss or None)
  model.generate(idx, n, ...)    sampling with a preallocated KV cache, batched prompts of any length
  GPTForSequenceClassification   pools the last non-pad token into a linear classifier (fine-tuning)

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


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens. temperature 0 is greedy (argmax). Otherwise softmax of
    logits / temperature, restricted to the top_k most likely tokens and/or the nucleus (the
    smallest set of most likely tokens whose probability reaches top_p), then one draw per row.
    The draw is argmax(p / E) with E ~ Exp(1) i.i.d. (what torch.multinomial does for one sample):
    no host sync, reproducible with `generator`."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        p_sorted, order = probs.sort(dim=-1, descending=True)
        outside = (p_sorted.cumsum(-1) - p_sorted) >= top_p  # the mass before this token already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, p_sorted.masked_fill(outside, 0.0))
    e = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / e).argmax(-1)


def pad_prompts(prompts, pad_token_id: int = 0, device=None):
    """A list of token-id lists -> (idx (B, T_max) right-padded with pad_token_id, prompt_lens (B,)),
    the arguments generate() takes for a batch of prompts of different lengths."""
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    if len(prompts) == 0 or int(lens.min()) == 0:
        raise ValueError("prompts: expected a non-empty list of non-empty token-id lists")
    idx = torch.full((len(prompts), int(lens.max())), pad_token_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    return idx.to(device), lens.to(device)


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
        # Range-check token ids in forward (one host sync per call). A training loop whose data
        # is known to be in range (gptkernels.train: shards checked against the vocabulary) turns it off.
        self.check_token_ids = True
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
        if self.check_token_ids and not torch.compiler.is_compiling():
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

    def crop_block_size(self, block_size: int) -> None:
        """Shorten the context (e.g. fine-tune GPT-2's 1024 at 256): keeps the first block_size
        position embeddings."""
        if not isinstance(block_size, int) or not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"block_size: expected an int in [1, {self.config.block_size}], got {block_size!r}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())
            self.transformer.wpe.num_embeddings = block_size
        else:
            self.pos_enc = self.pos_enc[:block_size].clone()

    # ---- Hugging Face GPT-2 checkpoints -------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dropout: float = 0.0) -> "GPT":
        """A GPT from a local Hugging Face GPT-2 checkpoint directory: config.json plus
        model.safetensors (or a sharded model.safetensors.index.json) or pytorch_model.bin. Nothing
        is downloaded. Weights are read with safetensors or torch.load(weights_only=True): no
        arbitrary objects are unpickled. GPT-2's Conv1D weights (stored (in, out)) are transposed
        to nn.Linear's (out, in); c_attn is already our fused q|k|v. Returns the model in eval mode,
        in float32 (use .to() for another dtype or device)."""
        path = os.fspath(path)
        config = _read_hf_gpt2_config(path, dropout)
        state, source = _read_hf_weights(path)
        model = cls(config)
        model.load_state_dict(_gpt2_state_dict(state, model, source))
        return model.eval()

    # ---- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None, seed: int | None = None,
                 prompt_lens=None, pad_token_id: int | None = None) -> torch.Tensor:
        """Continue each prompt by max_new_tokens tokens, sampling with a KV cache.

        idx (B, T) holds the prompts, right-padded when they differ in length, with prompt_lens (B,)
        their lengths (see pad_prompts); without prompt_lens every prompt is all T tokens.
        Returns (B, L + max_new_tokens), L = the longest prompt: row b is prompt b, its new tokens,
        then padding (out[b, :prompt_lens[b] + max_new_tokens] is sequence b).

        temperature 0 is greedy decoding; otherwise top_k / top_p restrict the sampling (sample_next).
        seed makes the sampling reproducible (a torch.Generator on idx's device; without it the
        global RNG). eos_token_id: a sequence that emits it is finished and emits pad_token_id from
        then on (default eos_token_id); generation stops early when every sequence is finished.
        Positions past the end of a sequence hold pad_token_id (default eos_token_id, else 0).
        A prompt plus max_new_tokens longer than block_size is an error (no sliding window).

        How it runs: one forward over the prompts fills a cache preallocated for every layer
        (B, L + max_new_tokens, Hkv, D); then each step feeds one token per sequence at its own
        position, attending to its first kv_lens[b] cached keys (flash_attention with kv_lens). The
        only host sync per step is the all-finished check, when eos_token_id is given. Dropout is
        off while generating (eval mode; the previous mode is restored).

        Conditional generation is prefix conditioning: the prompt is the condition and the model
        continues it. With a tokenizer `tok`:

            prompt = "question: what is the capital of France? answer:"
            idx = torch.tensor([tok.encode(prompt)])
            out = model.generate(idx, 16, temperature=0, eos_token_id=tok.eos_id)
            answer = tok.decode(out[0, idx.shape[1]:].tolist())

            # several prompts at once:
            idx, lens = pad_prompts([tok.encode(p) for p in prompts])
            out = model.generate(idx, 16, temperature=0.8, top_p=0.95, seed=1, prompt_lens=lens)
            answers = [out[b, lens[b]:lens[b] + 16] for b in range(len(prompts))]
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"idx: expected a (batch, seq_len) tensor of token ids, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        B, T = idx.shape
        device = idx.device
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0 (0 is greedy), got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
        V = self.config.vocab_size
        for name, tid in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if tid is not None and not 0 <= tid < V:
                raise ValueError(f"{name}: expected a token id in [0, {V}), got {tid!r}")
        if prompt_lens is None:
            lens = torch.full((B,), T, dtype=torch.long, device=device)
            L = T
        else:
            lens = torch.as_tensor(prompt_lens, device=device).long()
            if lens.shape != (B,):
                raise ValueError(f"prompt_lens: expected shape ({B},), got {tuple(lens.shape)}")
            if bool(((lens < 1) | (lens > T)).any()):
                raise ValueError(f"prompt_lens: expected lengths in [1, {T}] (idx has {T} columns), got {lens.tolist()}")
            L = int(lens.max())
        if L + max_new_tokens > self.config.block_size:
            raise ValueError(f"the prompt ({L} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                             f"block_size={self.config.block_size}")
        valid = torch.arange(L, device=device) < lens[:, None]
        prompt = idx[:, :L].masked_fill(~valid, 0)  # padding never reaches the embedding
        self._check_idx(prompt)
        fill = pad_token_id if pad_token_id is not None else eos_token_id if eos_token_id is not None else 0
        out = torch.full((B, L + max_new_tokens), fill, dtype=idx.dtype, device=device)
        out[:, :L] = prompt.masked_fill(~valid, fill)
        if max_new_tokens == 0:
            return out

        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        rows = torch.arange(B, device=device)
        cache = KVCache(self.config.n_layer, B, L + max_new_tokens)
        was_training = self.training
        self.eval()
        try:
            h = self.hidden_states(prompt, cache)  # prefill: positions 0..L-1 of every sequence
            logits = self.lm_logits(h[rows, lens - 1])
            pos = lens.clone()  # where each sequence's next token goes
            finished = torch.zeros(B, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                tok = sample_next(logits, temperature, top_k, top_p, gen).to(idx.dtype)
                if eos_token_id is not None:
                    tok = tok.masked_fill(finished, fill)
                    finished |= tok == eos_token_id
                out[rows, pos] = tok
                if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                    break
                logits = self.lm_logits(self.hidden_states(tok[:, None], cache, cache_pos=pos)[:, 0])
                pos = pos + 1
        finally:
            self.train(was_training)
        return out


# ---- reading Hugging Face GPT-2 checkpoints -----------------------------------------------------
# GPT-2's activation_function names -> ours (gelu_new, gelu_fast and gelu_pytorch_tanh are all the
# tanh approximation).
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu": "gelu", "relu": "relu"}
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _read_hf_gpt2_config(path: str, dropout: float) -> GPTConfig:
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


def _read_hf_weights(path: str):
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


def _gpt2_state_dict(state: dict, model: GPT, source: str) -> dict:
    """Rename and transpose a GPT-2 checkpoint's tensors into `model`'s state_dict; clear errors
    for missing, unexpected or mis-shaped tensors."""
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
    if model.config.tie_embeddings and "transformer.wte.weight" in out:
        head = out.get("lm_head.weight")
        if head is not None and not torch.equal(head, out["transformer.wte.weight"]):
            raise ValueError(f"{source}: lm_head.weight differs from wte.weight but config.json says "
                             "tie_word_embeddings=true")
        out["lm_head.weight"] = out["transformer.wte.weight"]
    expected = model.state_dict()
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


# ---- fine-tuning: sequence classification ------------------------------------------------------
class GPTForSequenceClassification(nn.Module):
    """A GPT body and a linear classifier on the final hidden state of each sequence's last real
    token (with causal attention, the one position that has seen the whole sequence).

    Batches are right-padded. The pooled position of row b is, in order of precedence:
    lengths[b] - 1; the last 1 of attention_mask[b] (ones then zeros); the last token that is not
    pad_token_id; else the last position. forward(idx, targets=None, attention_mask=None,
    lengths=None) -> (logits (B, num_classes), mean cross-entropy loss or None).

    The body is a GPT (self.gpt); load pretrained weights with from_gpt(gpt, ...) (shares that
    model's modules), from_pretrained(hf_dir, ...) or load_gpt_state_dict(our GPT state_dict).
    The GPT's LM head is not used (when untied, its weights get no gradient).
    """

    def __init__(self, config: GPTConfig, num_classes: int, pad_token_id: int | None = None,
                 body: GPT | None = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
        if pad_token_id is not None and not 0 <= pad_token_id < config.vocab_size:
            raise ValueError(f"pad_token_id: expected a token id in [0, {config.vocab_size}), got {pad_token_id!r}")
        if body is not None and body.config != config:
            raise ValueError("body: its config differs from the config given")
        self.config, self.num_classes, self.pad_token_id = config, num_classes, pad_token_id
        self.gpt = body if body is not None else GPT(config)
        self.drop = nn.Dropout(config.dropout)
        self.score = nn.Linear(config.n_embd, num_classes)
        nn.init.normal_(self.score.weight, mean=0.0, std=0.02)
        nn.init.zeros_(self.score.bias)

    @classmethod
    def from_gpt(cls, gpt: GPT, num_classes: int, pad_token_id: int | None = None):
        """Wrap a (pretrained) GPT; its modules are shared, not copied."""
        return cls(gpt.config, num_classes, pad_token_id, body=gpt)

    @classmethod
    def from_pretrained(cls, path, num_classes: int, pad_token_id: int | None = None, dropout: float = 0.0):
        """The body from a Hugging Face GPT-2 checkpoint directory (GPT.from_pretrained), a fresh
        classifier; returned in train mode, ready to fine-tune."""
        return cls.from_gpt(GPT.from_pretrained(path, dropout=dropout), num_classes, pad_token_id).train()

    def load_gpt_state_dict(self, state_dict: dict, strict: bool = True):
        """Load a GPT's state_dict (our checkpoint format; see clean_gpt_state_dict) into the body."""
        return self.gpt.load_state_dict(clean_gpt_state_dict(state_dict, self.config.tie_embeddings), strict=strict)

    def pooled_positions(self, idx, attention_mask=None, lengths=None) -> torch.Tensor:
        """(B,) index of the position each row is classified from (see the class docstring)."""
        B, T = idx.shape
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=idx.device).long()
            if lengths.shape != (B,):
                raise ValueError(f"lengths: expected shape ({B},), got {tuple(lengths.shape)}")
            if bool(((lengths < 1) | (lengths > T)).any()):
                raise ValueError(f"lengths: expected values in [1, {T}], got {lengths.tolist()}")
            return lengths - 1
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != idx.shape:
                raise ValueError(f"attention_mask: expected shape {tuple(idx.shape)} like idx")
            mask = attention_mask.bool()
            n = mask.sum(1)
            if bool((n == 0).any()):
                raise ValueError("attention_mask: every row needs at least one 1")
            if bool((mask != (torch.arange(T, device=idx.device) < n[:, None])).any()):
                raise ValueError("attention_mask: expected right padding (ones, then zeros)")
            return n - 1
        if self.pad_token_id is not None:
            real = idx != self.pad_token_id
            if bool((~real.any(1)).any()):
                raise ValueError(f"idx: a row consists only of pad_token_id={self.pad_token_id}")
            return T - 1 - real.flip(1).long().argmax(1)  # the last non-pad token
        return torch.full((B,), T - 1, device=idx.device, dtype=torch.long)

    def forward(self, idx, targets=None, attention_mask=None, lengths=None):
        self.gpt._check_idx(idx)
        last = self.pooled_positions(idx, attention_mask, lengths)
        h = self.gpt.hidden_states(idx)
        pooled = h[torch.arange(idx.shape[0], device=idx.device), last]
        logits = linear_act(self.drop(pooled), self.score.weight, self.score.bias)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits, targets, ignore_index=-100)
        return logits, loss
