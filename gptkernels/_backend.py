"""Which path an op takes: our CUDA kernel, torch's fast built-in, or the PyTorch reference.

Every op has a CUDA kernel and a pure-PyTorch reference; on a GPU, calls the kernel does not take
run torch's own fast built-in (SDPA, F.layer_norm, F.cross_entropy, F.linear + activation) rather
than a math reference. A call resolves to one of three paths (each family maps them to functions:
e.g. gptkernels.ops.attention.FLASH_ATTENTION):

- "kernel":    the extension is built, the tensors are on a CUDA device the build has code for,
               and the kernel supports the call (its family's `_unsupported()` returned None);
- "torch":     on a CUDA device otherwise: torch's fast built-in for the family;
- "reference": on the CPU, and always in mode "reference": the family's reference path. For
               attention that is the math written out (attention_ref); for the families whose
               reference already is a torch built-in (F.layer_norm, F.cross_entropy in fp32,
               F.linear + activation) it is the same function as the "torch" path.

`decide()` is that rule as a pure function (tests call it with a fake "on GPU" flag); `path()` is
what every op calls: it warns once per op and reason when a GPU call cannot take the kernel, and in
mode "kernel" raises instead. `use_kernel()` is its kernel-or-not half.

The mode comes from the environment variable GPTKERNELS_BACKEND (read and checked at first use,
not at import, so a bad value is an error of the call that reads it), `set_backend(mode)`, or the
context manager `backend(mode)`: "auto" (default), "kernel" (the kernel or a clear error) or
"reference" (always the reference, also on a GPU: for comparisons).
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings

import torch

MODES = ("auto", "kernel", "reference")
PATHS = ("kernel", "torch", "reference")

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
# The self-test's verdicts (installed by gptkernels._selftest): verifier(op, device) -> None when the
# op's kernel family may run on that GPU, else the reason it may not (it failed the self-test there).
_verifier = None


def set_verifier(fn) -> None:
    global _verifier
    _verifier = fn


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
    """`torch.ops.gptkernels.<op>` exists and has a CUDA implementation in the built extension: the
    one way every module asks whether a kernel is there."""
    return (EXT_LOADED and hasattr(torch.ops.gptkernels, op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"gptkernels::{op}", "CUDA"))


# ---- which GPUs the build has code for ----------------------------------------------------------

def build_info() -> dict:
    """What the extension says about its own build: {"archs": "80;90a", "ptx": "90", "cuda": "13.0"}."""
    if not EXT_LOADED:
        return {}
    return dict(kv.split("=", 1) for kv in torch.ops.gptkernels.build_info().split())


def image_missing(capability: tuple[int, int], archs: str, ptx: str | None) -> str | None:
    """None when a build for `archs` ("80;90a") with PTX for `ptx` ("90") runs on a GPU of this
    compute capability, else the reason. SASS for sm_XY runs on sm_XZ with Z >= Y (not across major
    versions; an "a" target only on its own GPU); PTX is compiled by the driver for any newer GPU."""
    cc = capability[0] * 10 + capability[1]
    for a in re.split(r"[;, ]+", archs or ""):
        m = re.fullmatch(r"(\d+)(\d)(a?)", a)
        if not m:
            continue
        major, minor, specific = int(m.group(1)), int(m.group(2)), m.group(3)
        if (specific and cc == major * 10 + minor) or (not specific and capability[0] == major
                                                       and capability[1] >= minor):
            return None
    if ptx and ptx.isdigit() and cc >= int(ptx):
        return None
    return (f"this build has no code for sm_{cc} (built for sm_{str(archs).replace(';', ', sm_')}"
            f"{', PTX ' + ptx if ptx else ''}; rebuild with GPTKERNELS_CUDA_ARCHS)")


_image_cache: dict[int, str | None] = {}


def _device_unsupported(device: torch.device) -> str | None:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _image_cache:
        info = build_info()
        _image_cache[idx] = image_missing(torch.cuda.get_device_capability(idx), info.get("archs", ""),
                                          info.get("ptx"))
    return _image_cache[idx]


# ---- the decision ---------------------------------------------------------------------------------

def decide(on_cuda: bool, unsupported: str | None = None, *, mode: str | None = None,
           ext_loaded: bool | None = None) -> str:
    """The path a call takes, as a pure function of its facts: "kernel", "torch" or "reference".
    Neither warns nor raises (path() does). mode / ext_loaded default to the current ones."""
    mode = get_backend() if mode is None else mode
    ext = EXT_LOADED if ext_loaded is None else ext_loaded
    if mode == "reference" or not on_cuda:
        return "reference"
    return "kernel" if ext and unsupported is None else "torch"


def _warn_once(op: str, reason: str) -> None:
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"gptkernels.{op}: using the PyTorch fallback ({reason})", stacklevel=5)


def _on_cuda(tensors) -> bool:
    return bool(tensors) and all(t.is_cuda for t in tensors)


def use_kernel(op: str, tensors, unsupported: str | None = None) -> bool:
    """True when `op` should run its CUDA kernel on `tensors`.

    `unsupported` is None when the kernel handles this call, else a short reason it does not
    (e.g. "head_dim 96 is not compiled"). Raises in "kernel" mode when the kernel cannot run; warns
    once per op and reason when a GPU call falls back."""
    mode = get_backend()
    if mode == "reference":
        return False
    tensors = [t for t in tensors if t is not None]
    if not _on_cuda(tensors):
        if mode == "kernel":
            devices = sorted({str(t.device) for t in tensors})
            raise RuntimeError(f"gptkernels.{op}: backend is 'kernel' but the inputs are on {devices}; "
                               "the kernels need CUDA tensors")
        return False
    if not EXT_LOADED:
        if mode == "kernel":
            raise RuntimeError(f"gptkernels.{op}: backend is 'kernel' but the CUDA extension is not built: "
                               f"{EXT_ERROR}")
        _warn_once(op, "the CUDA extension is not built")
        return False
    if unsupported is None and isinstance(tensors[0].device, torch.device) and tensors[0].device.type == "cuda":
        unsupported = _device_unsupported(tensors[0].device)
    if unsupported is None and _verifier is not None:
        unsupported = _verifier(op, tensors[0].device)
    if unsupported is not None:
        if mode == "kernel":
            raise ValueError(f"gptkernels.{op}: backend is 'kernel' but the kernel does not support this call: "
                             f"{unsupported}")
        _warn_once(op, unsupported)
        return False
    return True


def path(op: str, tensors, unsupported: str | None = None) -> str:
    """The path `op` takes on `tensors` ("kernel", "torch" or "reference"), as decide() states it;
    warns or raises through use_kernel(). Every op dispatches through this."""
    if use_kernel(op, tensors, unsupported):
        return "kernel"
    return decide(_on_cuda([t for t in tensors if t is not None]), "fallback")
