"""Softmax cross-entropy over the last dimension of logits (language-model loss).

  loss_i = logsumexp(logits_i) - logits_i[target_i]; rows with target == ignore_index count 0
  reduction "mean" divides by the number of non-ignored rows (nan when all are ignored, as torch),
  "sum" adds, "none" returns the per-row losses.
The loss is computed in fp32 and returned in fp32 (as torch does under autocast).

Kernel: csrc/loss/cross_entropy.cu (torch.ops.gptkernels.cross_entropy_fwd). One kernel reads each row
once and writes the loss and, when logits require grad, the logits gradient for an upstream gradient
of 1. The backward (cross_entropy_scale_grad_) rescales that stored gradient in place by the
incoming gradient, skipping rows whose factor is exactly 1 (the usual `loss.backward()`): no second
pass over the logits. Consequences: the gradient buffer ([N, V], logits' dtype) is allocated in the
forward, and the graph can be backpropagated once (a second backward through the same loss, as with
retain_graph=True, raises). Under torch.compile the backward multiplies out of place instead.

Out-of-range targets: the kernel never reads outside the row; it gives such rows a NaN loss and a zero
gradient and counts them in a small device tensor. The check of that count raises a ValueError
naming the first bad row. By default ("sync") it reads the 24-byte count right after the kernel (one
host sync per call, no extra pass); "deferred" copies it asynchronously and raises at a later call
(or at check_targets()); "off" skips it. Under torch.compile or CUDA-graph capture the host check is
skipped (bad targets still give a NaN loss). Set with set_target_check() or GPTKERNELS_CE_TARGET_CHECK.

linear_cross_entropy(x, weight, target, ...) fuses the LM head: the kernel path computes the logits
chunk by chunk (cuBLASLt), overwrites each chunk with its gradient in place, and accumulates dx and
dW, so the [N, V] logits never exist (csrc/loss/cross_entropy_binding.cpp). Off the kernel it runs
in row chunks too (checkpointed, see _reference_in_chunks), so it never holds them either.

Paths (gptkernels._backend): the kernels (limits in csrc/loss/loss_limits.h); otherwise, on a GPU and
on the CPU alike, torch's F.cross_entropy on fp32 logits, which is also the reference (and, for
linear_cross_entropy, F.linear followed by cross_entropy, whose own kernel may still run).
"""
from __future__ import annotations

import collections
import os

import torch
import torch.nn.functional as F

from gptkernels import _backend, _limits
from gptkernels._checks import autocast_inputs, check_same_device, check_tensor, param_like

REDUCTIONS = ("mean", "sum", "none")
TARGET_CHECKS = ("sync", "deferred", "off")


def cross_entropy_ref(logits, target, ignore_index: int = -100, reduction: str = "mean"):
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)


def check_cross_entropy(logits, target, reduction: str):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    check_tensor("logits", logits, ndim=2)
    check_tensor("target", target, dtypes=(torch.int64, torch.int32), ndim=1)
    check_same_device("target", target, "logits", logits)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"target: expected shape ({logits.shape[0]},) to match logits' rows, got {tuple(target.shape)}")


def check_target_range(target, vocab: int, ignore_index: int):
    """Out-of-range targets raise here, not as a device-side assert. Syncs with the device once."""
    valid = target != ignore_index
    if bool(((target < 0) | (target >= vocab)).logical_and(valid).any()):
        bad = target[valid & ((target < 0) | (target >= vocab))][0].item()
        raise ValueError(f"target: values must be in [0, {vocab}) or ignore_index={ignore_index}; found {bad}")


# ---- target check on the kernel path -------------------------------------------------------

_target_check: str | None = None  # None: not read from GPTKERNELS_CE_TARGET_CHECK yet (read at first use)
_pending: collections.deque = collections.deque()


def get_target_check() -> str:
    global _target_check
    if _target_check is None:
        mode = os.environ.get("GPTKERNELS_CE_TARGET_CHECK", "sync")
        if mode not in TARGET_CHECKS:
            raise ValueError(f"GPTKERNELS_CE_TARGET_CHECK: expected one of {TARGET_CHECKS}, got {mode!r}")
        _target_check = mode
    return _target_check


