"""The bundled default corpus: the Python standard library's own source, prepared on first use
into the cache (GPTKERNELS_CACHE, else ~/.cache/gptkernels)."""
from __future__ import annotations

import os
import sys

from gptkernels._selftest.state import cache_dir  # the one cache folder of the package (GPTKERNELS_CACHE)
from gptkernels.gpt.data.preparation import prepare
from gptkernels.gpt.data.shards import VERSION, DataError
from gptkernels.gpt.errors import FileAccessError


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
    except FileAccessError as e:
        raise FileAccessError(f"the bundled corpus cannot be prepared in the cache: {e}; set GPTKERNELS_CACHE to a "
                              f"writable folder") from None
    except DataError:
        if os.path.isfile(os.path.join(out, "meta.json")):  # another process finished it first
            return out
        raise
    return out
