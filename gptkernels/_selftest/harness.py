"""What every family's check shares: case results, the comparison of a case's outputs, inputs from a
private generator, torch's math in fp64 (the reference) and in low precision (the baseline), and a
clean numerical environment for running checks in the middle of someone else's program.

A check never touches the global RNG, autocast, grad mode or TF32 settings of the program it runs
in (the quick check runs at the first kernel call of a family, possibly inside a training step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from gptkernels._selftest import rule

HALF = (torch.bfloat16, torch.float16)
_DT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DT.get(dtype, str(dtype).replace("torch.", ""))


@dataclasses.dataclass
class CaseResult:
    """One case of one implementation: its worst output (largest error / bound), or the error that
    stopped it (an exception, a wrong status or shape)."""
    family: str
    impl: str
    case: str
    ok: bool
    output: str | None = None
    err: float | None = None
    bound: float | None = None
    error: str | None = None

    def problem(self) -> str:
        """One line saying what went wrong (or the worst output when nothing did)."""
        if self.error:
            return self.error
        return f"{self.output} error {self.err:.3g} {'>' if not self.ok else '<='} bound {self.bound:.3g}"

    def label(self) -> str:
        return f"{self.impl} {self.case}"


class CheckFailed(Exception):
    """An exact requirement of a case (a status count, a shape, a dtype) is not met."""


class Outputs:
    """Collects the comparisons of one case; `add` checks one output against the rule."""

    def __init__(self, dtype: torch.dtype, floor_ulps: float = 2.0, min_scale: float = 0.0):
        self.dtype, self.floor_ulps, self.min_scale = dtype, floor_ulps, min_scale
        self.rows: list[tuple[str, float, float]] = []

    def add(self, name: str, got, ref, base, dtype: torch.dtype | None = None) -> None:
        if got is None or ref is None:
            raise CheckFailed(f"{name}: missing ({'kernel' if got is None else 'reference'} returned none)")
        try:
            err, bound = rule.compare(got, ref, base, dtype or self.dtype, self.floor_ulps, self.min_scale)
        except ValueError as e:
            raise CheckFailed(f"{name}: {e}") from None
        self.rows.append((name, err, bound))

    @staticmethod
    def expect(cond: bool, message: str) -> None:
        if not cond:
            raise CheckFailed(message)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def run_case(family: str, impl: str, case: str, dtype: torch.dtype, fn, floor_ulps: float = 2.0,
             min_scale: float = 0.0) -> CaseResult:
    """Run fn(outputs) and summarise it. An exception is the case's failure, except running out of
    memory, which says nothing about the kernel and propagates."""
    out = Outputs(dtype, floor_ulps, min_scale)
    try:
        fn(out)
    except torch.cuda.OutOfMemoryError:
        raise
    except CheckFailed as e:
        return CaseResult(family, impl, case, False, error=str(e))
    except Exception as e:  # the kernel raised (unsupported GPU, launch failure, ...): a failure
        return CaseResult(family, impl, case, False, error=one_line(e))
    if not out.rows:
        return CaseResult(family, impl, case, False, error="no output compared")
    bad = [r for r in out.rows if not r[1] <= r[2]]  # NaN errors are bad
    name, err, bound = bad[0] if bad else max(out.rows, key=lambda r: r[1] / r[2] if r[2] > 0 else
                                               (0.0 if r[1] == 0 else math.inf))
    return CaseResult(family, impl, case, not bad, name, err, bound)


# ---- inputs and torch's math -----------------------------------------------------------------

def generator(device: torch.device, seed: int = 1234) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(g: torch.Generator, shape, dtype: torch.dtype, device, scale: float = 1.0, shift: float = 0.0):
    t = torch.randn(tuple(shape), generator=g, device=device, dtype=torch.float32)
    return (t * scale + shift).to(dtype)


def randint(g: torch.Generator, high: int, shape, device) -> torch.Tensor:
    return torch.randint(0, high, tuple(shape), generator=g, device=device, dtype=torch.long)


def _cast(t, dtype):
    if t is None or not t.is_floating_point():
        return t
    return t.detach().to(dtype).requires_grad_()


def torch_math(fn, inputs, douts, dtype):
    """fn(*inputs) computed by torch in `dtype` (float64: the reference; the kernel's half dtype: the
    baseline), and the gradients of sum(out_i * douts[i]) with respect to the floating inputs.
    Returns (outputs, grads) with grads[i] None for inputs that are None or not floating point."""
    xs = [_cast(t, dtype) for t in inputs]
    with torch.enable_grad():
        outs = fn(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, d.to(o.dtype)) for o, d in zip(outs, douts) if d is not None]
        leaves = [x for x in xs if x is not None and x.requires_grad]
        if not (pairs and leaves):
            return [o.detach() for o in outs], [None] * len(xs)
        gs = iter(torch.autograd.grad([o for o, _ in pairs], leaves, [d for _, d in pairs], allow_unused=True))
    grads = [next(gs) if (x is not None and x.requires_grad) else None for x in xs]
    grads = [None if g is None else g.detach() for g in grads]
    return [o.detach() for o in outs], grads


def sync(device) -> None:
    """Wait for the kernels: a launch failure surfaces in the case that caused it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def poison(device, nbytes: int) -> None:
    """Fill freed blocks of torch's CUDA caching allocator with NaN, so that an output the kernel
    fails to write shows up as NaN rather than as a stale copy of the right answer (one block for the
    large pool, a few below 1 MB for the small pool, which serves outputs under 1 MB)."""
    if torch.device(device).type != "cuda":
        return
    big = torch.full((max(nbytes, 2 << 20) // 4,), float("nan"), dtype=torch.float32, device=device)
    small = [torch.full(((1 << 18) - 256,), float("nan"), dtype=torch.float32, device=device) for _ in range(4)]
    del big, small


@contextlib.contextmanager
def clean_numerics():
    """Run a check with autocast off, grad mode on, outside inference mode, with full-precision fp32
    matmuls and without the deterministic-algorithms switch (a reference op lacking a deterministic
    implementation must not fail a kernel's check), whatever the caller had; restore it all after."""
    precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        torch.use_deterministic_algorithms(False)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            for dev in ("cuda", "cpu"):
                stack.enter_context(torch.autocast(dev, enabled=False))
            yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def select(cases, quick: bool):
    """The cases to run: all of them, or those marked quick (the first element of each tuple)."""
    return [c[1:] for c in cases if c[0] or not quick]
