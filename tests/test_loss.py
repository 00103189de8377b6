"""Fused softmax cross-entropy and the chunked linear + cross-entropy: reference math, op registration,
torch parity (ignore_index, reductions, all-ignored batches), bad input, the CUDA kernels."""

import pytest
import torch
import torch.nn.functional as F

import gptkernels
from gptkernels import _backend
from gptkernels.nn import CrossEntropyLoss
from gptkernels.nn import functional as GF
from helpers import UNIT_ROUNDOFF, elementwise_tol

from gptkernels.ops import loss as ce_ops
ops = torch.ops.gptkernels if _backend.EXT_LOADED else None
needs_ext = pytest.mark.skipif(not _backend.EXT_LOADED, reason="extension not built")
REDUCTIONS = ["mean", "sum", "none"]


def targets(n, vocab, ignore_every=3, ignore_index=-100, device="cpu"):
    t = torch.randint(0, vocab, (n,), device=device)
    t[::ignore_every] = ignore_index
    return t


def torch_ce(logits, t, reduction, ignore_index=-100):
    return F.cross_entropy(logits.float(), t, ignore_index=ignore_index, reduction=reduction)


@needs_ext
def test_which_function_runs_on_a_gpu():
    logits = torch.zeros(4, 10, dtype=torch.bfloat16)
    assert _backend.decide(True, ce_ops._unsupported("cross_entropy", logits, 10), mode="auto",
                           ext_loaded=True) == "kernel"
    assert "float64" in ce_ops._unsupported("cross_entropy", logits.double(), 10)
    assert ce_ops.CROSS_ENTROPY["torch"] is ce_ops._cross_entropy_torch
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    lin = ce_ops._unsupported
    assert lin("linear_cross_entropy", x, 100, 16, "mean") is None
    assert "reduction='none'" in lin("linear_cross_entropy", x, 100, 16, "none")
    assert "multiple of 8" in lin("linear_cross_entropy", x, 100, 12, "mean")
    assert "float32" in lin("linear_cross_entropy", x.float(), 100, 16, "mean")
    assert _backend.decide(True, lin("linear_cross_entropy", x, 100, 12, "mean"), mode="auto",
                           ext_loaded=True) == "torch"
    assert ce_ops.LINEAR_CROSS_ENTROPY["torch"] is ce_ops._linear_cross_entropy_unfused


def check_loss_and_grad(loss_fn, logits, t, reduction, upstream, atol=1e-5, rtol=1e-5, ignore_index=-100):
    """loss_fn(logits) vs torch's fp32 cross-entropy: value and logits gradient for `upstream`."""
    a = logits.detach().clone().requires_grad_()
    b = logits.detach().clone().requires_grad_()
    la, lb = loss_fn(a), torch_ce(b, t, reduction, ignore_index)
    torch.testing.assert_close(la, lb, atol=atol, rtol=rtol, equal_nan=True)
    g = upstream(lb)
    la.backward(g)
    lb.backward(g)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=atol, rtol=rtol)


# ---- CPU: the op's reference implementation, eager autograd (in-place backward) ----------------

@needs_ext
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("upstream", ["one", "scaled"])
def test_op_cpu_matches_torch(reduction, upstream):
    logits = torch.randn(9, 13)
    t = targets(9, 13)
    up = (lambda l: torch.ones_like(l)) if upstream == "one" else (lambda l: torch.rand_like(l) + 0.5)  # noqa: E731
    check_loss_and_grad(lambda x: ops.cross_entropy_fwd(x, t, -100, reduction, True)[0], logits, t, reduction, up)


@needs_ext
def test_op_cpu_status_counts():
    t = torch.tensor([1, -100, 7, 2, -5, -100, 3])
    _loss, _g, status = ops.cross_entropy_fwd(torch.randn(7, 5), t, -100, "sum", False)
    assert status.tolist() == [3, 2, 7 - 2]  # valid rows 0, 3, 6; bad rows 2 and 4; first bad row 2
    with pytest.raises(ValueError, match=r"found 7 at row 2 \(2 row"):
        ce_ops._raise_bad(status.tolist(), t, 5, -100)


