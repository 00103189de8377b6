"""One decoding step in fixed shapes: the KV cache, sampling on the device, the per-call state.

Both generation paths run the code here, so they compute the same tokens:
- the eager loop (generate.py) calls DecodeState.step once per token from Python;
- the CUDA-graph path (cuda_graph.py) captures DecodeState.step once per shape and replays it.

Capture rules the step follows: fixed shapes (a KV cache of a fixed capacity, a fixed batch with
padded rows); every input and output a preallocated tensor updated in place (the last tokens,
positions, step counter, finished flags, the output ids); no host syncs (no .item(), no
data-dependent Python branches); sampling parameters held in device scalars.

Sampling draws no random numbers on the device: the caller draws one uniform number per row and
step up front (draw_uniforms, a CPU torch.Generator: reproducible with a seed, the same stream
on every device), the step reads its row of them by the device step counter, and a token is
chosen by inverting the cumulative distribution (sample_tokens). So a CUDA graph needs no
registered generator, and the eager and the graphed loop draw identically.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class KVCache:
    """Keys and values of every layer for generation: per layer two (B, max_len, Hkv, D) buffers,
    allocated once (at the first write, in the dtype the projections produce, e.g. under autocast)
    and then written in place. Sequence b of a batch writes at its own positions.

    The model calls begin(cache_pos, T) once per forward, then write(layer, k, v) in every layer:
    the write indices and the attention's kv_lens are computed once per step, not per layer."""

    def __init__(self, n_layer: int, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self._rows: torch.Tensor | None = None  # flat row index of each (sequence, new token)
        self._row_start: torch.Tensor | None = None  # b * max_len
        self.kv_lens: torch.Tensor | None = None  # int32 (B,): keys each sequence attends to

    def begin(self, cache_pos: torch.Tensor | None, T: int) -> None:
        """A forward of T tokens per sequence: at positions cache_pos[b] + t, or 0..T-1 (prefill)."""
        if cache_pos is None:
            self._rows = self.kv_lens = None
            return
        if tuple(cache_pos.shape) != (self.batch,):
            raise ValueError(f"cache_pos: expected shape ({self.batch},) (the cache's batch), got {tuple(cache_pos.shape)}")
        if self._row_start is None or self._row_start.device != cache_pos.device:
            self._row_start = torch.arange(self.batch, device=cache_pos.device) * self.max_len
        base = self._row_start + cache_pos  # (few kernels: a CUDA graph replays each of them per token)
        self._rows = base if T == 1 else (base[:, None] + torch.arange(T, device=cache_pos.device)).reshape(-1)
        self.kv_lens = (cache_pos + T).to(torch.int32)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, T, Hkv, D) where begin() said; return this layer's full (k, v) buffers."""
        B, T, Hkv, D = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, self.max_len, Hkv, D)
            self.v[layer] = v.new_zeros(B, self.max_len, Hkv, D)
        kc, vc = self.k[layer], self.v[layer]
        if kc.dtype != k.dtype or kc.shape[0] != B:
            raise RuntimeError(f"KVCache: layer {layer} holds {tuple(kc.shape)} {kc.dtype}, got keys "
                               f"{tuple(k.shape)} {k.dtype}")
        if self._rows is None:
            kc[:, :T] = k
            vc[:, :T] = v
        else:
            kc.view(B * self.max_len, Hkv, D).index_copy_(0, self._rows, k.reshape(B * T, Hkv, D))
            vc.view(B * self.max_len, Hkv, D).index_copy_(0, self._rows, v.reshape(B * T, Hkv, D))
        return kc, vc


