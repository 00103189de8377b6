"""Which path an op takes: the CUDA kernel or the PyTorch reference. One small module decides.

Every op has two paths. `use_kernel(op, tensors, unsupported)` answers per call:

- mode "reference": always the reference.
- mode "auto" (default): the kernel when the extension is built, the tensors are on a CUDA
  device and the kernel supports the call (`unsupported` is None); otherwise the reference.
  An unsupported call on a GPU, or a GPU without the extension, warns once per op and reason.
- mode "kernel": the kernel, or a clear error saying why it cannot run.

The mode comes from the environment variable GPTKERNELS_BACKEND (read and checked at first use,
not at import, so a bad value is an error of the call that reads it), `set_backend(mode)`, or the
context manager `backend(mode)`.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

MODES = ("auto", "kernel", "reference")

_C = None
EXT_ERROR: str | None = None
try:
    from gptkernels import _C  # noqa: F401  (registers torch.ops.gptkernels.*)
except ImportError as e:  # not built, or built against another torch
    EXT_ERROR = str(e)

EXT_LOADED = _C is not None


def _check_mode(mode: str, name: str = "gptkernels backend") -> str:
    if mode not in MODES:
        raise ValueError(f"{name}: expected one of {MODES}, got {mode!r}")
    return mode


_mode: str | None = None  # None: not read from GPTKERNELS_BACKEND yet
_warned: set[tuple[str, str]] = set()


def get_backend() -> str:
    global _mode
    if _mode is None:
        _mode = _check_mode(os.environ.get("GPTKERNELS_BACKEND", "auto"), "GPTKERNELS_BACKEND")
    return _mode


def set_backend(mode: str) -> None:
    """Set the path every op takes: "auto", "kernel" or "reference"."""
    global _mode
    _mode = _check_mode(mode)


@contextlib.contextmanager
def backend(mode: str):
    """`with gptkernels.backend("reference"): ...` runs the block on the given path."""
    global _mode
    old, _mode = _mode, _check_mode(mode)
    try:
        yield
    finally:
        _mode = old


def kernels_available() -> bool:
    """The extension is built and a CUDA device is visible."""
    return EXT_LOADED and torch.cuda.is_available()


def has_kernel(op: str) -> bool:
    """`torch.ops.gptkernels.<op>` has a CUDA implementation in the built extension."""
    return EXT_LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(f"gptkernels::{op}", "CUDA")


def _warn_once(op: str, reason: str) -> None:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"gptkernels.{op}: using the PyTorch reference path ({reason})", stacklevel=4)


def use_kernel(op: str, tensors, unsupported: str | None = None) -> bool:
    """True when `op` should run its CUDA kernel on `tensors`.

    `unsupported` is None when the kernel handles this call, else a short reason it does not
    (e.g. "head_dim 96 is not compiled"). Raises in "kernel" mode when the kernel cannot run.
    """
    mode = get_backend()
    if mode == "reference":
        return False
    tensors = [t for t in tensors if t is not None]
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if not on_cuda:
        if mode == "kernel":
            devices = sorted({str(t.device) for t in tensors})
            raise RuntimeError(f"gptkernels.{op}: backend is 'kernel' but the inputs are on {devices}; "
                               "the kernels need CUDA tensors")
        return False
    if not EXT_LOADED:
        reason = f"the CUDA extension is not built: {EXT_ERROR}"
        if mode == "kernel":
            raise RuntimeError(f"gptkernels.{op}: backend is 'kernel' but {reason}")
        _warn_once(op, "the CUDA extension is not built")
        return False
    if unsupported is not None:
        if mode == "kernel":
            raise ValueError(f"gptkernels.{op}: backend is 'kernel' but the kernel does not support this call: "
                             f"{unsupported}")
        _warn_once(op, unsupported)
        return False
    return True
