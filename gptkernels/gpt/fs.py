"""Checks of the places a command writes to, made up front (before data or models are loaded), so
that a read-only folder, a path through a file or a full disk is one clear line at the start of
a run rather than a traceback at its end.

Writability is tested by creating and removing a file, not with os.access: that also catches a
read-only mount and an immutable folder, and is right for root, for whom os.access says yes.
"""
from __future__ import annotations

import os
import shutil
import tempfile

from gptkernels.gpt.errors import FileAccessError, file_op


def _probe(folder: str, arg: str) -> None:
    with file_op(f"write into the {arg} folder", folder):
        fd, tmp = tempfile.mkstemp(prefix=".gptkernels-probe-", dir=folder)
        os.close(fd)
        os.remove(tmp)


def output_dir(path: str, arg: str) -> str:
    """The folder `path` (given as argument `arg`, e.g. "--out-dir") exists or is created now, and
    a file can be written in it. FileAccessError naming `arg` and the path otherwise."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileAccessError(f"{arg}: expected a folder, found a file ({path})")
    with file_op(f"create the {arg} folder", path):
        os.makedirs(path, exist_ok=True)
    _probe(path, arg)
    return path


def output_file(path: str, arg: str) -> str:
    """A file `path` can be written (atomically, through a temporary file beside it): it is not a
    folder, and its folder exists (or is created now) and is writable."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileAccessError(f"{arg}: expected a file name, found a folder ({path})")
    output_dir(os.path.dirname(os.path.abspath(path)), arg)
    return path


def free_space(folder: str, need_bytes: int, what: str) -> None:
    """FileAccessError when the file system of `folder` has less than need_bytes free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # nothing to go by; the write itself will report
    if free < need_bytes:
        raise FileAccessError(f"not enough free disk space for {what}: needs about {size_text(need_bytes)}, "
                              f"{size_text(free)} free ({folder})")


def size_text(n: float) -> str:
    """1234567 -> "1.2 MB"."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"

