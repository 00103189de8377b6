"""Where the application runs: the device a name means, the precision it trains and samples
in, and the GPU's peak (for MFU). Used by train, generate (cli) and finetune alike."""
from __future__ import annotations

import contextlib
import re

import torch

DEVICE_HELP = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16")

# Dense bf16 tensor-core peak, FLOP/s, by GPU name (SXM parts), for MFU.
PEAK_BF16 = [("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("A100", 312e12),
             ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12), ("4090", 165e12),
             ("B200", 2250e12)]


def check_device_name(name) -> str:
    """name if it is one of auto, cpu, cuda, cuda:N; else a ValueError naming the device option."""
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", name):
        raise ValueError(f"device: expected {DEVICE_HELP}, got {name!r}")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when a GPU is visible, else cpu; "cpu", "cuda", "cuda:N" as given. Asking
    for CUDA without a GPU is a ValueError naming the request."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA device is available")
    return torch.device(name)


def compute_dtype(device: torch.device, dtype: str = "auto") -> str:
    """"auto" -> "bfloat16" (autocast) on a GPU that has it, else "float32"."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return dtype


def autocast(device: torch.device, dtype: str = "auto"):
    """The context that runs a forward in compute_dtype(device, dtype): bf16 autocast, or nothing."""
    if compute_dtype(device, dtype) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s (override_tflops wins), or None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, f in PEAK_BF16:
        if key in name:
            return f
    return None