def set_target_check(mode: str) -> None:
    """How the kernel path reports out-of-range targets: "sync" (default: raise at the offending
    call, one small device-to-host read per call), "deferred" (no sync: raise at a later call or at
    check_targets()), "off"."""
    global _target_check
    if mode not in TARGET_CHECKS:
        raise ValueError(f"mode: expected one of {TARGET_CHECKS}, got {mode!r}")
    _target_check = mode


def _raise_bad(counts, target, vocab, ignore_index):
    n_bad, first_from_end = int(counts[1]), int(counts[2])
    row = target.shape[0] - first_from_end
    value = int(target[row].item())
    raise ValueError(f"target: values must be in [0, {vocab}) or ignore_index={ignore_index}; found {value} at "
                     f"row {row} ({n_bad} row(s) out of range; their loss is NaN and their gradient 0)")


def check_targets(wait: bool = True) -> None:
    """Raise for out-of-range targets seen by earlier "deferred" calls (waits for them if `wait`)."""
    while _pending:
        event, counts, target, vocab, ignore_index = _pending[0]
        if not wait and not event.query():
            return
        event.synchronize()
        _pending.popleft()
        if int(counts[1]) > 0:
            _pending.clear()
            _raise_bad(counts, target, vocab, ignore_index)


def _check_status(status, target, vocab: int, ignore_index: int) -> None:
    if get_target_check() == "off" or torch.compiler.is_compiling() or not status.is_cuda:
        return
    if torch.cuda.is_current_stream_capturing():
        return
    if _target_check == "sync":
        counts = status.tolist()
        if counts[1] > 0:
            _raise_bad(counts, target, vocab, ignore_index)
        return
    check_targets(wait=False)  # earlier calls whose counts have arrived
    counts = status.to("cpu", non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _pending.append((event, counts, target, vocab, ignore_index))


# ---- CPU / reference implementations of the ops --------------------------------------------

def _ce_rows_ref(logits, target, ignore_index: int, reduction: str, compute_grad: bool, n_valid=None):
    """Per-row losses, the gradient for an upstream gradient of 1 (fp32) and the status counts, as
    the kernel computes them. n_valid (for "mean" scaling) defaults to this call's count."""
    n, vocab = logits.shape
    lf = logits.float()
    t = target.long()
    ignored = t == ignore_index
    bad = ~ignored & ((t < 0) | (t >= vocab))
    valid = ~(ignored | bad)
    ts = torch.where(valid, t, 0)
    lse = torch.logsumexp(lf, dim=1) if vocab else lf.new_zeros(n)
    picked = lf.gather(1, ts[:, None])[:, 0] if vocab else lf.new_zeros(n)
    losses = torch.where(valid, lse - picked, 0.0)
    losses = torch.where(bad, float("nan"), losses)
    idx = torch.arange(n, device=logits.device)
    first = torch.where(bad, n - idx, 0).max() if n else torch.zeros((), dtype=torch.long)
    status = torch.stack([valid.sum(), bad.sum(), first]).to(torch.long)
    if n_valid is None:
        n_valid = status[0]
    grad = None
    if compute_grad:
        grad = torch.softmax(lf, dim=1)
        grad[idx[valid], ts[valid]] -= 1.0
        grad = torch.where(valid[:, None], grad, 0.0)
        if reduction == "mean":
            grad = grad / n_valid.clamp(min=1).to(grad.dtype)
    return losses, grad, status


def _reduce_ref(losses, status, reduction):
    if reduction == "none":
        return losses
    s = losses.sum()
    return s / status[0].float() if reduction == "mean" else s


def _cross_entropy_fwd_ref(logits, target, ignore_index: int, reduction: str, compute_grad: bool):
    losses, grad, status = _ce_rows_ref(logits, target, ignore_index, reduction, compute_grad)
    grad = grad.to(logits.dtype) if compute_grad else logits.new_empty(0)
    return _reduce_ref(losses, status, reduction), grad, status


def _scale_grad_ref(grad, scale):
    grad.mul_(scale.reshape(-1, 1) if scale.numel() != 1 else scale.reshape(()))


def _linear_cross_entropy_fwd_ref(x, weight, bias, target, ignore_index: int, reduction: str, chunk_size: int,
                                  compute_grad: bool):
    logits = x.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    losses, g, status = _ce_rows_ref(logits, target, ignore_index, reduction, compute_grad)
    loss = _reduce_ref(losses, status, reduction)
    e = x.new_empty(0)
    if not compute_grad:
        return loss, e, x.new_empty(0), x.new_empty(0), status
    dx = (g @ weight.float()).to(x.dtype)
    dw = (g.t() @ x.float()).to(weight.dtype)
    db = g.sum(0).to(bias.dtype) if bias is not None else e
    return loss, dx, dw, db, status


def _eager(t) -> bool:
    """A real tensor, not one being traced (fake/functional): the backward may then rescale the
    saved gradient in place."""
    return type(t) is torch.Tensor


if _backend.has_kernel("cross_entropy_fwd"):
    @torch.library.register_fake("gptkernels::cross_entropy_fwd")
    def _(logits, target, ignore_index, reduction, compute_grad):
        n, vocab = logits.shape
        f32 = torch.float32
        loss = logits.new_empty(n, dtype=f32) if reduction == "none" else logits.new_empty((), dtype=f32)
        grad = logits.new_empty(n, vocab) if compute_grad else logits.new_empty(0)
        return loss, grad, logits.new_empty(3, dtype=torch.long)

    @torch.library.register_fake("gptkernels::cross_entropy_scale_grad_")
    def _(grad, scale):
        return None

    @torch.library.register_fake("gptkernels::linear_cross_entropy_fwd")
    def _(x, weight, bias, target, ignore_index, reduction, chunk_size, compute_grad):
        e = x.new_empty(0)
        if compute_grad:
            dx, dw = torch.empty_like(x), torch.empty_like(weight)
            db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
        else:
            dx, dw, db = e, x.new_empty(0), x.new_empty(0)
        return x.new_empty((), dtype=torch.float32), dx, dw, db, x.new_empty(3, dtype=torch.long)

    torch.library.impl("gptkernels::cross_entropy_fwd", "CPU")(_cross_entropy_fwd_ref)
    torch.library.impl("gptkernels::cross_entropy_scale_grad_", "CPU")(_scale_grad_ref)
    torch.library.impl("gptkernels::linear_cross_entropy_fwd", "CPU")(_linear_cross_entropy_fwd_ref)

    _TWICE = ("gptkernels: backward through this cross-entropy a second time: its logits gradient was computed "
              "in the forward and rescaled in place by the first backward. Recompute the loss instead of using "
              "retain_graph=True.")

    def _scale(g, dloss, per_row_shape):
        """g * dloss: in place on real tensors (rows with factor 1 untouched), out of place when traced."""
        s = dloss.detach().float()
        if _eager(g) and _eager(s):
            torch.ops.gptkernels.cross_entropy_scale_grad_(g if g.dim() == 2 else g.view(1, -1),
                                                           s.reshape(-1).contiguous())
            return g
        return (g.float() * s.reshape(per_row_shape)).to(g.dtype)

    def _ce_setup(ctx, inputs, output):
        logits, _target, _ii, reduction, compute_grad = inputs
        _loss, grad, status = output
        ctx.mark_non_differentiable(grad, status)
        ctx.set_materialize_grads(False)
        ctx.reduction, ctx.compute_grad, ctx.consumed = reduction, compute_grad, False
        ctx.save_for_backward(grad)

    def _ce_backward(ctx, dloss, _dgrad, _dstatus):
        if dloss is None:
            return None, None, None, None, None
        if ctx.consumed:
            raise RuntimeError(_TWICE)
        if not ctx.compute_grad:
            raise RuntimeError("gptkernels.cross_entropy_fwd: backward needs the forward to run with "
                               "compute_grad=True")
        (grad,) = ctx.saved_tensors
        ctx.consumed = _eager(grad)
        return _scale(grad, dloss, (-1, 1)), None, None, None, None

    torch.library.register_autograd("gptkernels::cross_entropy_fwd", _ce_backward, setup_context=_ce_setup)

    def _lce_setup(ctx, inputs, output):
        _x, _w, bias, _t, _ii, _red, _chunk, compute_grad = inputs
        _loss, dx, dw, db, status = output
        ctx.mark_non_differentiable(dx, dw, db, status)
        ctx.set_materialize_grads(False)
        ctx.has_bias, ctx.compute_grad, ctx.consumed = bias is not None, compute_grad, False
        ctx.save_for_backward(dx, dw, db)

    def _lce_backward(ctx, dloss, *_unused):
        if dloss is None:
            return (None,) * 8
        if ctx.consumed:
            raise RuntimeError(_TWICE)
        if not ctx.compute_grad:
            raise RuntimeError("gptkernels.linear_cross_entropy_fwd: backward needs the forward to run with "
                               "compute_grad=True")
        dx, dw, db = ctx.saved_tensors
        ctx.consumed = _eager(dx)
        dx, dw = _scale(dx, dloss, ()), _scale(dw, dloss, ())
        db = _scale(db, dloss, ()) if ctx.has_bias else None
        return dx, dw, db, None, None, None, None, None

    torch.library.register_autograd("gptkernels::linear_cross_entropy_fwd", _lce_backward, setup_context=_lce_setup)

# ---- dispatch ---------------------------------------------------------------------------------
LIMITS = _limits.family("loss")
_HAVE = _backend.has_kernel("cross_entropy_fwd")
_HAVE_LINEAR = _backend.has_kernel("linear_cross_entropy_fwd")


def _unsupported(op: str, x, vocab: int, features: int | None = None, reduction: str = "mean") -> str | None:
    """None when the kernel of `op` ("cross_entropy" or "linear_cross_entropy") takes this call, else
    why not. x: the logits (cross_entropy) or the features (linear_cross_entropy)."""
    dt = str(x.dtype)[6:]
    if op == "cross_entropy":
        if not _HAVE:
            return "not in this build of the extension"
        if x.dtype not in _limits.dtypes(LIMITS):
            return f"dtype {dt}"
    else:
        lin = LIMITS.get("linear", {})
        if not _HAVE_LINEAR:
            return "not in this build of the extension"
        if reduction == "none":
            return "reduction='none' is not fused (the chunked backward needs a scalar loss)"
        if x.dtype not in _limits.dtypes(lin):
            return f"{dt} inputs take the unfused path; the fused path is {', '.join(lin['dtypes'])}"
        if features <= 0 or features % lin["feature_multiple"]:
            return f"features {features} must be a positive multiple of {lin['feature_multiple']}"
    if not 0 < vocab <= LIMITS["max_vocab"]:
        return f"vocab size {vocab} is outside [1, {LIMITS['max_vocab']}]"
    return None


def _cross_entropy_kernel(logits, target, ignore_index, reduction):
    vocab = logits.shape[1]
    lg = logits if (logits.stride(-1) == 1 and logits.stride(0) >= vocab) else logits.contiguous()
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, _grad, status = torch.ops.gptkernels.cross_entropy_fwd(lg, target.contiguous(), int(ignore_index),
                                                                 reduction, compute_grad)
    _check_status(status, target, vocab, ignore_index)
    return loss


def _cross_entropy_torch(logits, target, ignore_index, reduction):
    if not torch.compiler.is_compiling():  # a data-dependent check: skipped when traced (torch's own
        check_target_range(target, logits.shape[1], ignore_index)  # cross_entropy still rejects bad targets on CPU)
    return cross_entropy_ref(logits, target.long(), ignore_index, reduction)


# What each path (gptkernels._backend) runs: torch's F.cross_entropy (fp32) is also the reference.
CROSS_ENTROPY = {"kernel": _cross_entropy_kernel, "torch": _cross_entropy_torch, "reference": _cross_entropy_torch}


def cross_entropy(logits, target, ignore_index: int = -100, reduction: str = "mean"):
    """Same arguments and result as torch.nn.functional.cross_entropy for (N, V) logits and (N,)
    class targets; the loss is fp32."""
    check_cross_entropy(logits, target, reduction)
    why = _unsupported("cross_entropy", logits, logits.shape[1])
    return CROSS_ENTROPY[_backend.path("cross_entropy", (logits, target), why)](logits, target, ignore_index, reduction)


def default_chunk_size(n: int, vocab: int, elt: int = 2) -> int:
    """Rows per chunk for linear_cross_entropy: about 256 MiB of logits per chunk, a multiple of 64."""
    rows = max(1, (1 << 28) // (max(vocab, 1) * elt))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(n, rows))


def linear_cross_entropy(x, weight, target, bias=None, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None):
    """cross_entropy(x @ weight^T + bias, target) without materialising the logits on the kernel path.

    x: (..., C); weight: (V, C) (an LM head, e.g. tied to the embedding); target: x.shape[:-1];
    reduction "mean" or "sum" fuse (the loss is fp32); "none" runs the unfused path and returns
    target's shape. chunk_size: rows of logits alive at once (default: about 256 MiB of them)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_tensor("target", target, dtypes=(torch.int64, torch.int32))
    check_same_device("weight", weight, "x", x)
    check_same_device("target", target, "x", x)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected shape (vocab, {x.shape[-1]}) to match x's last dimension, got "
                         f"{tuple(weight.shape)}")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(x.shape[:-1])} (x's leading dimensions), got "
                         f"{tuple(target.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same_device("bias", bias, "x", x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")
    weight, bias = param_like("weight", weight, x), param_like("bias", bias, x)
    x, weight, bias = autocast_inputs(x, weight, bias)
    x2, t2 = x.reshape(-1, x.shape[-1]), target.reshape(-1)
    vocab, feats = weight.shape
    why = _unsupported("linear_cross_entropy", x, vocab, feats, reduction)
    fn = LINEAR_CROSS_ENTROPY[_backend.path("linear_cross_entropy", (x, weight, bias, target), why)]
    loss = fn(x2, weight, bias, t2, ignore_index, reduction, chunk_size)
    return loss.reshape(target.shape) if reduction == "none" else loss


def _linear_cross_entropy_kernel(x2, weight, bias, t2, ignore_index, reduction, chunk_size):
    vocab = weight.shape[0]
    chunk = chunk_size or default_chunk_size(x2.shape[0], vocab, x2.element_size())
    compute_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, weight, bias))
    loss, *_rest, status = torch.ops.gptkernels.linear_cross_entropy_fwd(
        x2.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), t2.contiguous(),
        int(ignore_index), reduction, int(chunk), compute_grad)
    _check_status(status, t2, vocab, ignore_index)
    return loss


def _linear_cross_entropy_unfused(x2, weight, bias, t2, ignore_index, reduction, chunk_size):
    n, ref_chunk = x2.shape[0], chunk_size or default_chunk_size(x2.shape[0], weight.shape[0], _REF_BYTES_PER_LOGIT)
    if reduction != "none" and n > ref_chunk:
        return _reference_in_chunks(x2, weight, bias, t2, ignore_index, reduction, ref_chunk)
    return cross_entropy(F.linear(x2, weight, bias), t2, ignore_index, reduction)


# What each path runs: off the kernel, F.linear then cross_entropy (whose own kernel may still run).
LINEAR_CROSS_ENTROPY = {"kernel": _linear_cross_entropy_kernel, "torch": _linear_cross_entropy_unfused,
                        "reference": _linear_cross_entropy_unfused}


# The reference keeps about four fp32 copies of a chunk's logits alive (logits, log-softmax and
# their gradients), so its chunks take a quarter of the rows of default_chunk_size's fp32 budget.
_REF_BYTES_PER_LOGIT = 16


def _reference_in_chunks(x2, weight, bias, t2, ignore_index: int, reduction: str, chunk: int):
    """The reference path over row chunks: each chunk's logits live inside a checkpointed segment
    (recomputed, one chunk at a time, in the backward), so neither the (N, V) logits nor their
    gradient ever exist in full. Per row the same math as the unchunked reference; the chunk
    sums are added, then divided by the number of non-ignored rows for "mean"."""
    from torch.utils.checkpoint import checkpoint

    def part(xc, tc):
        return cross_entropy(F.linear(xc, weight, bias), tc, ignore_index, "sum")

    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, weight, bias))
    total = None
    for i in range(0, x2.shape[0], chunk):
        xc, tc = x2[i:i + chunk], t2[i:i + chunk]
        c = checkpoint(part, xc, tc, use_reentrant=False) if grad else part(xc, tc)
        total = c if total is None else total + c
    if reduction == "mean":
        total = total / (t2 != ignore_index).sum()
    return total
