"""Document masking: a batch of packed token rows read as separate documents.

A training row of T tokens usually holds the end of one document, some whole ones and the start
of another (`gptkernels prepare` writes the end-of-text token in front of every document). With
document masking no token attends across a document boundary and positions restart at 0 in each
document: the B rows are read as one stream of B*T tokens cut into sequences, each starting at an
end-of-text token or at the start of a row (a document split across rows is two sequences), and
attention runs per sequence (gptkernels.ops.flash_attention_varlen).

  docs = split_documents(x, eos_id)      on the CPU tokens, before the copy to the device
  docs = docs.pin_memory().to(device, non_blocking=True)
  _, loss = model(x, y, docs=docs)

The shapes are bucketed so that torch.compile and CUDA graphs see few distinct ones: the number of
sequences is padded up to a power of two with empty sequences (cu_seqlens repeats B*T at its end),
and max_seqlen (a Python int) is the longest sequence rounded up to a power of two, at most T.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Documents(NamedTuple):
    """Sequence b of a packed (B, T) batch is tokens cu_seqlens[b]:cu_seqlens[b + 1] of its B*T
    tokens (row-major); positions (B, T) is each token's place in its sequence."""
    cu_seqlens: torch.Tensor  # int32 (n + 1,), cu_seqlens[0] = 0, non-decreasing, cu_seqlens[-1] = B*T
    max_seqlen: int  # >= the longest sequence
    positions: torch.Tensor  # int64 (B, T)

    def pin_memory(self) -> "Documents":
        return self._replace(cu_seqlens=self.cu_seqlens.pin_memory(), positions=self.positions.pin_memory())

    def to(self, device, non_blocking: bool = False) -> "Documents":
        return self._replace(cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking),
                             positions=self.positions.to(device, non_blocking=non_blocking))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def split_documents(x: torch.Tensor, eos_id: int) -> Documents:
    """The Documents of a (B, T) batch of token ids: a sequence starts at every end-of-text token
    and at the start of every row. Meant for the CPU tokens of the loader (a few vectorised ops,
    no device work)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"x: expected a non-empty (batch, seq_len) tensor of token ids, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, T = x.shape
    starts = x == eos_id
    starts[:, 0] = True
    starts = starts.reshape(-1)
    begin = starts.nonzero()[:, 0]  # the first token of each sequence, ascending
    n = begin.numel()
    total = B * T
    lengths = torch.diff(begin, append=begin.new_tensor([total]))
    positions = torch.arange(total) - begin[starts.cumsum(0) - 1]
    cu = torch.full((_pow2_at_least(n) + 1,), total, dtype=torch.int32)
    cu[:n] = begin.to(torch.int32)
    max_seqlen = min(T, _pow2_at_least(int(lengths.max())))
    return Documents(cu, max_seqlen, positions.view(B, T))


def check_documents(docs, idx: torch.Tensor, block_size: int, values: bool = True) -> None:
    """ValueError naming what is wrong with docs for the batch idx (B, T). values=True also checks
    the contents of cu_seqlens and positions (one host sync)."""
    if not isinstance(docs, Documents):
        raise TypeError(f"docs: expected a gptkernels.gpt.documents.Documents (see split_documents), got "
                        f"{type(docs).__name__}")
    B, T = idx.shape
    cu, pos = docs.cu_seqlens, docs.positions
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2 or cu.device != idx.device:
        raise ValueError(f"docs.cu_seqlens: expected an int32 (n + 1,) tensor with n >= 1 on {idx.device}, got "
                         f"{str(cu.dtype).replace('torch.', '')} {tuple(cu.shape)} on {cu.device}")
    if tuple(pos.shape) != (B, T) or pos.dtype not in (torch.int64, torch.int32) or pos.device != idx.device:
        raise ValueError(f"docs.positions: expected integer positions of shape {(B, T)} on {idx.device}, got "
                         f"{str(pos.dtype).replace('torch.', '')} {tuple(pos.shape)} on {pos.device}")
    if isinstance(docs.max_seqlen, bool) or not isinstance(docs.max_seqlen, int) or docs.max_seqlen < 1:
        raise ValueError(f"docs.max_seqlen: expected a positive Python int, got {docs.max_seqlen!r}")
    if not values:
        return
    lengths = torch.diff(cu)
    ok = torch.stack([cu[0] == 0, cu[-1] == B * T, (lengths >= 0).all(), lengths.max() <= docs.max_seqlen,
                      ((pos >= 0) & (pos < block_size)).all()]).tolist()
    what = ["cu_seqlens[0] must be 0", f"cu_seqlens[-1] must be B*T = {B * T}", "cu_seqlens must not decrease",
            f"max_seqlen {docs.max_seqlen} is below the longest sequence", f"positions must be in [0, {block_size})"]
    for good, msg in zip(ok, what):
        if not good:
            raise ValueError(f"docs: {msg}")
