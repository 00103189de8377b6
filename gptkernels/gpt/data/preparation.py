"""`gptkernels prepare`: text corpus -> byte-level BPE -> token shards with a train/val split.

Documents are separated by the end-of-text token, which starts every document (as in llm.c).

Train/val split, by tokens: each document's tokens are cut into pieces of at most `piece_tokens`;
piece k goes to val when k % period == period - 1 (period = round(1 / val_fraction)), the rest to
train, so one large file (e.g. a single book) is split too. When whole pieces give val fewer than
min(min_val_tokens, 10% of the corpus) tokens (a small corpus: a few files), val is instead the
last max(val_fraction, that floor) of the token stream, cut inside a document if need be; the
last pieces are held back until the end for that. The log says how many val tokens there are and,
when that is less than a few sequences, how to get more.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Iterable, Iterator, Sequence

import numpy as np

from gptkernels.gpt import fs, limits
from gptkernels.gpt.data.corpus import CorpusStats, is_continuation, iter_documents, list_corpus_files
from gptkernels.gpt.data.shards import META_FORMAT, VERSION, DataError, ShardWriter, dtype_for_vocab
from gptkernels.gpt.errors import FileAccessError, file_op
from gptkernels.gpt.tokenizer import Tokenizer

MIN_VAL_TOKENS = 1024  # the val split's floor (at most 10% of the corpus): 8 sequences of 128 tokens


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

    def __init__(self, train: _SplitWriter, val: _SplitWriter, val_fraction: float, piece_tokens: int,
                 min_val_tokens: int):
        self.train, self.val = train, val
        self.fraction, self.min_val_tokens = val_fraction, min_val_tokens
        self.period = max(2, round(1.0 / val_fraction)) if val_fraction > 0 else 0
        self.piece_tokens = piece_tokens
        self.k = 0
        self.held: list[np.ndarray] = []  # the last pieces (at least piece_tokens tokens), not routed yet
        self.held_n = 0
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
        self.held.append(np.concatenate(self.cur))
        self.held_n += self.cur_n
        self.cur, self.cur_n = [], 0
        while self.held_n - self.held[0].size >= self.piece_tokens:
            p = self.held.pop(0)
            self.held_n -= p.size
            self._route(p)

    def _to_val(self, k: int) -> bool:
        return bool(self.period) and k % self.period == self.period - 1

    def _route(self, piece: np.ndarray) -> None:
        (self.val if self._to_val(self.k) else self.train).write(piece)
        self.k += 1

    def close(self) -> None:
        self.end_piece()
        held, self.held, self.held_n = self.held, [], 0
        if not held:
            return
        tail = sum(p.size for p in held)
        total = self.train.tokens + self.val.tokens + tail
        by_rule = sum(p.size for i, p in enumerate(held) if self._to_val(self.k + i))
        floor = min(self.min_val_tokens, total // 10)
        if not self.period or self.val.tokens + by_rule >= max(floor, 1):
            for p in held:
                self._route(p)
            return
        # Whole pieces give too little: val is the last `need` tokens of the stream.
        stream = np.concatenate(held)
        need = max(round(self.fraction * total), floor, 1) - self.val.tokens
        need = max(0, min(need, stream.size - (1 if self.train.tokens == 0 else 0)))
        self.train.write(stream[:stream.size - need])
        self.val.write(stream[stream.size - need:])


def _split_note(train_tokens: int, val_tokens: int, val_fraction: float) -> str | None:
    """A note when a split is shorter than a few sequences of the presets' contexts."""
    if train_tokens < 129:
        return (f"note: the train split has {train_tokens} tokens, too few for one sequence of 128 (the demo "
                f"preset's context); training needs --block-size {max(train_tokens - 1, 1)} or less, or more text")
    if val_fraction > 0 and val_tokens < 4 * 1025:
        return (f"note: the val split has {val_tokens} tokens: {max(val_tokens - 1, 0) // 128} sequence(s) of 128 "
                f"tokens (the demo preset), {max(val_tokens - 1, 0) // 1024} of 1024 (gpt2); for more, raise "
                f"--val-fraction (now {val_fraction}) or add text")
    return None


def prepare(inputs: Sequence[str], out_dir: str, vocab_size: int = 8192, tokenizer: str | None = None,
            val_fraction: float = 0.01, shard_tokens: int = 100_000_000, piece_tokens: int = 16384,
            tokenizer_train_bytes: int | None = 200_000_000, max_bytes: int | None = None,
            text_field: str = "text", progress: bool = True, overwrite: bool = False, log=None,
            min_val_tokens: int = MIN_VAL_TOKENS) -> dict:
    """Tokenize a corpus into token shards under out_dir; returns the dataset's meta dict.

    inputs: text files / folders (UTF-8; .txt .md .py ... or .jsonl with a `text_field` field).
    tokenizer: an existing tokenizer (tokenizer.json, or a folder with tokenizer.json or
    vocab.json + merges.txt); default: train a byte-level BPE with `vocab_size` ids on the first
    `tokenizer_train_bytes` of the corpus. max_bytes: use only the first max_bytes of the corpus.
    Streams the corpus twice (tokenizer training, then encoding); memory stays bounded.
    min_val_tokens: the floor of the val split (see the module docstring).
    The output folder is checked first (not a file, its folder writable); on any failure nothing
    is left behind.
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    limits.check("val_fraction", "[0,1)", val_fraction)
    for name, v in (("shard_tokens", shard_tokens), ("piece_tokens", piece_tokens), ("vocab_size", vocab_size)):
        limits.check(name, "int>=1", v)
    limits.check("min_val_tokens", "int>=0", min_val_tokens)
    files = list_corpus_files(inputs)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileAccessError(f"--out: expected a folder, found a file ({out_dir})")
    parent = fs.output_dir(os.path.dirname(os.path.abspath(out_dir)), "--out")
    with file_op("read the corpus", inputs[0] if len(inputs) == 1 else ", ".join(inputs)):
        total_bytes = sum(os.path.getsize(p) for p in files)
    if max_bytes is not None:
        total_bytes = min(total_bytes, max_bytes)
    if os.path.exists(os.path.join(out_dir, "meta.json")) and not overwrite:
        raise DataError(f"{out_dir}: already holds a prepared dataset (pass overwrite=True / --overwrite)")
    if os.path.isdir(out_dir):
        with file_op("read the --out folder", out_dir):
            if os.listdir(out_dir) and not overwrite:
                raise DataError(f"{out_dir}: exists and is not empty (pass --overwrite)")
        fs.output_dir(out_dir, "--out")  # --overwrite will remove what is in it

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

    with file_op("write the dataset", parent):
        work = tempfile.mkdtemp(prefix=".prepare-", dir=parent)
    try:
        with file_op("write the dataset", out_dir):  # (reading errors name their file: corpus.py)
            V = tok.vocab_size
            train_w = _SplitWriter(work, "train", V, shard_tokens)
            val_w = _SplitWriter(work, "val", V, shard_tokens)
            splitter = _Splitter(train_w, val_w, val_fraction, piece_tokens, min_val_tokens)
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
    split_note = _split_note(train_w.tokens, val_w.tokens, val_fraction)
    if split_note:
        log(split_note)
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