@needs_ext
def test_op_cpu_backward_twice_raises():
    x = torch.randn(4, 6, requires_grad=True)
    loss = ops.cross_entropy_fwd(x, torch.tensor([0, 1, 2, 3]), -100, "mean", True)[0]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_matches_torch(reduction):
    """A batch whose targets are all ignore_index returns exactly what torch returns (nan for mean),
    with a zero gradient: on the public API and on the op's own implementation."""
    logits = torch.randn(5, 7)
    t = torch.full((5,), -100)
    check_loss_and_grad(lambda x: GF.cross_entropy(x, t, reduction=reduction), logits, t, reduction,
                        lambda l: torch.ones_like(l))
    if _backend.EXT_LOADED:
        check_loss_and_grad(lambda x: ops.cross_entropy_fwd(x, t, -100, reduction, True)[0], logits, t, reduction,
                            lambda l: torch.ones_like(l))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch_matches_torch(reduction):
    logits, t = torch.randn(0, 7), torch.zeros(0, dtype=torch.long)
    torch.testing.assert_close(GF.cross_entropy(logits, t, reduction=reduction), torch_ce(logits, t, reduction),
                               equal_nan=True)
    if _backend.EXT_LOADED:
        torch.testing.assert_close(ops.cross_entropy_fwd(logits, t, -100, reduction, False)[0],
                                   torch_ce(logits, t, reduction), equal_nan=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_functional_and_module_cpu_match_torch(reduction):
    logits = torch.randn(17, 31, dtype=torch.bfloat16)
    t = targets(17, 31, ignore_index=5)
    check_loss_and_grad(lambda x: CrossEntropyLoss(ignore_index=5, reduction=reduction)(x, t), logits, t, reduction,
                        lambda l: torch.rand_like(l), atol=1e-2, rtol=1e-2, ignore_index=5)
    assert GF.cross_entropy(logits, t, 5, reduction).dtype == torch.float32


def test_bad_input():
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match=r"target: values must be in \[0, 10\)"):
        GF.cross_entropy(x, torch.tensor([1, 2, 10, 3]))
    with pytest.raises(ValueError, match="target: values must be in"):
        GF.cross_entropy(x, torch.tensor([1, -1, 0, 3]))
    with pytest.raises(ValueError, match="target: expected dtype"):
        GF.cross_entropy(x, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="logits: expected dtype"):
        GF.cross_entropy(x.long(), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="target: expected shape"):
        GF.cross_entropy(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="logits: expected 2 dimensions"):
        GF.cross_entropy(x[None], torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="reduction"):
        GF.cross_entropy(x, torch.tensor([1, 2, 3, 4]), reduction="avg")
    with pytest.raises(ValueError, match="mode"):
        ce_ops.set_target_check("later")


@needs_ext
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_cpu(reduction):
    x = torch.randn(7, 11, requires_grad=True)
    t = torch.tensor([1, -100, 3, 10, 0, -100, 5])
    torch.library.opcheck(ops.cross_entropy_fwd, (x, t, -100, reduction, True))
    torch.library.opcheck(ops.cross_entropy_fwd, (x.detach(), t.int(), -100, reduction, False))
    torch.library.opcheck(ops.cross_entropy_scale_grad_, (torch.randn(7, 11), torch.rand(7)))
    if reduction != "none":
        w, b = torch.randn(11, 16, requires_grad=True), torch.randn(11, requires_grad=True)
        torch.library.opcheck(ops.linear_cross_entropy_fwd,
                              (torch.randn(7, 16, requires_grad=True), w, b, t, -100, reduction, 3, True))


def test_compile_fullgraph_cpu():
    f = torch.compile(lambda x, t: GF.cross_entropy(x, t), fullgraph=True, backend="aot_eager")
    x, t = torch.randn(6, 9), targets(6, 9)
    torch.testing.assert_close(f(x, t), torch_ce(x, t, "mean"))


