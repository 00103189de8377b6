"""Emulated loss kernels (csrc/loss/: fused softmax cross-entropy, its reduction and backward
scaling) against the PyTorch reference.

Cases run in a worker process by the shared harness (tests/emulator/harness.py: what a pass shows
and what it does not, how it runs); the kernels are compiled unchanged with g++ against the CPU
emulator in tests/emulator/.

    python -m pytest -q tests/test_emulated_loss.py
    python tests/test_emulated_loss.py [-k SUBSTRING]   (plain runner, prints a summary)
"""
from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from emulator import harness
from emulator.harness import DTYPE_CODE, DTYPES, Case, assert_bounded, assert_path, bind, buffer, check, huge_view, ptr
from helpers import reduction_tol


# ---- cases ------------------------------------------------------------------------------------------

def _loss_cases():
    cases = []
    C = "loss"
    for dt in DTYPES:
        cases += [
            Case(f"ce-{dt}-mean-1x8", C, "run_cross_entropy", dict(dtype=dt, rows=1, vocab=8)),
            Case(f"ce-{dt}-none-7x1000-int32", C, "run_cross_entropy",
                 dict(dtype=dt, rows=7, vocab=1000, reduction="none", target64=False)),
            Case(f"ce-{dt}-sum-5x1023-ld1028", C, "run_cross_entropy",
                 dict(dtype=dt, rows=5, vocab=1023, reduction="sum", ld_pad=5)),
            Case(f"ce-{dt}-mean-3x4099-misaligned-ignore7", C, "run_cross_entropy",
                 dict(dtype=dt, rows=3, vocab=4099, offset=1, ignore_index=7)),
            Case(f"ce-{dt}-mean-2x50257", C, "run_cross_entropy", dict(dtype=dt, rows=2, vocab=50257)),
            Case(f"ce-{dt}-mean-6x1000-inplace-badtargets", C, "run_cross_entropy",
                 dict(dtype=dt, rows=6, vocab=1000, inplace=True, bad_targets=True)),
            Case(f"ce-{dt}-sum-3x7-lossonly", C, "run_cross_entropy",
                 dict(dtype=dt, rows=3, vocab=7, reduction="sum", grad=False)),
        ]
    cases += [
        Case("ce-fp32-mean-5x1", C, "run_cross_entropy", dict(dtype="fp32", rows=5, vocab=1)),
        Case("ce-bf16-mean-5x1000-masked-logits", C, "run_cross_entropy",
             dict(dtype="bf16", rows=5, vocab=1000, masked_logits=True)),
        Case("ce-fp32-sum-4x20000-masked-logits", C, "run_cross_entropy",
             dict(dtype="fp32", rows=4, vocab=20000, reduction="sum", masked_logits=True)),
        Case("ce-fp32-mean-6x1000-all-ignored", C, "run_cross_entropy",
             dict(dtype="fp32", rows=6, vocab=1000, all_ignored=True)),
        Case("ce-fp16-sum-0x100-empty", C, "run_cross_entropy", dict(dtype="fp16", rows=0, vocab=100, reduction="sum")),
        Case("ce-bf16-mean-0x100-empty", C, "run_cross_entropy", dict(dtype="bf16", rows=0, vocab=100)),
        Case("ce-fp32-mean-300x64-sms1", C, "run_cross_entropy", dict(dtype="fp32", rows=300, vocab=64), sms=1),
        Case("ce-bf16-none-300x72-sms132", C, "run_cross_entropy",
             dict(dtype="bf16", rows=300, vocab=72, reduction="none", bad_targets=True), sms=132),
        Case("ce-bf16-mean-2x50257-reverse", C, "run_cross_entropy", dict(dtype="bf16", rows=2, vocab=50257),
             thread_order=1, block_order=1),
        Case("ce-fp16-mean-4x3000-inplace-shuffled", C, "run_cross_entropy",
             dict(dtype="fp16", rows=4, vocab=3000, inplace=True, ld_pad=3), thread_order=2, block_order=2),
        Case("ce-bf16-mean-3x20000-inplace-greedy", C, "run_cross_entropy",
             dict(dtype="bf16", rows=3, vocab=20000, inplace=True), thread_order=3),
        Case("ce-fp32-sum-3x20001-greedy-reverse", C, "run_cross_entropy",
             dict(dtype="fp32", rows=3, vocab=20001, reduction="sum", offset=1), thread_order=4),
        # row offsets past 2^31 elements (4 GiB of address space, only the rows touched): 64-bit indexing
        Case("ce-bf16-mean-3x1000-ld2^30-inplace", C, "run_cross_entropy",
             dict(dtype="bf16", rows=3, vocab=1000, huge_ld=2**30 + 8, inplace=True)),
    ]
    return cases


