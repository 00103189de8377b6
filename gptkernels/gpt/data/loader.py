"""Training batches from a prepared dataset.

`TokenBatches` memory-maps the shards and views each split as windows of T+1 tokens
(inputs = window[:-1], targets = window[1:]). Global sample k is window perm_e(k mod N) of epoch
e = k // N, where perm_e is a seeded pseudo-random permutation of all N windows (a Feistel
network: O(1) memory for any corpus size, every window once per epoch). A training step consumes
G = micro_batch * world_size * grad_accum samples; micro step m on rank r takes samples
consumed + (m * world_size + r) * B + [0, B). The loader state is just `consumed`, so a run
resumes mid-epoch exactly, even with another number of GPUs.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np

from gptkernels.gpt.data.shards import DataError, TooShortError, load_meta, open_shard, read_header
from gptkernels.gpt.tokenizer import Tokenizer, TokenizerError


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer (uint64 arrays; arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel_permute(i: np.ndarray, n: int, seed: int, epoch: int = 0, rounds: int = 4) -> np.ndarray:
    """perm(i) for a pseudo-random permutation of range(n) keyed by (seed, epoch): a balanced
    Feistel network over the smallest even-bit domain >= n, with cycle-walking back into range."""
    i = np.asarray(i, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(i)
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    mask = np.uint64((1 << half) - 1)
    h = np.uint64(half)
    base = int(_mix64(np.array([(seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)], dtype=np.uint64))[0])
    keys = _mix64(np.array([(base + (r + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF for r in range(rounds)],
                           dtype=np.uint64))

    def enc(x):
        left, right = x >> h, x & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << h) | right

    with np.errstate(over="ignore"):
        out = enc(i)
        bad = out >= np.uint64(n)
        while bad.any():
            out[bad] = enc(out[bad])
            bad = out >= np.uint64(n)
    return out


def load_tokenizer(data_dir: str, meta: dict | None = None) -> Tokenizer:
    """The tokenizer of a prepared dataset, checked against its meta.json."""
    meta = meta or load_meta(data_dir)
    path = os.path.join(data_dir, meta["tokenizer"])
    try:
        tok = Tokenizer.load(path)
    except TokenizerError as e:
        raise DataError(f"{data_dir}: the dataset's tokenizer does not load: {e}") from None
    if tok.vocab_size != meta["vocab_size"] or tok.eos_id != meta["eos_id"]:
        raise DataError(f"{path}: a tokenizer of {tok.vocab_size} ids (end-of-text {tok.eos_id}), but the shards were "
                        f"written with {meta['vocab_size']} (end-of-text {meta['eos_id']}); not this dataset's tokenizer")
    return tok


class TokenSplit:
    """One split (train or val) of a prepared dataset, memory-mapped, viewed as windows of T+1 tokens."""

    def __init__(self, data_dir: str, split: str, block_size: int, verify: bool = True):
        meta = load_meta(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir}: no {split!r} split (has {sorted(meta['splits'])})")
        self.data_dir, self.split, self.block_size = data_dir, split, block_size
        self.vocab_size = meta["vocab_size"]
        self.eos_id = meta["eos_id"]
        self.shards = []
        for s in meta["splits"][split]:
            path = os.path.join(data_dir, s["file"])
            h = read_header(path)
            if h["count"] != s["tokens"]:
                raise DataError(f"{path}: holds {h['count']} tokens but meta.json says {s['tokens']}")
            if h["vocab_size"] != self.vocab_size:
                raise DataError(f"{path}: written for a vocabulary of {h['vocab_size']}, the dataset's is {self.vocab_size}")
            self.shards.append(open_shard(path, verify=verify))
        T = block_size
        self.windows = np.array([max(0, (len(s) - 1) // T) for s in self.shards], dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(self.windows)])
        self.n_windows = int(self.cum[-1])
        self.n_tokens = int(sum(len(s) for s in self.shards))
        if self.n_windows == 0:
            raise TooShortError(f"{data_dir}: the {split} split has {self.n_tokens} tokens, too few for one sequence "
                                f"of block_size {T} (needs {T + 1} in one shard); use a smaller --block-size or more "
                                f"text", self.n_tokens)

    def window(self, w: int) -> np.ndarray:
        s = int(np.searchsorted(self.cum, w, side="right") - 1)
        j = (w - int(self.cum[s])) * self.block_size
        return self.shards[s][j:j + self.block_size + 1]

    def gather(self, windows: Iterable[int]) -> np.ndarray:
        return np.stack([self.window(int(w)) for w in windows]).astype(np.int64)


class TokenBatches:
    """Deterministic, resumable (B, T) batches for one rank. See the module docstring for the order."""

    def __init__(self, split: TokenSplit, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 grad_accum: int = 1, shuffle: bool = True):
        if batch_size < 1 or grad_accum < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader geometry: batch_size={batch_size}, grad_accum={grad_accum}, "
                             f"rank={rank}, world_size={world_size}")
        self.split, self.B, self.seed = split, batch_size, seed
        self.rank, self.world, self.accum, self.shuffle = rank, world_size, grad_accum, shuffle
        self.consumed = 0  # global samples consumed by completed steps
        self.micro = 0

    @property
    def samples_per_step(self) -> int:
        return self.B * self.world * self.accum

    def sample_windows(self, k: np.ndarray) -> np.ndarray:
        """Window index of global sample numbers k."""
        N = self.split.n_windows
        k = np.asarray(k, dtype=np.int64)
        epoch, i = k // N, k % N
        if not self.shuffle:
            return i
        out = np.empty_like(i)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = feistel_permute(i[sel], N, self.seed, int(e)).astype(np.int64)
        return out

    def next_batch(self):
        """(x, y) int64 tensors of shape (B, T) for this rank's next micro-batch."""
        import torch
        start = self.consumed + (self.micro * self.world + self.rank) * self.B
        buf = self.split.gather(self.sample_windows(np.arange(start, start + self.B)))
        self.micro += 1
        if self.micro == self.accum:
            self.micro = 0
            self.consumed += self.samples_per_step
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    @property
    def epoch(self) -> float:
        return self.consumed / self.split.n_windows

    def state_dict(self) -> dict:
        if self.micro != 0:
            raise RuntimeError("loader state is defined between steps, not in the middle of gradient accumulation")
        return {"consumed": self.consumed, "seed": self.seed, "block_size": self.split.block_size,
                "n_windows": self.split.n_windows}

    def load_state_dict(self, sd: dict) -> None:
        if sd["block_size"] != self.split.block_size or sd["n_windows"] != self.split.n_windows:
            raise DataError(f"the checkpoint's data position is for block_size {sd['block_size']} over "
                            f"{sd['n_windows']} windows; this dataset has {self.split.n_windows} windows of "
                            f"block_size {self.split.block_size} (different data or block size)")
        self.consumed, self.seed, self.micro = int(sd["consumed"]), int(sd["seed"]), 0


