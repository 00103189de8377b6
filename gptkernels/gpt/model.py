"""A GPT language model (GPT-2 compatible) in which every heavy op is a gptkernels op.

On a CUDA device with the extension built, the ops run their kernels; anywhere else (and under
`gptkernels.backend("reference")`) their PyTorch references, so the two paths can be compared.

  GPT(config)                    token + position embedding, pre-LayerNorm blocks, final LayerNorm,
                                 LM head weight-tied to the token embedding
  GPT.from_pretrained(dir)       a Hugging Face GPT-2 checkpoint directory (hf_gpt2.py; local files only)
  model(idx)                     -> (logits (B, T, V), None)                        inference
  model(idx, targets)            -> (None, loss)                                    training
  model(idx, targets, docs=docs) the same with document masking (gptkernels/gpt/documents.py)
  model.generate(idx, n, ...)    sampling with a preallocated KV cache, CUDA graphs on a GPU (generate.py)

The block is the pre-norm residual pattern with each residual add fused into the LayerNorm that
follows it. A block takes and returns (hidden, residual): `hidden` is the previous block's last
branch output, not yet added to the residual stream; the block adds it inside its first
LayerNorm (add_layer_norm returns the new residual stream and its normalised copy):

    residual, h = add_layer_norm(residual, hidden, ln_1)    residual += hidden;  h = ln_1(residual)
    residual, h = add_layer_norm(residual, attn(h), ln_2)   residual += attn(h); h = ln_2(residual)
    return mlp(h), residual

The first block gets (embeddings, None) and applies plain ln_1; the model ends with
add_layer_norm(residual, hidden, ln_f). So each Block applies only its own LayerNorms (FSDP wraps a
Block as one unit), the names are GPT-2's (transformer.h.i.ln_1, ...), and the arithmetic is the
one of the previous layout, in which a block applied the next block's ln_1.

Attention: one Linear makes q|k|v, shape (B, T, (H + 2*Hkv) * D); viewed as (B, T, H + 2*Hkv, D)
its head slices are q, k, v in the "bshd" layout, handed to flash_attention without a copy.
Each layer's window (config.window: sliding-window attention, (W, 0) with causal) and the score
softcap (config.attn_softcap) go to every attention call, generation's included. With document
masking the same views, read as (B*T, heads, D), go to flash_attention_varlen.

The loss: with targets, the LM head and the cross-entropy run together in
gptkernels.ops.linear_cross_entropy, in chunks of rows, so the (B*T, vocab) logits and their
gradient never exist in full (at vocab 50304 they would be the largest tensors of a step); the
logits are therefore not returned when targets are given. Without targets, forward returns the
logits of every position (inference, evaluation by hand, generate's prefill uses lm_logits).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from gptkernels.gpt import hf_gpt2
from gptkernels.gpt.config import GPTConfig
from gptkernels.gpt import cuda_graph
from gptkernels.gpt.decode import KVCache
from gptkernels.gpt.documents import Documents, check_documents
from gptkernels.gpt.generate import generate
from gptkernels.nn.functional import (add_layer_norm, flash_attention, flash_attention_varlen, linear_act,
                                      linear_cross_entropy)
from gptkernels.nn.modules import FusedMLP, LayerNorm


def sinusoidal_positions(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim) fixed encoding: even columns sin(pos / 10000^(2i/dim)), odd columns cos(...)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(n_pos, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)[:, : dim // 2]
    return pe.float()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # (window, softcap) of every attention call: window (left, right), causal, -1 = unbounded. One
        # tuple, so torch.compile keeps the softcap a constant (a float attribute becomes a symbolic
        # input once models with different softcaps are compiled in one process).
        self.variant = ((config.layer_window(layer_idx), 0), config.attn_softcap)
        qkv_width = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_width, bias=config.bias)  # q | k | v, GPT-2's fused layout
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, cache: KVCache | None = None, cache_pos: torch.Tensor | None = None,
                docs: Documents | None = None):
        """x (B, T, C). With a cache (begun for this forward, see KVCache.begin): store this chunk's
        k, v; when cache_pos (B,) is given the chunk starts at position cache_pos[b] and attends to
        the cache's first cache_pos[b] + T keys (causal, bottom-right aligned); without it the chunk
        is positions 0..T-1. With docs: the B*T tokens are the sequences of docs.cu_seqlens, each
        attending only within itself (document masking)."""
        B, T, C = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        qkv = linear_act(x, self.c_attn.weight, self.c_attn.bias)
        window, softcap = self.variant
        if docs is not None:  # (B*T, heads, D) views of the packed tokens, no copies
            q, k, v = qkv.view(B * T, H + 2 * Hkv, self.head_dim).split([H, Hkv, Hkv], dim=1)
            cu = docs.cu_seqlens
            y, _ = flash_attention_varlen(q, k, v, cu, cu, docs.max_seqlen, docs.max_seqlen, causal=True,
                                          window=window, softcap=softcap, check_inputs=False)
            return linear_act(y.reshape(B, T, C), self.c_proj.weight, self.c_proj.bias)
        q, k, v = qkv.view(B, T, H + 2 * Hkv, self.head_dim).split([H, Hkv, Hkv], dim=2)  # "bshd" views
        kv_lens = None
        if cache is not None:
            kc, vc = cache.write(self.layer_idx, k, v)
            if cache_pos is not None:
                k, v, kv_lens = kc, vc, cache.kv_lens
        y, _ = flash_attention(q, k, v, causal=True, layout="bshd", kv_lens=kv_lens, window=window, softcap=softcap)
        return linear_act(y.reshape(B, T, C), self.c_proj.weight, self.c_proj.bias)


class Block(nn.Module):
    """ln_1 -> attention -> ln_2 -> MLP, each residual add fused into the LayerNorm after it (see
    the module docstring). forward(hidden, residual) -> (hidden, residual)."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = FusedMLP(config.n_embd, 4 * config.n_embd, activation=config.activation, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, hidden, residual=None, cache: KVCache | None = None, cache_pos: torch.Tensor | None = None,
                docs: Documents | None = None):
        """hidden: the previous block's MLP output (or, with residual None, the embeddings: the
        first block); residual: the residual stream before it. Returns this block's MLP output and
        the residual stream it has not been added to yet."""
        if residual is None:
            residual, h = hidden, self.ln_1(hidden)
        else:
            residual, h = add_layer_norm(residual, hidden, self.ln_1.weight, self.ln_1.bias, self.ln_1.eps)
        residual, h = add_layer_norm(residual, self.drop(self.attn(h, cache, cache_pos, docs)), self.ln_2.weight,
                                     self.ln_2.bias, self.ln_2.eps)
        return self.drop(self.mlp(h)), residual


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config: expected a GPTConfig, got {type(config).__name__}")
        self.config = config
        # Range-check token ids (and the values of a docs argument) in forward: one host sync per call.
        # A training loop whose data is known to be good (gptkernels.gpt.train: shards checked against
        # the vocabulary, documents made by split_documents) turns it off.
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

    def hidden_states(self, idx, cache: KVCache | None = None, cache_pos: torch.Tensor | None = None,
                      docs: Documents | None = None):
        """The final LayerNorm's output (B, T, C). With cache_pos (B,), sequence b's tokens sit at
        positions cache_pos[b], cache_pos[b] + 1, ... (generation); with docs at docs.positions
        (document masking); otherwise at 0..T-1."""
        T = idx.shape[1]
        if docs is not None:
            positions = docs.positions
        elif cache_pos is None:
            positions = torch.arange(T, device=idx.device)
        else:
            positions = cache_pos[:, None] if T == 1 else cache_pos[:, None] + torch.arange(T, device=idx.device)
        if cache is not None:
            cache.begin(cache_pos, T)  # the KV write indices and kv_lens, once for every layer
        hidden, residual = self._embed(idx, positions), None
        for block in self.transformer.h:
            hidden, residual = block(hidden, residual, cache, cache_pos, docs)
        ln_f = self.transformer.ln_f
        return add_layer_norm(residual, hidden, ln_f.weight, ln_f.bias, ln_f.eps)[1]

    def lm_logits(self, h):
        """The LM head: (..., C) final hidden states -> (..., vocab_size) logits."""
        return linear_act(h, self.lm_head.weight, None)

    def forward(self, idx, targets=None, docs: Documents | None = None):
        """idx (B, T) token ids; docs (gptkernels.gpt.documents.split_documents): document masking,
        the B*T tokens attend within their own sequence only, at positions restarting in each.

        Without targets: (logits (B, T, vocab_size), None), for inference.
        With targets (B, T): (None, loss), loss the mean cross-entropy of the next-token
        predictions (positions whose target is -100 are ignored), computed by
        linear_cross_entropy from the final hidden states in chunks of rows: the full logits are
        never formed, so they are not returned (call lm_logits(hidden_states(idx)) for both).
        """
        self._check_idx(idx)
        if docs is not None:  # (the contents: one host sync, with the token ids' check)
            check_documents(docs, idx, self.config.block_size,
                            values=self.check_token_ids and not torch.compiler.is_compiling())
        h = self.hidden_states(idx, docs=docs)
        if targets is None:
            return self.lm_logits(h), None
        if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
            raise ValueError(f"targets: expected a tensor of shape {tuple(idx.shape)} like idx, got "
                             f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
        return None, linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index=-100)

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

    # ---- Hugging Face GPT-2 checkpoints, generation -------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dropout: float = 0.0) -> "GPT":
        """A GPT from a local Hugging Face GPT-2 checkpoint directory: config.json plus
        model.safetensors (or a sharded model.safetensors.index.json) or pytorch_model.bin (see
        hf_gpt2.py; nothing is downloaded, nothing arbitrary unpickled). Returns the model in eval
        mode, in float32 (use .to() for another dtype or device)."""
        path = str(path)
        config = hf_gpt2.read_config(path, dropout)
        state, source = hf_gpt2.read_weights(path)
        model = cls(config)
        model.load_state_dict(hf_gpt2.to_gpt_state_dict(state, model.state_dict(), config.tie_embeddings, source))
        return model.eval()

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None, seed: int | None = None,
                 prompt_lens=None, pad_token_id: int | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
        """Continue the prompts idx (B, T) by max_new_tokens tokens with a KV cache; temperature 0
        is greedy; on a GPU the per-token step runs as a CUDA graph (cuda_graph=False: launched
        from Python). See gptkernels.gpt.generate.generate for every argument."""
        return generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, seed=seed, prompt_lens=prompt_lens, pad_token_id=pad_token_id,
                        cuda_graph=cuda_graph)

    def release_generation_graphs(self) -> None:
        """Free the CUDA graphs and KV caches generate() keeps for reuse (gptkernels.gpt.cuda_graph)."""
        cuda_graph.release(self)