class Sampling(NamedTuple):
    """What shapes the sampling code (a CUDA graph is captured per value): greedy or not, top_k
    (an int baked into the graph), whether a nucleus cut applies (its value is a device scalar),
    whether an EOS token ends sequences."""
    greedy: bool
    top_k: int | None
    top_p: bool
    eos: bool

    @classmethod
    def of(cls, temperature, top_k, top_p, eos_token_id, vocab_size: int) -> "Sampling":
        greedy = temperature == 0
        return cls(greedy, None if greedy or top_k is None or top_k >= vocab_size else int(top_k),
                   bool(not greedy and top_p is not None and top_p < 1.0), eos_token_id is not None)


def sample_tokens(logits: torch.Tensor, s: Sampling, temperature: torch.Tensor, top_p: torch.Tensor,
                  u: torch.Tensor | None) -> torch.Tensor:
    """(B, V) logits -> (B,) int64 tokens, without host syncs. Greedy: argmax. Otherwise softmax of
    logits / temperature (a device scalar), restricted to the s.top_k most likely tokens and/or the
    nucleus (the smallest set of most likely tokens whose probability reaches top_p, a device
    scalar), then the token at which the cumulative distribution first exceeds u[b] times its
    total (u (B,) uniform in [0, 1): inverse-CDF sampling, one random number per row)."""
    if s.greedy:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if s.top_k is not None:
        kth = torch.topk(x, s.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if s.top_p:
        p_sorted, order = probs.sort(dim=-1, descending=True)
        outside = (p_sorted.cumsum(-1) - p_sorted) >= top_p  # the mass before this token already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, p_sorted.masked_fill(outside, 0.0))
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # strictly below the total, so the first cdf entry above it exists and has probability > 0
    target = torch.minimum(u[:, None].float() * total, torch.nextafter(total, torch.zeros_like(total)))
    tok = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max_(probs.shape[-1] - 1)
    # a parallel cumsum may round a step of a zero-probability token upwards: never emit one
    return torch.where(probs.gather(-1, tok[:, None])[:, 0] > 0, tok, probs.argmax(-1))


def draw_uniforms(steps: int, batch: int, seed: int | None) -> torch.Tensor:
    """(steps, batch) uniforms in [0, 1) from a CPU generator seeded with `seed` (without a seed,
    torch's global CPU generator): the random numbers of a whole generation call."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.rand(steps, batch, generator=gen)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens. temperature 0 is greedy (argmax). Otherwise softmax of
    logits / temperature, restricted to the top_k most likely tokens and/or the nucleus (the
    smallest set of most likely tokens whose probability reaches top_p), then one draw per row
    (sample_tokens: inverse CDF of one uniform number per row, drawn with `generator`)."""
    s = Sampling.of(temperature, top_k, top_p, None, logits.shape[-1])
    if s.greedy:
        return logits.argmax(-1)
    dev = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape[0], generator=generator, device=dev).to(logits.device)
    scalar = lambda v: torch.tensor(float(v), dtype=torch.float32, device=logits.device)  # noqa: E731
    return sample_tokens(logits, s, scalar(temperature), scalar(1.0 if top_p is None else top_p), u)