@needs_ext
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_compile_fullgraph_op_cpu(reduction):
    """The kernel path's graph (the op, traced: its backward multiplies out of place)."""
    t = targets(6, 9)
    f = torch.compile(lambda x: ops.cross_entropy_fwd(x, t, -100, reduction, True)[0], fullgraph=True,
                      backend="aot_eager")
    check_loss_and_grad(f, torch.randn(6, 9), t, reduction, lambda l: torch.rand_like(l) + 0.5)


# ---- linear + cross-entropy ------------------------------------------------------------------

def torch_linear_ce(x, w, b, t, reduction, ignore_index=-100):
    return F.cross_entropy(F.linear(x, w, b).float().reshape(-1, w.shape[0]), t.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)


@needs_ext
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_ce_op_cpu_matches_torch(reduction, bias):
    x = torch.randn(11, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True) if bias else None
    t = targets(11, 13)
    loss = ops.linear_cross_entropy_fwd(x, w, b, t, -100, reduction, 4, True)[0]
    ref = torch_linear_ce(x, w, b, t, reduction)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    ins = [v for v in (x, w, b) if v is not None]
    g = torch.autograd.grad(loss * 2.5, ins)
    r = torch.autograd.grad(ref * 2.5, ins)
    for a, c in zip(g, r):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_ce_functional_cpu_matches_torch(reduction):
    x = torch.randn(2, 5, 16, requires_grad=True)
    w, b = torch.randn(12, 16, requires_grad=True), torch.randn(12, requires_grad=True)
    t = targets(10, 12).reshape(2, 5)
    loss = GF.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=3)
    ref = torch_linear_ce(x, w, b, t, reduction)
    if reduction == "none":
        assert loss.shape == (2, 5)
        ref = ref.reshape(2, 5)
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_ce_reference_in_chunks_matches_torch(reduction):
    """The reference path in row chunks (checkpointed, recomputed in the backward): loss and every
    gradient equal torch's unchunked computation; chunk 4 over 11 rows leaves a short last chunk,
    ignored rows count nowhere, all-ignored "mean" is nan as in torch."""
    x = torch.randn(11, 16, requires_grad=True)
    w, b = torch.randn(13, 16, requires_grad=True), torch.randn(13, requires_grad=True)
    t = targets(11, 13)
    t[[0, 5, 6]] = -100
    loss = GF.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=4)
    ref = torch_linear_ce(x, w, b, t, reduction)
    torch.testing.assert_close(loss, ref)
    for a, e in zip(torch.autograd.grad(loss * 1.5, (x, w, b)), torch.autograd.grad(ref * 1.5, (x, w, b))):
        torch.testing.assert_close(a, e)
    with torch.no_grad():
        torch.testing.assert_close(GF.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=4), ref)
    all_ignored = torch.full((11,), -100)
    out = GF.linear_cross_entropy(x, w, all_ignored, b, reduction=reduction, chunk_size=4)
    torch.testing.assert_close(out, torch_linear_ce(x, w, b, all_ignored, reduction), equal_nan=True)


def test_linear_ce_bad_input_and_chunk_default():
    x, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="target: expected shape"):
        GF.linear_cross_entropy(x, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="weight: expected shape"):
        GF.linear_cross_entropy(x, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        GF.linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="bias: expected shape"):
        GF.linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long), bias=torch.randn(9))
    with pytest.raises(ValueError, match="target: values must be in"):
        GF.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 10]))
    assert ce_ops.default_chunk_size(16384, 50304) == 2624
    assert ce_ops.default_chunk_size(100, 50304) == 100


# ---- CUDA kernels --------------------------------------------------------------------------

def grad_tol(dtype):
    # one rounding of the stored gradient; for fp32, the exponent's rounding (|x log2 e - lse log2 e| ~ 50
    # carries ~4e-6 absolute) and ex2.approx (~2^-22 relative) in both ours and torch's softmax
    return max(elementwise_tol(dtype)[1], 2e-5)


