"""Token data: text corpus -> byte-level BPE -> token shards -> (B, T) training batches.

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
Documents are separated by the end-of-text token, which starts every document (as in llm.c).

Train/val split: each document's tokens are cut into pieces of at most `piece_tokens`; piece k
goes to val when k % period == period - 1 (period = round(1 / val_fraction)), the rest to train,
so one large file (e.g. a single book) is split too. A corpus too small for that rule still gets
a non-empty val split (its last piece).

Loading: `TokenBatches` memory-maps the shards and views each split as windows of T+1 tokens
(inputs = window[:-1], targets = window[1:]). Global sample k is window perm_e(k mod N) of epoch
e = k // N, where perm_e is a seeded pseudo-random permutation of all N windows (a Feistel
network: O(1) memory for any corpus size, every window once per epoch). A training step consumes
G = micro_batch * world_size * grad_accum samples; micro step m on rank r takes samples
consumed + (m * world_size + r) * B + [0, B). The loader state is just `consumed`, so a run
resumes mid-epoch exactly, even with another number of GPUs.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

MAGIC = b"GPTKTOK\0"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQII")  # magic, version, itemsize, count, vocab_size, crc32 (32 bytes, zero-padded to 64)
META_FORMAT = "gptkernels-tokens"

TEXT_EXTENSIONS = {
    ".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".cuh", ".js", ".ts", ".java",
    ".go", ".rs", ".rb", ".sh", ".html", ".htm", ".css", ".tex", ".csv", ".tsv", ".xml", ".yaml", ".yml", ".toml",
    ".ini", ".cfg", ".json", ".sql", ".lua", ".swift", ".kt", ".scala", ".jl", ".r", ".m", ".pl", ".php", ".org",
}
JSONL_EXTENSIONS = {".jsonl", ".ndjson"}
_READ_BLOCK = 4 << 20  # text files larger than this are read (and tokenized) in blocks cut at newlines


class DataError(ValueError):
    """Unusable input or dataset: missing, corrupt, truncated or too small. The message names the path."""


# ---- shard files ---------------------------------------------------------------------------

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
        self._tmp = path + ".tmp"
        self._f = open(self._tmp, "wb")
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
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        return {"file": os.path.basename(self.path), "tokens": self.count, "crc32": self._crc}

    def abort(self) -> None:
        self._f.close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)


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
    """Memory-map a shard's tokens (read-only). verify=True also checks the CRC-32 of the data."""
    h = read_header(path)
    if h["count"] == 0:
        return np.zeros(0, dtype=h["dtype"])
    mm = np.memmap(path, dtype=h["dtype"], mode="r", offset=HEADER_BYTES, shape=(h["count"],))
    if verify:
        crc, step = 0, (64 << 20) // h["itemsize"]
        for i in range(0, h["count"], step):
            crc = zlib.crc32(mm[i:i + step].tobytes(), crc)
        if crc != h["crc32"]:
            raise DataError(f"{path}: corrupt shard: CRC-32 of the tokens is {crc:08x}, header says {h['crc32']:08x}")
    return mm


# ---- reading a corpus ----------------------------------------------------------------------

def _is_corpus_file(path: str) -> bool:
    ext = os.path.splitext(path)[1].lower()
    return ext in TEXT_EXTENSIONS or ext in JSONL_EXTENSIONS


