"""How the application reports what went wrong: the error kinds, one line per error, exit codes,
and the environment variables of the application, checked where they are first read.

Every command of `gptkernels` ends an error with one line

    gptkernels <command>: error: <what> (<path>)

and exit status 2 for a bad argument (UsageError, or argparse's own errors) or 1 otherwise
(a missing, unreadable, corrupt or unwritable file, a full disk, a run that cannot go on).
GPTKERNELS_DEBUG=1 re-raises instead, for the traceback. describe() is the only place that turns
an exception into that line.
"""
from __future__ import annotations

import contextlib
import errno
import os

EXIT_ERROR = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """A bad argument value or combination of arguments: the message names the argument."""


class FileAccessError(OSError):
    """An OSError with its context: what was being done, why it failed, and the path."""


_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (read-only or immutable)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "a file of that name is in the way",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "the name is too long",
}


def os_reason(e: OSError) -> str:
    """Why an OSError happened, in a few words (no path)."""
    if isinstance(e, FileAccessError) or e.errno is None:
        return first_line(e)
    return _REASONS.get(e.errno, (e.strerror or first_line(e)).lower())


def first_line(e: BaseException) -> str:
    """The first non-empty line of str(e), else the exception's type name."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return type(e).__name__


@contextlib.contextmanager
def file_op(what: str, path):
    """Turn an OSError raised inside the block into a FileAccessError "cannot <what>: <reason> (<path>)"
    (path: the place the user named; None: the file the OSError names)."""
    try:
        yield
    except FileAccessError:
        raise
    except OSError as e:
        where = path if path is not None else e.filename
        raise FileAccessError(f"cannot {what}: {os_reason(e)} ({os.fspath(where)})") from e


def describe(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit status) for an exception that ends a command."""
    if isinstance(e, UsageError):
        return first_line(e), EXIT_USAGE
    if isinstance(e, FileAccessError):
        return first_line(e), EXIT_ERROR
    if isinstance(e, OSError):
        paths = [p for p in (e.filename, getattr(e, "filename2", None)) if p is not None]
        where = f" ({', '.join(os.fspath(p) for p in paths)})" if paths else ""
        return (os_reason(e) if paths else first_line(e)) + where, EXIT_ERROR
    if isinstance(e, UnicodeError):
        return f"not valid UTF-8 text: {first_line(e)}", EXIT_ERROR
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError
        return (f"out of memory ({first_line(e)[:160]}); try a smaller --batch-size or model", EXIT_ERROR)
    if isinstance(e, (ValueError, RuntimeError)) or (type(e).__module__ or "").startswith("gptkernels"):
        return first_line(e), EXIT_ERROR  # messages written for the user (DataError, TrainError, ...)
    return (f"internal error: {type(e).__name__}: {first_line(e)[:300]} (a bug; GPTKERNELS_DEBUG=1 shows the "
            f"traceback)", EXIT_ERROR)


def cli_error(command: str, message: str) -> str:
    return f"gptkernels {command}: error: {message}"


# ---- environment variables of the application ---------------------------------------------------

def env_flag(name: str) -> bool:
    """A 0/1 switch from the environment (unset or empty: 0); anything else is a ValueError naming it."""
    v = os.environ.get(name, "").strip()
    if v in ("", "0"):
        return False
    if v == "1":
        return True
    raise ValueError(f"{name}: expected 0 or 1, got {v!r}")


def env_int(name: str, default: int, low: int = 0) -> int:
    """An integer >= low from the environment (torchrun's RANK, WORLD_SIZE, LOCAL_RANK, ...)."""
    v = os.environ.get(name)
    if v is None or not v.strip():
        return default
    try:
        n = int(v)
    except ValueError:
        n = None
    if n is None or n < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {v!r}")
    return n
