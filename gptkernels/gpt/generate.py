"""Sampling from a GPT: batches of prompts of different lengths, greedy / temperature / top-k /
nucleus sampling with a KV cache, EOS, and CUDA-graph decoding. GPT.generate calls generate() here.

The decode step itself (KV cache, sampling on the device, the per-call state) is in decode.py;
the CUDA-graph runner in cuda_graph.py. KVCache and sample_next are re-exported here.

Needs of the model (duck-typed, so this module imports none of it): `config` (n_layer,
block_size, vocab_size), `hidden_states(idx, cache, cache_pos)`, `lm_logits(h)`, `_check_idx`.
"""
from __future__ import annotations

import torch

from gptkernels.gpt import cuda_graph as _graphs
from gptkernels.gpt.decode import (DecodeState, KVCache, Sampling, batch_bucket, capacity_bucket, decode_loop,
                                   draw_uniforms, sample_next)

__all__ = ["generate", "pad_prompts", "KVCache", "sample_next"]


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
             prompt_lens=None, pad_token_id: int | None = None, cuda_graph: bool | None = None,
             capture: bool = True) -> torch.Tensor:
    """Continue each prompt by max_new_tokens tokens, sampling with a KV cache.

    idx (B, T) holds the prompts, right-padded when they differ in length, with prompt_lens (B,)
    their lengths (see pad_prompts); without prompt_lens every prompt is all T tokens.
    Returns (B, L + max_new_tokens), L = the longest prompt: row b is prompt b, its new tokens,
    then padding (out[b, :prompt_lens[b] + max_new_tokens] is sequence b).

    temperature 0 is greedy decoding; otherwise top_k / top_p restrict the sampling (sample_next).
    seed makes the sampling reproducible: the call's random numbers (one per sequence and step)
    come from a CPU torch.Generator seeded with it, so a seed draws the same numbers on every
    device and on both paths below (without a seed: torch's global CPU generator).
    eos_token_id: a sequence that emits it is finished and emits pad_token_id from
    then on (default eos_token_id); generation stops early when every sequence is finished.
    Positions past the end of a sequence hold pad_token_id (default eos_token_id, else 0).
    A prompt plus max_new_tokens longer than block_size is an error (the context does not slide;
    a model's attention window, config.window, applies within it).

    How it runs: one forward over the prompts fills a cache preallocated for every layer
    (B, capacity, Hkv, D), capacity = L + max_new_tokens rounded up (decode.capacity_bucket); then
    each step feeds one token per sequence at its own position, attending to its first kv_lens[b]
    cached keys (flash_attention with kv_lens, and the layer's window and softcap), and samples the
    next on the device (decode.DecodeState). Dropout is off while generating (eval mode; the previous mode is restored).

    cuda_graph (default: on when idx is on a GPU; ignored on the CPU): capture the one-token step
    in a CUDA graph and replay it (cuda_graph.py): the batch is padded to a bucket, a graph is kept
    per (batch bucket, capacity, sampling mode) on the model and reused by later calls, the EOS
    flags are read every 16 steps. With cuda_graph=False each step is launched from Python and
    the EOS flags are read every step. Both give the same tokens. capture=False runs the graph
    path's step op by op without capturing it (also on the CPU: how the tests check that code).

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
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph: expected None (on a GPU), True or False, got {cuda_graph!r}")
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

    on_gpu = device.type == "cuda"
    static = (on_gpu if cuda_graph is None else cuda_graph) and (on_gpu or not capture)
    s = Sampling.of(temperature, top_k, top_p, eos_token_id, V)
    u = None if s.greedy else draw_uniforms(max_new_tokens, B, seed)
    # On a GPU both paths run the batch padded to its bucket, so they launch the same kernels on
    # the same shapes (and the graph repeats the eager tokens exactly); padded rows: one token 0.
    batch = batch_bucket(B) if (static or on_gpu) else B
    capacity = capacity_bucket(L + max_new_tokens, model.config.block_size)
    if batch > B:
        prompt = torch.cat([prompt, prompt.new_zeros(batch - B, L)])
        lens = torch.cat([lens, lens.new_ones(batch - B)])
    call = (temperature, top_p, eos_token_id, fill)
    was_training = model.training
    model.eval()
    try:
        if static:
            with torch.inference_mode(False), torch.no_grad():  # the runner's tensors outlive this call
                res = _graphs.decode_static(model, prompt.clone(), lens.clone(), B, max_new_tokens, capacity, s, u,
                                            *call, capture=capture and on_gpu)
        else:
            state, cache = DecodeState(batch, capacity, device), KVCache(model.config.n_layer, batch, capacity)
            state.reset(prompt, lens, B, u, *call)
            state.prefill(model, cache, prompt, s)
            decode_loop(state, max_new_tokens, s, lambda: state.step(model, cache, s), check_every=1)
            res = state.out
    finally:
        model.train(was_training)
    out.copy_(res[:B, :L + max_new_tokens])
    return out