def list_corpus_files(inputs: Sequence[str]) -> list[str]:
    """Files named directly (any extension) plus, for folders, every text/JSONL file under them
    (sorted; hidden entries and __pycache__ skipped)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    files = []
    for inp in inputs:
        if os.path.isfile(inp):
            files.append(inp)
        elif os.path.isdir(inp):
            found = []
            for root, dirs, names in os.walk(inp):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
                found += [os.path.join(root, n) for n in sorted(names) if not n.startswith(".")
                          and _is_corpus_file(n)]
            if not found:
                raise DataError(f"{inp}: folder has no text files ({', '.join(sorted(TEXT_EXTENSIONS)[:8])}, ... "
                                f"or .jsonl)")
            files += found
        else:
            raise DataError(f"{inp}: no such file or folder")
    return files


@dataclass
class _Stats:
    bytes_read: int = 0
    documents: int = 0
    invalid_utf8_files: int = 0


def iter_documents(files: Sequence[str], text_field: str = "text", stats: _Stats | None = None,
                   max_bytes: int | None = None) -> Iterator[str]:
    """Yield documents as strings: one per text file (a large file in newline-cut blocks, each
    a continuation of the same document: see `_is_continuation`) or one per JSONL record.
    Streams: at most one block of a file is in memory."""
    stats = stats if stats is not None else _Stats()
    for path in files:
        if max_bytes is not None and stats.bytes_read >= max_bytes:
            return
        bad_utf8 = False
        if os.path.splitext(path)[1].lower() in JSONL_EXTENSIONS:
            with open(path, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    stats.bytes_read += len(line)
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        raise DataError(f"{path}:{lineno}: not valid JSON") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                        raise DataError(f"{path}:{lineno}: expected a JSON object with a string field {text_field!r}")
                    stats.documents += 1
                    yield rec[text_field]
            continue
        with open(path, "rb") as f:
            first, rest = True, b""
            while True:
                data = f.read(_READ_BLOCK)
                block = rest + data
                eof = len(data) < _READ_BLOCK
                if not block:
                    break
                cut = len(block) if eof else _cut_point(block)
                chunk, rest = block[:cut], block[cut:]
                stats.bytes_read += len(chunk)
                try:
                    text = chunk.decode("utf-8")
                except UnicodeDecodeError:
                    text = chunk.decode("utf-8", errors="replace")
                    bad_utf8 = True
                if first:
                    stats.documents += 1
                    yield text
                else:
                    yield _Continuation(text)
                first = False
                if eof and not rest:
                    break
        stats.invalid_utf8_files += bad_utf8


def _cut_point(block: bytes) -> int:
    """Where to cut a block of a large file: after its last newline, else (one enormous line) at
    the last UTF-8 character boundary."""
    cut = block.rfind(b"\n") + 1
    if cut:
        return cut
    i = len(block) - 1
    while i > 0 and (block[i] & 0xC0) == 0x80:  # step back over continuation bytes
        i -= 1
    # block[i] starts the last character; if that is a multi-byte one it may be incomplete: cut before it
    return i if i > 0 and block[i] >= 0xC0 else len(block)


class _Continuation(str):
    """A block of text that continues the previous document (no end-of-text token before it)."""


def _is_continuation(doc: str) -> bool:
    return isinstance(doc, _Continuation)


# ---- prepare -------------------------------------------------------------------------------

class _SplitWriter:
    """Writes one split as numbered shards of at most shard_tokens tokens."""

    def __init__(self, out_dir: str, split: str, vocab_size: int, shard_tokens: int):
        self.out_dir, self.split, self.vocab_size, self.shard_tokens = out_dir, split, vocab_size, shard_tokens
        self.shards: list[dict] = []
        self.tokens = 0
        self._w: ShardWriter | None = None

    def write(self, a: np.ndarray) -> None:
        while a.size:
            if self._w is None:
                self._w = ShardWriter(os.path.join(self.out_dir, f"{self.split}_{len(self.shards):06d}.bin"),
                                      self.vocab_size)
            n = min(a.size, self.shard_tokens - self._w.count)
            self._w.write(a[:n])
            self.tokens += n
            a = a[n:]
            if self._w.count >= self.shard_tokens:
                self.shards.append(self._w.close())
                self._w = None

    def close(self) -> list[dict]:
        if self._w is not None and self._w.count:
            self.shards.append(self._w.close())
        elif self._w is not None:
            self._w.abort()
        self._w = None
        return self.shards


class _Splitter:
    """Routes pieces of the token stream to train or val (see the module docstring)."""

    def __init__(self, train: _SplitWriter, val: _SplitWriter, val_fraction: float, piece_tokens: int):
        self.train, self.val = train, val
        self.period = max(2, round(1.0 / val_fraction)) if val_fraction > 0 else 0
        self.piece_tokens = piece_tokens
        self.k = 0
        self.pending: np.ndarray | None = None
        self.cur: list[np.ndarray] = []
        self.cur_n = 0

    def add(self, ids: np.ndarray) -> None:
        while ids.size:
            n = min(ids.size, self.piece_tokens - self.cur_n)
            self.cur.append(ids[:n])
            self.cur_n += n
            ids = ids[n:]
            if self.cur_n >= self.piece_tokens:
                self.end_piece()

    def end_piece(self) -> None:
        if not self.cur_n:
            return
        piece = np.concatenate(self.cur)
        self.cur, self.cur_n = [], 0
        if self.pending is not None:
            self._route(self.pending)
        self.pending = piece

    def _route(self, piece: np.ndarray) -> None:
        to_val = self.period and self.k % self.period == self.period - 1
        (self.val if to_val else self.train).write(piece)
        self.k += 1

    def close(self) -> None:
        self.end_piece()
        p, self.pending = self.pending, None
        if p is None:
            return
        if not self.period:
            self.train.write(p)
        elif self.val.tokens == 0 and self.train.tokens == 0:  # a single piece: cut it in two
            cut = max(1, min(p.size - 1, int(round(p.size * (1 - 1.0 / self.period)))))
            self.train.write(p[:cut])
            self.val.write(p[cut:])
        elif self.val.tokens == 0:
            self.val.write(p)
        elif self.train.tokens == 0:
            self.train.write(p)
        else:
            self._route(p)


def prepare(inputs: Sequence[str], out_dir: str, vocab_size: int = 8192, tokenizer: str | None = None,
            val_fraction: float = 0.01, shard_tokens: int = 100_000_000, piece_tokens: int = 16384,
            tokenizer_train_bytes: int | None = 200_000_000, max_bytes: int | None = None,
            text_field: str = "text", progress: bool = True, overwrite: bool = False, log=None) -> dict:
    """Tokenize a corpus into token shards under out_dir; returns the dataset's meta dict.

    inputs: text files / folders (UTF-8; .txt .md .py ... or .jsonl with a `text_field` field).
    tokenizer: an existing tokenizer (tokenizer.json, or a folder with tokenizer.json or
    vocab.json + merges.txt); default: train a byte-level BPE with `vocab_size` ids on the first
    `tokenizer_train_bytes` of the corpus. max_bytes: use only the first max_bytes of the corpus.
    Streams the corpus twice (tokenizer training, then encoding); memory stays bounded.
    """
    from gptkernels.tokenizer import Tokenizer

    log = log or (lambda s: print(s, file=sys.stderr))
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in [0, 1), got {val_fraction}")
    if shard_tokens < 1 or piece_tokens < 1:
        raise ValueError("shard_tokens and piece_tokens must be positive")
    files = list_corpus_files(inputs)
    total_bytes = sum(os.path.getsize(p) for p in files)
    if max_bytes is not None:
        total_bytes = min(total_bytes, max_bytes)
    if os.path.exists(os.path.join(out_dir, "meta.json")) and not overwrite:
        raise DataError(f"{out_dir}: already holds a prepared dataset (pass overwrite=True / --overwrite)")

    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
        log(f"prepare: tokenizer {tokenizer}: {tok.vocab_size} ids, end-of-text {tok.eos_token!r} = {tok.eos_id}")
    else:
        limit = total_bytes if tokenizer_train_bytes is None else min(total_bytes, tokenizer_train_bytes)
        log(f"prepare: training a byte-level BPE tokenizer ({vocab_size} ids) on {limit / 1e6:.1f} MB "
            f"of {len(files)} files")
        st = _Stats()
        tok = Tokenizer.train(iter_documents(files, text_field, st, max_bytes=limit), vocab_size=vocab_size)
        if st.documents == 0:
            raise DataError(f"no text found in {', '.join(inputs)}")

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".prepare-", dir=parent)
    try:
        V = tok.vocab_size
        train_w = _SplitWriter(work, "train", V, shard_tokens)
        val_w = _SplitWriter(work, "val", V, shard_tokens)
        splitter = _Splitter(train_w, val_w, val_fraction, piece_tokens)
        stats = _Stats()
        dtype = dtype_for_vocab(V)
        bar = _progress(total_bytes, progress, "tokenize")
        done = 0
        docs = iter_documents(files, text_field, stats, max_bytes=max_bytes)
        for batch in _text_batches(docs):
            encoded = tok.encode_batch(batch)
            for text, ids in zip(batch, encoded):
                if not _is_continuation(text):
                    splitter.end_piece()  # a new document starts a new piece
                    splitter.add(np.array([tok.eos_id], dtype=dtype))
                splitter.add(np.asarray(ids, dtype=dtype))
            if bar is not None:
                bar.update(stats.bytes_read - done)
            done = stats.bytes_read
        splitter.close()
        if bar is not None:
            bar.close()
        train_shards, val_shards = train_w.close(), val_w.close()
        if stats.documents == 0 or train_w.tokens == 0:
            raise DataError(f"no text found in {', '.join(inputs)}")
        tok.save(os.path.join(work, "tokenizer.json"))
        meta = {
            "format": META_FORMAT, "version": VERSION, "vocab_size": V, "eos_id": tok.eos_id,
            "eos_token": tok.eos_token, "dtype": dtype.name, "tokenizer": "tokenizer.json",
            "splits": {"train": train_shards, "val": val_shards},
            "tokens": {"train": train_w.tokens, "val": val_w.tokens},
            "documents": stats.documents, "bytes": stats.bytes_read, "files": len(files),
            "invalid_utf8_files": stats.invalid_utf8_files, "val_fraction": val_fraction,
            "sources": [os.path.abspath(p) for p in inputs],
        }
        with open(os.path.join(work, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(out_dir):
            if not overwrite and os.listdir(out_dir):
                raise DataError(f"{out_dir}: exists and is not empty (pass --overwrite)")
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    note = f"; {stats.invalid_utf8_files} files had invalid UTF-8 (replaced with U+FFFD)" if stats.invalid_utf8_files else ""
    log(f"prepare: {stats.documents} documents, {stats.bytes_read / 1e6:.1f} MB -> {train_w.tokens:,} train + "
        f"{val_w.tokens:,} val tokens ({dtype.name}, {len(train_shards)}+{len(val_shards)} shards) in {out_dir}{note}")
    return meta


def _text_batches(docs: Iterable[str], max_chars: int = 4 << 20, max_docs: int = 512) -> Iterator[list[str]]:
    buf, n = [], 0
    for d in docs:
        buf.append(d)
        n += len(d)
        if n >= max_chars or len(buf) >= max_docs:
            yield buf
            buf, n = [], 0
    if buf:
        yield buf


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, dynamic_ncols=True)


def load_meta(data_dir: str) -> dict:
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such dataset folder (make one with `gptkernels prepare`)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{data_dir}: not a prepared dataset (no meta.json; make one with `gptkernels prepare`)") from None
    except ValueError as e:
        raise DataError(f"{path}: corrupt ({e})") from None
    if meta.get("format") != META_FORMAT:
        raise DataError(f"{path}: not a gptkernels dataset (format {meta.get('format')!r})")
    return meta


# ---- the bundled default corpus: the Python standard library's own source ------------------

DEFAULT_CORPORA = {
    # name: (which stdlib .py files, tokenizer vocabulary size)
    "stdlib": ("all", 8192),        # every .py file of the standard library (~30 MB on CPython 3.11)
    "stdlib-small": ("top", 2048),  # the top-level modules only (~5 MB): the CPU demo
}


def stdlib_dir() -> str:
    import sysconfig
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(which: str = "all") -> list[str]:
    """The standard library's .py files, sorted: "all" (recursively, site-packages excluded) or
    "top" (top-level modules only)."""
    root = stdlib_dir()
    if which == "top":
        files = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".py"))
    else:
        files = []
        for r, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")
                             and not d.startswith("."))
            files += [os.path.join(r, n) for n in sorted(names) if n.endswith(".py")]
    if not files:
        raise DataError(f"no Python source files found in the standard library folder {root}")
    return files


def cache_dir() -> str:
    return os.environ.get("GPTKERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptkernels")


def default_dataset(name: str = "stdlib-small", root: str | None = None, progress: bool = True, log=None) -> str:
    """Path of the bundled corpus `name` prepared in the cache (preparing it now if needed)."""
    if name not in DEFAULT_CORPORA:
        raise ValueError(f"default corpus: expected one of {sorted(DEFAULT_CORPORA)}, got {name!r}")
    which, vocab = DEFAULT_CORPORA[name]
    tag = f"{name}-py{sys.version_info.major}{sys.version_info.minor}-v{vocab}-f{VERSION}"
    out = os.path.join(root or cache_dir(), "data", tag)
    if os.path.isfile(os.path.join(out, "meta.json")):
        return out
    files = stdlib_files(which)
    (log or (lambda s: print(s, file=sys.stderr)))(
        f"preparing the bundled corpus {name!r}: {len(files)} Python standard-library files from {stdlib_dir()} "
        f"-> {out}")
    try:
        prepare(files, out, vocab_size=vocab, val_fraction=0.05, progress=progress, log=log)
    except DataError:
        if os.path.isfile(os.path.join(out, "meta.json")):  # another process finished it first
            return out
        raise
    return out


# ---- loading batches ------------------------------------------------------------------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


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
            raise DataError(f"{data_dir}: the {split} split has {self.n_tokens} tokens, too few for one sequence of "
                            f"block_size {T} (needs {T + 1} in one shard); use a smaller block size or more text")

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


def num_tokens(data_dir: str) -> dict:
    return load_meta(data_dir)["tokens"]


__all__ = ["DataError", "ShardWriter", "write_shard", "read_header", "open_shard", "prepare", "load_meta",
           "default_dataset", "stdlib_files", "TokenSplit", "TokenBatches", "eval_windows", "feistel_permute",
           "list_corpus_files", "iter_documents"]
