"""Writing a file so that readers see the old one or the complete new one, never a part.

    with AtomicFile(path) as f:     # f: a binary file object on a temporary name beside path
        f.write(...)                # on leaving the block: flush, fsync, rename onto path, fsync
                                    # the folder; on an exception the temporary file is removed

or, for a writer that stays open across calls (a token shard), f = AtomicFile(path), then
f.file.write(...), f.commit() or f.abort().
"""
from __future__ import annotations

import contextlib
import os


class AtomicFile:
    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.tmp = f"{self.path}.tmp{os.getpid()}"
        self.file = open(self.tmp, "wb")

    def commit(self) -> None:
        """Make the written bytes durable, then put them at `path` in one rename."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        """Drop what was written; `path` is untouched."""
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False
