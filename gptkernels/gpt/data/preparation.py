"""`gptkernels prepare`: text corpus -> byte-level BPE -> token shards with a train/val split.

Documents are separated by the end-of-text token, which starts every document (as in llm.c).

Train/val split: each document's tokens are cut into pieces of at most `piece_tokens`; piece k
goes to val when k % period == period - 1 (period = round(1 / val_fraction)), the rest to train,
so one large file (e.g. a single book) is split too. A corpus too small for that rule still gets
a non-empty val split (its last piece).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np

from gptkernels.gpt.data.corpus import CorpusStats, is_continuation, iter_documents, list_corpus_files
from gptkernels.gpt.data.shards import META_FORMAT, VERSION, DataError, ShardWriter, dtype_for_vocab
from gptkernels.gpt.tokenizer import Tokenizer


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
        st = CorpusStats()
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
        stats = CorpusStats()
        dtype = dtype_for_vocab(V)
        bar = _progress(total_bytes, progress, "tokenize")
        done = 0
        docs = iter_documents(files, text_field, stats, max_bytes=max_bytes)
        for batch in _text_batches(docs):
            encoded = tok.encode_batch(batch)
            for text, ids in zip(batch, encoded):
                if not is_continuation(text):
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
