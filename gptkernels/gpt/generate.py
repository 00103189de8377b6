"""Sampling from a GPT: a preallocated KV cache, next-token sampling (greedy, temperature,
top-k, nucleus), batches of prompts of different lengths. GPT.generate calls generate() here.

Needs of the model (duck-typed, so this module imports none of it): `config` (n_layer,
block_size, vocab_size), `hidden_states(idx, cache, cache_pos)`, `lm_logits(h)`, `_check_idx`.
"""
from __future__ import annotations

import torch


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


@torch.no_grad()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
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
    V = model.config.vocab_size
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
    if L + max_new_tokens > model.config.block_size:
        raise ValueError(f"the prompt ({L} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                         f"block_size={model.config.block_size}")
    valid = torch.arange(L, device=device) < lens[:, None]
    prompt = idx[:, :L].masked_fill(~valid, 0)  # padding never reaches the embedding
    model._check_idx(prompt)
    fill = pad_token_id if pad_token_id is not None else eos_token_id if eos_token_id is not None else 0
    out = torch.full((B, L + max_new_tokens), fill, dtype=idx.dtype, device=device)
    out[:, :L] = prompt.masked_fill(~valid, fill)
    if max_new_tokens == 0:
        return out

    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    rows = torch.arange(B, device=device)
    cache = KVCache(model.config.n_layer, B, L + max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        h = model.hidden_states(prompt, cache)  # prefill: positions 0..L-1 of every sequence
        logits = model.lm_logits(h[rows, lens - 1])
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
            logits = model.lm_logits(model.hidden_states(tok[:, None], cache, cache_pos=pos)[:, 0])
            pos = pos + 1
    finally:
        model.train(was_training)
    return out
