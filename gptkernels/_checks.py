"""Input checks shared by every op (errors name the argument and say what was expected), and the
ops' one autocast rule (custom ops are not autocast by torch, so the ops cast for themselves)."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


# ---- autocast ------------------------------------------------------------------------------------

def autocast_dtype(x: torch.Tensor):
    """The autocast dtype on x's device when torch.autocast is on there, else None."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def autocast_inputs(x, *params):
    """Matmul-like ops (linear layers, the LM head): under autocast, cast the input and parameters to
    the autocast dtype, as F.linear does. Outside autocast, return them unchanged."""
    dt = autocast_dtype(x)
    if dt is not None and x.dtype in FLOAT_DTYPES:
        return (x.to(dt),) + tuple(None if p is None else p.to(dt) for p in params)
    return (x,) + params


def param_like(name: str, p: torch.Tensor | None, x: torch.Tensor, x_name: str = "x") -> torch.Tensor | None:
    """Normalisation-like ops (LayerNorm, bias + activation) keep the activation's dtype: a weight/bias
    is checked against the input x (same device; same dtype) except under autocast, where parameters
    (kept in fp32) are cast to x's dtype."""
    if p is None:
        return None
    check_tensor(name, p)
    check_same_device(name, p, x_name, x)
    if p.dtype != x.dtype:
        if autocast_dtype(x) is not None:
            return p.to(x.dtype)
        check_same_dtype(name, p, x_name, x)
    return p