def batch_bucket(batch: int) -> int:
    """The batch a decode step runs at: 1, 2, 4, then the next multiple of 8 (padded rows)."""
    for b in (1, 2, 4):
        if batch <= b:
            return b
    return -(-batch // 8) * 8


def capacity_bucket(length: int, block_size: int) -> int:
    """The KV cache capacity for `length` positions: the next power of two from 64, at most block_size."""
    cap = 64
    while cap < length:
        cap *= 2
    return min(cap, block_size)


class DecodeState:
    """Everything one decode step reads and writes, as fixed-shape tensors updated in place:

      tok (B,)        the last token of each sequence (the step's input)
      pos (B,)        its position (where the step writes its keys and values)
      step (1,)       how many tokens have been emitted (indexes u)
      finished (B,)   the sequence has emitted EOS (padded rows start finished)
      out (B, cap)    prompts and generated ids; row b's new tokens at lens[b], lens[b] + 1, ...
      u (cap, B)      the call's uniform numbers, one per step and row
      temperature, top_p, eos, fill   device scalars
    """

    def __init__(self, batch: int, capacity: int, device):
        self.batch, self.capacity = batch, capacity
        i64 = dict(dtype=torch.long, device=device)
        self.tok = torch.zeros(batch, **i64)
        self.pos = torch.zeros(batch, **i64)
        self.step_count = torch.zeros(1, **i64)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.out = torch.zeros(batch, capacity, **i64)
        self.u = torch.zeros(capacity, batch, dtype=torch.float32, device=device)
        self.temperature = torch.ones((), dtype=torch.float32, device=device)
        self.top_p = torch.ones((), dtype=torch.float32, device=device)
        self.eos = torch.zeros((), **i64)
        self.fill = torch.zeros((), **i64)

    def mutable(self) -> list[torch.Tensor]:
        """The tensors a step changes (besides the KV cache)."""
        return [self.tok, self.pos, self.step_count, self.finished, self.out]

    def reset(self, prompt: torch.Tensor, lens: torch.Tensor, real_rows: int, u: torch.Tensor | None,
              temperature: float, top_p: float | None, eos_token_id: int | None, fill: int) -> None:
        """A new call: prompt (batch, L) with lengths lens (batch,); rows from real_rows on are
        padding (finished from the start); u (steps, real_rows) or None (greedy)."""
        L = prompt.shape[1]
        valid = torch.arange(L, device=prompt.device) < lens[:, None]
        self.out.fill_(fill)
        self.out[:, :L] = prompt.masked_fill(~valid, fill)
        self.pos.copy_(lens)
        self.tok.zero_()
        self.step_count.zero_()
        self.finished.zero_()
        self.finished[real_rows:] = True
        if u is not None:
            self.u.zero_()
            self.u[:u.shape[0], :real_rows] = u
        self.temperature.fill_(float(temperature) if temperature else 1.0)
        self.top_p.fill_(1.0 if top_p is None else float(top_p))
        self.eos.fill_(0 if eos_token_id is None else eos_token_id)
        self.fill.fill_(fill)

    def emit(self, logits: torch.Tensor, s: Sampling) -> None:
        """Sample each row's next token from logits (batch, V) and append it at pos."""
        u = None if s.greedy else self.u.index_select(0, self.step_count)[0]
        tok = sample_tokens(logits, s, self.temperature, self.top_p, u)
        if s.eos:
            tok = torch.where(self.finished, self.fill, tok)
            self.finished.logical_or_(tok == self.eos)
        self.out.scatter_(1, self.pos[:, None], tok[:, None])
        self.tok.copy_(tok)
        self.step_count.add_(1)

    def prefill(self, model, cache: KVCache, prompt: torch.Tensor, s: Sampling) -> None:
        """One forward over the prompts (positions 0..L-1, filling the cache), then the first token."""
        h = model.hidden_states(prompt, cache)
        rows = torch.arange(prompt.shape[0], device=prompt.device)
        self.emit(model.lm_logits(h[rows, self.pos - 1]), s)

    def step(self, model, cache: KVCache, s: Sampling) -> None:
        """One token per sequence: feed tok at pos (attending to the cache's first pos + 1 keys),
        then emit the next token at pos + 1. The code a CUDA graph captures."""
        h = model.hidden_states(self.tok[:, None], cache, cache_pos=self.pos)
        logits = model.lm_logits(h[:, 0])
        self.pos.add_(1)
        self.emit(logits, s)


def decode_loop(state: DecodeState, max_new_tokens: int, s: Sampling, run_step, check_every: int) -> None:
    """After the prefill emitted the first token: run_step() max_new_tokens - 1 times, stopping early
    once every sequence is finished (checked on the host every check_every steps, when EOS applies)."""
    for i in range(1, max_new_tokens):
        if s.eos and (i - 1) % check_every == 0 and bool(state.finished.all()):
            break
        run_step()