CASES = [(1, 8), (7, 1000), (1000, 50257), (64, 50304), (7, 128256), (300, 4099)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kernel_matches_fp32_reference(reduction, case, dtype):
    n, vocab = case
    logits = (torch.randn(n, vocab, device="cuda") * 4).to(dtype).requires_grad_()
    t = targets(n, vocab, ignore_every=5, device="cuda")
    with gptkernels.backend("kernel"):
        loss = GF.cross_entropy(logits, t, reduction=reduction)
    lf = logits.detach().float().requires_grad_()
    ref = torch_ce(lf, t, reduction)
    torch.testing.assert_close(loss, ref, atol=2e-5 * max(1, ref.abs().max().item()), rtol=2e-5, equal_nan=True)
    up = torch.rand_like(ref) + 0.5 if reduction == "none" else torch.ones_like(ref)
    loss.backward(up)
    ref.backward(up)
    rtol = grad_tol(dtype)
    scale = lf.grad.abs().max().item()
    torch.testing.assert_close(logits.grad.float(), lf.grad, atol=rtol * scale * 1e-3, rtol=rtol)


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kernel_all_ignored_and_scaled_backward(reduction):
    logits = torch.randn(6, 1000, device="cuda", dtype=torch.bfloat16)
    t = torch.full((6,), -100, device="cuda")
    with gptkernels.backend("kernel"):
        check_loss_and_grad(lambda x: GF.cross_entropy(x, t, reduction=reduction), logits, t, reduction,
                            lambda l: torch.ones_like(l), atol=0, rtol=0)
        t2 = targets(6, 1000, device="cuda")
        check_loss_and_grad(lambda x: GF.cross_entropy(x, t2, reduction=reduction), logits, t2, reduction,
                            lambda l: torch.rand_like(l) * 3, atol=1e-2, rtol=2e-2)


@pytest.mark.cuda
def test_kernel_misaligned_rows_int32_targets_and_ignore_index():
    """Rows starting at every 2-byte offset (16-byte loads after a scalar head; the gradient buffer has
    another alignment, so its stores are scalar), int32 targets, a non-default ignore_index."""
    base = torch.randn(301 * 4099 + 3, device="cuda", dtype=torch.bfloat16)
    logits = base[3:].view(301, 4099).requires_grad_()  # a leaf view 6 bytes past an aligned start
    assert logits.data_ptr() % 16 != 0
    t = targets(301, 4099, ignore_every=4, ignore_index=7, device="cuda")
    with gptkernels.backend("kernel"):
        loss = GF.cross_entropy(logits, t.int(), ignore_index=7)
        with torch.no_grad():
            loss_ng = GF.cross_entropy(logits, t.int(), ignore_index=7)
    lf = logits.detach().float().requires_grad_()
    ref = torch_ce(lf, t, "mean", ignore_index=7)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=2e-5)
    torch.testing.assert_close(loss_ng, ref, atol=1e-5, rtol=2e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad.float(), lf.grad, atol=1e-8, rtol=grad_tol(torch.bfloat16))


@pytest.mark.cuda
def test_kernel_bad_targets_raise_not_assert():
    logits = torch.randn(5, 100, device="cuda", requires_grad=True)
    t = torch.tensor([1, 2, 100, -3, -100], device="cuda")
    with gptkernels.backend("kernel"):
        with pytest.raises(ValueError, match=r"found 100 at row 2 \(2 row"):
            GF.cross_entropy(logits, t)
        ce_ops.set_target_check("deferred")
        try:
            loss = GF.cross_entropy(logits, t)
            assert loss.isnan()
            with pytest.raises(ValueError, match="found 100 at row 2"):
                ce_ops.check_targets()
        finally:
            ce_ops.set_target_check("sync")
    assert torch.cuda.is_available() and (torch.ones(1, device="cuda") + 1).item() == 2  # context still usable


@pytest.mark.cuda
def test_kernel_64bit_indexing():
    """More than 2^31 logits in total (bf16: 4.3 GB of logits and as much gradient)."""
    n, vocab = 16800, 128256
    assert n * vocab > 2**31
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, vocab, (n,), device="cuda")
    with gptkernels.backend("kernel"):
        losses = GF.cross_entropy(logits, t, reduction="none")
        losses.sum().backward()
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1], device="cuda")
    ref = torch_ce(logits.detach()[rows], t[rows], "none")
    torch.testing.assert_close(losses[rows], ref, atol=1e-4, rtol=1e-5)
    g_ref = torch.softmax(logits.detach()[rows].float(), 1)
    g_ref[torch.arange(5), t[rows]] -= 1
    torch.testing.assert_close(logits.grad[rows].float(), g_ref, atol=1e-5, rtol=grad_tol(torch.bfloat16))


