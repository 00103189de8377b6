"""The token-shard format and the dataset folder: what `gptkernels prepare` writes and training reads.

Shard file (`*.bin`): a 64-byte little-endian header, then the tokens.

  offset  size  field
  0       8     magic b"GPTKTOK\\0"
  8       4     format version (1)
  12      4     bytes per token: 2 (uint16, when the vocabulary has <= 65536 ids) or 4 (uint32)
  16      8     number of tokens
  24      4     vocabulary size of the tokenizer that wrote it
  28      4     CRC-32 of the token bytes
  32     32     zero

A prepared dataset is a directory: meta.json (splits, shard files and token counts, the
tokenizer's vocabulary size and end-of-text id), tokenizer.json, train_NNNNNN.bin, val_NNNNNN.bin.
"""
from __future__ import annotations

import json
import os
import struct
import zlib

import numpy as np

from gptkernels.gpt.atomic import AtomicFile

MAGIC = b"GPTKTOK\0"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQII")  # magic, version, itemsize, count, vocab_size, crc32 (32 bytes, zero-padded to 64)
META_FORMAT = "gptkernels-tokens"


class DataError(ValueError):
    """Unusable input or dataset: missing, corrupt, truncated or too small. The message names the path."""


class TooShortError(DataError):
    """A split with fewer tokens than one sequence needs."""

    def __init__(self, message: str, n_tokens: int):
        super().__init__(message)
        self.n_tokens = n_tokens


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Streams tokens into one shard file: header placeholder, tokens appended with a running
    CRC-32, header written on close, then an atomic rename into place."""

    def __init__(self, path: str, vocab_size: int):
        self.path = path
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.count = 0
        self._crc = 0
        self._out = AtomicFile(path)
        self._f = self._out.file
        self._f.write(b"\0" * HEADER_BYTES)

    def write(self, tokens) -> None:
        a = np.asarray(tokens)
        if a.size == 0:
            return
        if a.dtype != self.dtype:
            if a.min() < 0 or a.max() >= self.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{a.min()}, {a.max()}]")
            a = a.astype(self.dtype)
        b = a.tobytes()
        self._crc = zlib.crc32(b, self._crc)
        self._f.write(b)
        self.count += a.size

    def close(self) -> dict:
        self._f.seek(0)
        self._f.write(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.count, self.vocab_size, self._crc))
        self._out.commit()
        return {"file": os.path.basename(self.path), "tokens": self.count, "crc32": self._crc}

    def abort(self) -> None:
        self._out.abort()


def write_shard(path: str, tokens, vocab_size: int) -> dict:
    w = ShardWriter(path, vocab_size)
    w.write(tokens)
    return w.close()


def read_header(path: str) -> dict:
    """Check a shard's header and size; DataError naming the path if it is not a complete shard."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"{path}: shard file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read shard: {e}") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard ({size} bytes, shorter than the {HEADER_BYTES}-byte header)")
    magic, version, itemsize, count, vocab_size, crc = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataError(f"{path}: not a gptkernels token shard (bad magic {magic!r})")
    if version != VERSION:
        raise DataError(f"{path}: shard format version {version}, this gptkernels reads version {VERSION}")
    if itemsize not in (2, 4):
        raise DataError(f"{path}: corrupt shard header (bytes per token {itemsize}, expected 2 or 4)")
    expected = HEADER_BYTES + count * itemsize
    if size < expected:
        raise DataError(f"{path}: truncated shard: header says {count} tokens ({expected} bytes), file has {size} bytes")
    if size > expected:
        raise DataError(f"{path}: corrupt shard: {size - expected} bytes beyond the {count} tokens its header declares")
    return {"path": path, "itemsize": itemsize, "dtype": np.dtype(np.uint16 if itemsize == 2 else np.uint32),
            "count": count, "vocab_size": vocab_size, "crc32": crc}


def open_shard(path: str, verify: bool = True) -> np.ndarray:
    """Memory-map a shard's tokens (read-only), checking in one pass that every token id is below
    the vocabulary size in its header (always: a model given a larger id fails deep inside) and,
    with verify=True, the CRC-32 of the data. DataError naming the shard otherwise."""
    h = read_header(path)
    if h["count"] == 0:
        return np.zeros(0, dtype=h["dtype"])
    try:
        mm = np.memmap(path, dtype=h["dtype"], mode="r", offset=HEADER_BYTES, shape=(h["count"],))
        crc, top, step = 0, 0, (64 << 20) // h["itemsize"]
        for i in range(0, h["count"], step):
            chunk = mm[i:i + step]
            top = max(top, int(chunk.max()))
            if verify:
                crc = zlib.crc32(chunk.tobytes(), crc)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard: {e.strerror or e}") from None
    if verify and crc != h["crc32"]:
        raise DataError(f"{path}: corrupt shard: CRC-32 of the tokens is {crc:08x}, header says {h['crc32']:08x}")
    if top >= h["vocab_size"]:
        raise DataError(f"{path}: corrupt shard: holds token id {top}, not below its vocabulary size "
                        f"{h['vocab_size']}")
    return mm


def load_meta(data_dir: str) -> dict:
    """A dataset's meta.json, checked: ours, and holding the fields training reads."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such dataset folder (make one with `gptkernels prepare`)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{data_dir}: not a prepared dataset (no meta.json; make one with `gptkernels prepare`)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise DataError(f"{path}: corrupt ({str(e)[:200] or 'empty'})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{path}: not a gptkernels dataset (format {fmt!r})")
    ok = (isinstance(meta.get("vocab_size"), int) and isinstance(meta.get("eos_id"), int)
          and isinstance(meta.get("tokenizer"), str) and isinstance(meta.get("splits"), dict)
          and isinstance(meta.get("tokens"), dict)
          and all(isinstance(v, list) and all(isinstance(s, dict) and isinstance(s.get("file"), str)
                                              and isinstance(s.get("tokens"), int) for s in v)
                  for v in meta["splits"].values()))
    if not ok:
        raise DataError(f"{path}: corrupt: missing or malformed fields (vocab_size, eos_id, tokenizer, splits, tokens)")
    return meta
