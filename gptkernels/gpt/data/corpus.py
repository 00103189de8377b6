"""Reading a text corpus: which files, and their documents as strings, streamed.

A document is one text file (a large file comes in newline-cut blocks, each a `continuation`
of the same document) or one JSONL record.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

from gptkernels.gpt.data.shards import DataError
from gptkernels.gpt.errors import file_op

TEXT_EXTENSIONS = {
    ".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".cuh", ".js", ".ts", ".java",
    ".go", ".rs", ".rb", ".sh", ".html", ".htm", ".css", ".tex", ".csv", ".tsv", ".xml", ".yaml", ".yml", ".toml",
    ".ini", ".cfg", ".json", ".sql", ".lua", ".swift", ".kt", ".scala", ".jl", ".r", ".m", ".pl", ".php", ".org",
}
JSONL_EXTENSIONS = {".jsonl", ".ndjson"}
_READ_BLOCK = 4 << 20  # text files larger than this are read (and tokenized) in blocks cut at newlines


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
class CorpusStats:
    """What iter_documents has read so far."""
    bytes_read: int = 0
    documents: int = 0
    invalid_utf8_files: int = 0


def iter_documents(files: Sequence[str], text_field: str = "text", stats: CorpusStats | None = None,
                   max_bytes: int | None = None) -> Iterator[str]:
    """Yield documents as strings: one per text file (a large file in newline-cut blocks, each
    a continuation of the same document: see `is_continuation`) or one per JSONL record.
    Streams: at most one block of a file is in memory."""
    stats = stats if stats is not None else CorpusStats()
    for path in files:
        if max_bytes is not None and stats.bytes_read >= max_bytes:
            return
        bad_utf8 = False
        if os.path.splitext(path)[1].lower() in JSONL_EXTENSIONS:
            with _open(path) as f:
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
        with _open(path) as f:
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


def _open(path: str):
    with file_op("read", path):
        return open(path, "rb")


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


def is_continuation(doc: str) -> bool:
    return isinstance(doc, _Continuation)