def to_device(x, y, device, eos_id: int | None = None):
    """(x, y, docs) of a CPU batch on `device` (pinned and copied without blocking on CUDA). With
    eos_id (document masking) docs is the batch's Documents (gptkernels/gpt/documents.py: cu_seqlens,
    max_seqlen, positions), computed here from the CPU tokens, so the training step needs no host
    sync for them; else None."""
    from gptkernels.gpt.documents import split_documents
    docs = split_documents(x, eos_id) if eos_id is not None else None
    if device.type != "cuda":
        return x.to(device), y.to(device), docs if docs is None else docs.to(device)
    x, y = (t.pin_memory().to(device, non_blocking=True) for t in (x, y))
    return x, y, docs if docs is None else docs.pin_memory().to(device, non_blocking=True)


def eval_windows(split: TokenSplit, max_samples: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's share of a fixed evaluation set of m windows spread evenly over the split
    (m = min(max_samples, N), rounded down to a multiple of world_size so every rank runs the
    same number of batches; at least one window per rank, repeating windows if N < world_size)."""
    N = split.n_windows
    m = max(world_size, min(max_samples, N) // world_size * world_size)
    per = m // world_size
    j = np.arange(rank * per, (rank + 1) * per, dtype=np.int64)
    return (j * N) // m if m <= N else j % N


def batched(a: np.ndarray, n: int) -> Iterator[np.ndarray]:
    for i in range(0, len(a), n):
        yield a[i:i + n]
