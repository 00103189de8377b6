"""Writing a file so that readers see the old one or the complete new one, never a part.

    with AtomicFile(path) as f:     # f: a binary file object on a temporary name beside path
        f.write(...)                # on leaving the block: flush, fsync, rename onto path, fsync
                                    # the folder; on an exception the temporary file is removed

or, for a writer that stays open across calls (a token shard), f = AtomicFile(path), then
f.file.write(...), f.commit() or f.abort(). Whatever fails (a full disk in a write, the flush
or the rename), the temporary file is removed. `f.write_error` keeps the first OSError a write
raised: a writer that wraps it in an exception of its own (torch.save raises a RuntimeError
"unexpected pos ...") can be told apart from a full disk.
"""
from __future__ import annotations

import contextlib
import os


class _Recording:
    """A binary file object that remembers the first OSError of write()."""

    def __init__(self, f, owner):
        self._f, self._owner = f, owner

    def write(self, b):
        try:
            return self._f.write(b)
        except OSError as e:
            if self._owner.write_error is None:
                self._owner.write_error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


class AtomicFile:
    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.tmp = f"{self.path}.tmp{os.getpid()}"
        self.write_error: OSError | None = None
        self._raw = open(self.tmp, "wb")
        self.file = _Recording(self._raw, self)

    def commit(self) -> None:
        """Make the written bytes durable, then put them at `path` in one rename."""
        try:
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        """Drop what was written; `path` is untouched."""
        with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
            self._raw.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False
