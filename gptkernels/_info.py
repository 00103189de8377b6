"""`gptkernels.info()` / `python -m gptkernels info`: what this install can do."""
from __future__ import annotations

import platform

import torch

from gptkernels import _backend

# The ops each public function runs on the kernel path; info() reports whether each has a
# CUDA implementation in the built extension.
KERNEL_OPS = {
    "bias_gelu / bias_relu": ["bias_act_fwd", "bias_act_bwd"],
    "linear_act": ["linear_act_fwd", "linear_act_bwd"],
    "FusedMLP / mlp": ["mlp_fwd", "mlp_bwd"],
    "cross_entropy": ["cross_entropy_fwd", "cross_entropy_scale_grad_"],
    "linear_cross_entropy": ["linear_cross_entropy_fwd", "cross_entropy_scale_grad_"],
    "layer_norm / add_layer_norm": ["layer_norm_fwd", "add_layer_norm_fwd", "layer_norm_bwd"],
    "flash_attention / sdpa": ["flash_attn_fwd", "flash_attn_bwd"],
    "flash_attention (decode)": ["flash_attn_decode"],
}


def build_info() -> dict:
    """What the extension says about its own build: {"archs": "80;90a", "cuda": "13.0"}."""
    if not _backend.EXT_LOADED:
        return {}
    return dict(kv.split("=", 1) for kv in torch.ops.gptkernels.build_info().split())


def info(file=None) -> dict:
    """Print and return torch/CUDA versions, the GPU, the extension's build and which ops use kernels."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    b = build_info()
    ops = {name: all(_backend.has_kernel(o) for o in kops) for name, kops in KERNEL_OPS.items()}
    try:
        mode, mode_error = _backend.get_backend(), None
    except ValueError as e:  # a bad GPTKERNELS_BACKEND: reported here, info still runs
        mode, mode_error = None, str(e)
    d = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": gpu,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if gpu else None,
        "extension_built": _backend.EXT_LOADED,
        "extension_archs": b.get("archs"),
        "extension_cuda": b.get("cuda"),
        "extension_error": _backend.EXT_ERROR,
        "backend": mode,
        "ops": ops,
    }
    lines = [
        f"gptkernels: python {d['python']}, torch {d['torch']} (CUDA {d['torch_cuda'] or 'none'})",
        f"GPU: {gpu + ' (sm_' + d['capability'].replace('.', '') + ')' if gpu else 'none visible'}",
    ]
    if d["extension_built"]:
        lines.append(f"extension gptkernels._C: built for sm_{d['extension_archs'].replace(';', ', sm_')} "
                     f"with CUDA {d['extension_cuda']}")
    else:
        lines.append(f"extension gptkernels._C: NOT built ({d['extension_error']}); every op uses its PyTorch reference")
    lines.append(f"backend mode: {d['backend']}" if mode_error is None else f"backend mode: INVALID ({mode_error})")
    active = _backend.kernels_available() and d["backend"] in ("auto", "kernel")
    for name, has in ops.items():
        where = "kernel" if (has and active) else "reference"
        why = "" if where == "kernel" else (" (no CUDA device)" if has and not torch.cuda.is_available() else
                                            " (backend=reference)" if has and d["backend"] == "reference" else
                                            "" if has else " (not in the extension)")
        lines.append(f"  {name:<28} {where}{why}")
    print("\n".join(lines), file=file)
    return d
