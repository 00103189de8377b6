"""Input checks shared by every op: errors name the argument and say what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, dtypes=FLOAT_DTYPES, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(t.shape)}")


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on the same device")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {str(t.dtype).replace('torch.', '')} but {ref_name} has "
                         f"{str(ref.dtype).replace('torch.', '')}; they must match")


def param_like(name: str, p: torch.Tensor | None, x: torch.Tensor, x_name: str = "x") -> torch.Tensor | None:
    """A weight/bias checked against the input x: same device; same dtype, except under autocast,
    where parameters (kept in fp32) are cast to the activation's dtype as torch's autocast would."""
    if p is None:
        return None
    check_tensor(name, p)
    check_same_device(name, p, x_name, x)
    if p.dtype != x.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return p.to(x.dtype)
        check_same_dtype(name, p, x_name, x)
    return p