@pytest.mark.cuda
def test_opcheck_and_compile_cuda():
    x = torch.randn(9, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = targets(9, 1000, device="cuda")
    for reduction in REDUCTIONS:
        torch.library.opcheck(ops.cross_entropy_fwd, (x, t, -100, reduction, True))
    f = torch.compile(lambda x, t: GF.cross_entropy(x, t), fullgraph=True)
    with gptkernels.backend("kernel"):
        check_loss_and_grad(lambda a: f(a, t), x, t, "mean", lambda l: torch.ones_like(l), atol=1e-5, rtol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_ce_kernel_matches_reference(bias, reduction):
    n, c, vocab = 1000, 256, 50257
    x = torch.randn(n, c, device="cuda").to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, c, device="cuda") / 16).to(torch.bfloat16).requires_grad_()
    b = torch.randn(vocab, device="cuda").to(torch.bfloat16).requires_grad_() if bias else None
    t = targets(n, vocab, device="cuda")
    with gptkernels.backend("kernel"):
        loss = GF.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=384)
    ins = [v for v in (x, w, b) if v is not None]
    p32 = [v.detach().float().requires_grad_() for v in ins]
    ref = torch_linear_ce(p32[0], p32[1], p32[2] if bias else None, t, reduction)
    torch.testing.assert_close(loss, ref, atol=1e-3 * ref.abs().item(), rtol=1e-3)
    g = torch.autograd.grad(loss * 0.5, ins)
    r = torch.autograd.grad(ref * 0.5, p32)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    for a, e, name in zip(g, r, ["dx", "dw", "db"]):
        err = (a.float() - e).abs().max().item()
        assert err <= 8 * u * e.abs().max().item(), f"{name}: max error {err:.3g}"


@pytest.mark.cuda
def test_linear_ce_autocast_cuda():
    x = torch.randn(2, 100, 128, device="cuda", requires_grad=True)
    w = torch.randn(1000, 128, device="cuda", requires_grad=True)
    t = targets(200, 1000, device="cuda").reshape(2, 100)
    with torch.autocast("cuda", dtype=torch.bfloat16), gptkernels.backend("kernel"):
        loss = GF.linear_cross_entropy(x, w, t)
        ref = torch_linear_ce(x, w, None, t, "mean")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    loss.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


@pytest.mark.cuda
def test_small_shapes_for_sanitize():
    """Tiny calls through every kernel and branch, for compute-sanitizer (device_check.sh --sanitize):
    misaligned rows, heads and tails, ignored and bad rows, scalar and per-row rescaling, in-place
    chunks of the linear cross-entropy."""
    base = torch.randn(7 * 37 + 1, device="cuda", dtype=torch.bfloat16)
    logits = base[1:].view(7, 37).requires_grad_()
    t = torch.tensor([0, 36, -100, 5, 17, -100, 3], device="cuda")
    with gptkernels.backend("kernel"):
        for reduction in REDUCTIONS:
            loss = GF.cross_entropy(logits, t, reduction=reduction)
            loss.backward(torch.full_like(loss, 0.5))
        ce_ops.set_target_check("off")
        try:
            assert GF.cross_entropy(logits.detach(), torch.tensor([0, 99, 1, 2, 3, 4, 5], device="cuda")).isnan()
        finally:
            ce_ops.set_target_check("sync")
        x = torch.randn(5, 16, device="cuda", dtype=torch.float16, requires_grad=True)
        w = torch.randn(37, 16, device="cuda", dtype=torch.float16, requires_grad=True)
        b = torch.randn(37, device="cuda", dtype=torch.float16, requires_grad=True)
        GF.linear_cross_entropy(x, w, t[:5], b, chunk_size=2).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(w.grad).all() and torch.isfinite(b.grad).all()
