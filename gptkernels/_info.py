"""`gptkernels.info()` / `python -m gptkernels info`: what this install can do, and which
implementation each op runs here (our kernel, torch's fast built-in, or the reference)."""
from __future__ import annotations

import platform

import torch

from gptkernels import _backend
from gptkernels._selftest import state as _selftest_state
from gptkernels.ops import attention as _attention

# Per op: the extension ops its kernel path runs, what runs on a GPU without the kernel (the
# "torch" path of gptkernels._backend), and, for attention, the op whose implementation the C++
# select_impl chooses per GPU (torch.ops.gptkernels.attention_impl).
OPS = {
    "attention fwd": (["flash_attn_fwd"], "torch SDPA fallback", "fwd"),
    "attention bwd": (["flash_attn_bwd"], "torch SDPA fallback (autograd)", "bwd"),
    "attention decode": (["flash_attn_decode"], "torch SDPA fallback", "decode"),
    "layer_norm / add_layer_norm": (["layer_norm_fwd", "add_layer_norm_fwd", "layer_norm_bwd"],
                                    "torch F.layer_norm fallback", None),
    "cross_entropy": (["cross_entropy_fwd", "cross_entropy_scale_grad_"], "torch F.cross_entropy fallback", None),
    "linear_cross_entropy": (["linear_cross_entropy_fwd", "cross_entropy_scale_grad_"],
                             "torch F.linear + cross_entropy fallback", None),
    "linear_act": (["linear_act_fwd", "linear_act_bwd"], "torch F.linear + activation fallback", None),
    "FusedMLP / fused_mlp": (["mlp_fwd", "mlp_bwd"], "torch F.linear + activation fallback", None),
    "bias_gelu / bias_relu": (["bias_act_fwd", "bias_act_bwd"], "torch F.gelu / F.relu fallback", None),
}
# The ops each public function runs on the kernel path (CI checks that every one is registered).
KERNEL_OPS = {name: kops for name, (kops, _torch, _attn) in OPS.items()}

build_info = _backend.build_info


def implementation(name: str, *, capability: tuple[int, int] | None, mode: str | None = None,
                   ext_loaded: bool | None = None, build: dict | None = None) -> str:
    """What op `name` (a key of OPS) runs on a GPU of this compute capability (None: no GPU), as a
    pure function of the facts (tests pass fake ones)."""
    kops, torch_path, attn_op = OPS[name]
    mode = _backend.get_backend() if mode is None else mode
    ext = _backend.EXT_LOADED if ext_loaded is None else ext_loaded
    if mode == "reference":
        return "reference (backend=reference)"
    if capability is None:
        return "reference (no CUDA device)"
    if not ext:
        return f"{torch_path} (extension not built)"
    if not all(_backend.has_kernel(o) for o in kops):
        return f"{torch_path} (not in this build of the extension)"
    build = build_info() if build is None else build
    missing = _backend.image_missing(capability, build.get("archs", ""), build.get("ptx"))
    if missing:
        return f"{torch_path} ({missing})"
    if attn_op is None:
        return "CUDA kernel"
    try:
        desc = _attention.kernel_implementation(attn_op, capability)
    except RuntimeError as e:  # e.g. GPTKERNELS_ATTENTION_IMPL names no implementation
        return f"error: {str(e).splitlines()[0]}"
    return f"{desc}" if desc else f"{torch_path} (no attention kernel for sm_{capability[0]}{capability[1]})"


def info(file=None) -> dict:
    """Print and return torch/CUDA versions, the GPU, the extension's build and what each op runs."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cap = torch.cuda.get_device_capability(0) if gpu else None
    b = build_info()
    try:
        mode, mode_error = _backend.get_backend(), None
    except ValueError as e:  # a bad GPTKERNELS_BACKEND: reported here, info still runs
        mode, mode_error = "auto", str(e)
    d = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": gpu,
        "capability": ".".join(map(str, cap)) if gpu else None,
        "extension_built": _backend.EXT_LOADED,
        "extension_archs": b.get("archs"),
        "extension_ptx": b.get("ptx"),
        "extension_cuda": b.get("cuda"),
        "extension_error": _backend.EXT_ERROR,
        "backend": mode if mode_error is None else None,
        "ops": {name: implementation(name, capability=cap, mode=mode, build=b) for name in OPS},
    }
    lines = [
        f"gptkernels: python {d['python']}, torch {d['torch']} (CUDA {d['torch_cuda'] or 'none'})",
        f"GPU: {gpu + ' (sm_' + d['capability'].replace('.', '') + ')' if gpu else 'none visible'}",
    ]
    if d["extension_built"]:
        ptx = f" + PTX compute_{d['extension_ptx']}" if (d["extension_ptx"] or "none") != "none" else ""
        lines.append(f"extension gptkernels._C: built for sm_{d['extension_archs'].replace(';', ', sm_')}{ptx} "
                     f"with CUDA {d['extension_cuda']}")
    else:
        lines.append(f"extension gptkernels._C: NOT built ({d['extension_error']}); every op uses its PyTorch paths")
    lines.append(f"backend mode: {d['backend']}" if mode_error is None else
                 f"backend mode: INVALID ({mode_error}); below as for 'auto'")
    lines.append("implementation per op:")
    for name, impl in d["ops"].items():
        lines.append(f"  {name:<28} {impl}")
    if not gpu and d["extension_built"]:  # what the newest GPU this build targets would run
        newest = max(d["extension_archs"].split(";"), key=lambda a: int(a.rstrip("a")))
        c = (int(newest.rstrip("a")) // 10, int(newest.rstrip("a")) % 10)
        lines.append(f"on an sm_{newest} GPU (mode {mode}):")
        for name in OPS:
            lines.append(f"  {name:<28} {implementation(name, capability=c, mode=mode, build=b)}")
    d["selftest"] = _selftest_state.summary()
    lines += d["selftest"].pop("lines")
    print("\n".join(lines), file=file)
    return d