CASES = _loss_cases()


# ---- cross-entropy ------------------------------------------------------------------------------------------------

CE_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


def _loss_cuda_tests():
    """The loss family's CUDA test module (tests/test_loss.py; tests/test_cross_entropy.py before it was
    renamed)."""
    try:
        import test_loss as mod
    except ModuleNotFoundError:
        import test_cross_entropy as mod
    return mod


def huge_rows(rows, cols, ld, dtype):
    return huge_view((rows, cols), (ld, 1), dtype)


def run_cross_entropy(lib, dtype, rows, vocab, reduction="mean", target64=True, ignore_index=-100, ld_pad=0,
                      offset=0, inplace=False, grad=True, bad_targets=False, all_ignored=False, huge_ld=0,
                      masked_logits=False):
    tce = _loss_cuda_tests()  # grad_tol: the tolerance the CUDA tests use
    from gptkernels.ops import loss as ref
    dt = DTYPES[dtype]
    code = DTYPE_CODE[dt]
    g = torch.Generator().manual_seed(rows * 31 + vocab)
    ld = huge_ld or vocab + ld_pad
    keep = None
    if huge_ld:
        made = huge_rows(rows, vocab, ld, dt)
        if made is None:
            pytest.skip("cannot map 4 GiB of address space lazily here")
        logits, keep = made
        logits.copy_(torch.randn(rows, vocab, generator=g) * 4)
    else:
        store = buffer((rows * ld,) if rows else (0,), dt, offset, g, scale=4.0)
        logits = store[: max(rows - 1, 0) * ld + vocab].as_strided((rows, vocab), (ld, 1)) if rows else store.view(0, vocab)
    if masked_logits:  # -inf logits (a masked vocabulary), never at a target
        logits[:, 1::3] = float("-inf")
    x0 = logits.clone()  # the logits as they were (in-place runs overwrite them)
    t = torch.randint(0, vocab, (rows,), generator=g)
    if masked_logits:
        t = t - t % 3  # targets at columns 0, 3, 6, ... (not masked)
    if rows:
        t[::4] = ignore_index
        if bad_targets:
            t[1::5] = vocab + 3
            t[2::5] = -5 if ignore_index != -5 else -6
        if all_ignored:
            t[:] = ignore_index
    t = t.to(torch.int64 if target64 else torch.int32)
    tbuf = buffer(tuple(t.shape), t.dtype, 0, fill=None)
    tbuf.copy_(t)
    status = buffer((3,), torch.int64, fill="nan")
    losses = buffer((rows,), torch.float32, fill="nan")
    if not grad:
        gr, g_ld = None, 0
    elif inplace:
        gr, g_ld = logits, ld
    else:
        gr, g_ld = buffer((rows, vocab), dt, offset, fill="nan"), vocab
    vp, i64, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    prep = bind(lib, "emu_ce_prepare", ci, vp, ci, i64, i64, i64, vp)
    rows_fn = bind(lib, "emu_ce_rows", ci, vp, i64, vp, i64, vp, ci, vp, vp, i64, i64, i64, ci, ci)
    red_fn = bind(lib, "emu_ce_reduce", ci, vp, i64, vp, ci, vp)
    scale_fn = bind(lib, "emu_ce_scale_rows", ci, vp, i64, i64, i64, vp, ci, ci)
    add_fn = bind(lib, "emu_ce_add_f32", ci, vp, vp, i64)
    lp = ctypes.c_void_p(logits.data_ptr())
    gp = ctypes.c_void_p(gr.data_ptr()) if gr is not None else ctypes.c_void_p(0)
    check(lib, prep(ptr(tbuf), int(target64), rows, vocab, ignore_index, ptr(status)), "cross_entropy_prepare")
    check(lib, rows_fn(lp, ld, gp, g_ld, ptr(tbuf), int(target64), ptr(losses), ptr(status), rows, vocab, ignore_index,
                       CE_REDUCTION[reduction], code), "cross_entropy_rows")
    out = buffer((1,), torch.float32, fill="nan")
    if reduction != "none":
        check(lib, red_fn(ptr(losses), rows, ptr(status), int(reduction == "mean"), ptr(out)), "cross_entropy_reduce")

    loss_ref, grad_ref, status_ref = ref._ce_rows_ref(x0, t, ignore_index, reduction, grad)
    assert status.tolist() == status_ref.tolist(), f"status {status.tolist()} != {status_ref.tolist()}"
    assert_rows = dict(atol=2e-5 * max(1.0, loss_ref.nan_to_num().abs().max().item() if rows else 1.0), rtol=2e-5,
                       equal_nan=True)
    torch.testing.assert_close(losses, loss_ref, **assert_rows)
    if reduction != "none":
        red_ref = ref._reduce_ref(loss_ref, status_ref, reduction)
        torch.testing.assert_close(out[0], red_ref.float(), atol=2e-5 * max(1.0, abs(red_ref.nan_to_num().item())),
                                   rtol=2e-5 + reduction_tol(torch.float32, rows), equal_nan=True)
    if grad and rows:
        rtol = tce.grad_tol(dt)
        # As the CUDA tests (rtol = grad_tol, atol = rtol * max|grad| * 1e-3), plus, at each valid row's
        # target, rtol * the gradient's factor: there grad = p * f - f cancels (exactly 0 with vocab 1),
        # and the error of p ~ 1 is relative to f, not to the difference.
        factor = 1.0 / max(int(status_ref[0]), 1) if reduction == "mean" else 1.0
        scale = grad_ref.abs().max().item()
        bound = rtol * grad_ref.abs() + rtol * scale * 1e-3
        valid = (t.long() >= 0) & (t.long() < vocab)
        bound[valid.nonzero()[:, 0], t.long()[valid]] += rtol * factor
        assert_bounded(gr.float(), grad_ref, bound, "grad")
        # backward: rescale rows by an upstream gradient (rows whose factor is exactly 1 are untouched)
        before = gr.clone()
        f = torch.rand(rows, generator=g) + 0.5
        f[::3] = 1.0
        fb = buffer((rows,), torch.float32, fill=None)
        fb.copy_(f)
        check(lib, scale_fn(gp, g_ld, rows, vocab, ptr(fb), 1, code), "scale_rows")
        want = (before.float() * f[:, None]).to(dt)
        assert torch.equal(gr, want), "scale_rows: grad * scale rounded once (rows with scale 1 untouched)"
        f1 = buffer((1,), torch.float32, fill=None)
        f1.fill_(0.25)
        check(lib, scale_fn(gp, g_ld, rows, vocab, ptr(f1), 0, code), "scale_rows (one factor)")
        assert torch.equal(gr, (want.float() * 0.25).to(dt)), "scale_rows with a single factor"
    n = rows * 37 + 3
    a = buffer((n,), torch.float32, 0, g)
    bb = buffer((n,), torch.float32, 0, g)
    want_sum = a + bb
    check(lib, add_fn(ptr(a), ptr(bb), n), "add_f32")
    assert torch.equal(a, want_sum), "add_f32"
    if rows:
        assert_path(lib, r"cross_entropy_rows", True)  # (one kernel: the path is chosen per row inside)
    del keep


emu_results, test_emulated = harness.pytest_tests(__file__, CASES)

if __name__ == "__main__":
    sys.exit(harness.main(__file__, CASES, sys.argv))
