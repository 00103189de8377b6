"""LayerNorm and the fused residual add + LayerNorm: reference math against torch autograd, op
registration (opcheck, autograd wiring, torch.compile), the Python API, bad input, and the CUDA
kernels against a float64 reference.

Tolerances (CUDA tests). The kernel computes in fp32 and rounds each output once to the storage
type. A row reduction of C terms in fp32 is off by about sqrt(C) * 2^-24 relative to the sum of
the magnitudes; reduction_tol(dtype, C) = 2u + 8 sqrt(C) 2^-24 (u the unit roundoff of the
storage type) bounds both together. So:
- y: |y - ref| <= tol * (1 + |ref|), tol = reduction_tol(dtype, C) (xhat is O(1), the statistics
  come from C-term sums).
- mean, rstd (fp32): tol = reduction_tol(float32, C), relative to the row's scale.
- dx: |dx - ref| <= tol * rstd * (|g| + |mean g| + |xhat| |mean(g xhat)| + |ds|) + u |ref|, the
  bound of each term's error; tol = reduction_tol(dtype, C).
- dweight, dbias: sums over the rows: tol = reduction_tol(dtype, rows), relative to the column
  sums of the magnitudes of the terms.
Every bound also allows the absolute rounding error of a subnormal result (UNDERFLOW).
The backward is checked against the float64 reference fed the kernel's own mean and rstd (its
inputs), so the test isolates the backward's arithmetic; the forward statistics are checked on
their own.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import gptkernels
from gptkernels import _backend
from gptkernels.nn import LayerNorm
from gptkernels.nn import functional as GF
from gptkernels.ops import layernorm as ln_ops
from helpers import UNIT_ROUNDOFF, reduction_tol

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Half the spacing of the subnormals: the absolute error of rounding a tiny value (fp16's normal
# range starts at 6.1e-5, so a small parameter gradient can land below it).
UNDERFLOW = {torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134, torch.float32: 2.0**-150}
needs_ext = pytest.mark.skipif(not _backend.EXT_LOADED, reason="extension not built")


# ---- the reference math (CPU, CI) ----------------------------------------------------------

@pytest.mark.parametrize("affine", ["wb", "w", "none"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 2, 33), (16, 768)])
def test_reference_forward_matches_torch(shape, affine):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 0.5
    c = shape[-1]
    w = torch.randn(c, dtype=torch.float64) if affine != "none" else None
    b = torch.randn(c, dtype=torch.float64) if affine == "wb" else None
    y, mean, rstd = ln_ops.layer_norm_fwd_ref(x.float(), None if w is None else w.float(),
                                              None if b is None else b.float(), 1e-5)
    torch.testing.assert_close(y.double(), F.layer_norm(x, (c,), w, b, 1e-5), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(mean.double(), x.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(x.var(-1, unbiased=False) + 1e-5), atol=1e-5, rtol=1e-5)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == shape[:-1]


@pytest.mark.parametrize("affine", ["wb", "w", "none"])
@pytest.mark.parametrize("with_ds", [False, True])
@pytest.mark.parametrize("shape", [(1, 5), (7, 33), (4, 3, 64)])
def test_reference_backward_matches_autograd(shape, affine, with_ds):
    c = shape[-1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    w = (torch.randn(c, dtype=torch.float64)).requires_grad_() if affine != "none" else None
    b = torch.randn(c, dtype=torch.float64).requires_grad_() if affine == "wb" else None
    dy, ds = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    y = F.layer_norm(x, (c,), w, b, 1e-5)
    (y * dy).sum().backward()
    xf = x.detach().float()
    _, mean, rstd = ln_ops.layer_norm_fwd_ref(xf, None, None, 1e-5)
    dx, dw, db = ln_ops.layer_norm_bwd_ref(dy.float(), xf, None if w is None else w.detach().float(), mean, rstd,
                                           ds.float() if with_ds else None)
    expected_dx = x.grad + (ds if with_ds else 0)
    torch.testing.assert_close(dx.double(), expected_dx, atol=1e-4, rtol=1e-4)
    if w is not None:
        torch.testing.assert_close(dw.double(), w.grad, atol=1e-4, rtol=1e-4)
    else:
        assert dw is None
    torch.testing.assert_close(db.double(), dy.reshape(-1, c).sum(0), atol=1e-4, rtol=1e-4)
    if b is not None:
        torch.testing.assert_close(db.double(), b.grad, atol=1e-4, rtol=1e-4)


def test_reference_large_mean_offset():
    """Two-pass statistics: a mean of 1e4 costs the variance nothing (E[x^2] - E[x]^2 in fp32 would
    be off by ~1e8 * 2^-24 = 6 against a variance of 1)."""
    x = 1e4 + torch.randn(8, 512, dtype=torch.float64)
    y, mean, rstd = ln_ops.layer_norm_fwd_ref(x.float(), None, None, 1e-5)
    xd = x.float().double()
    torch.testing.assert_close(rstd.double(), torch.rsqrt(xd.var(-1, unbiased=False) + 1e-5), atol=0, rtol=1e-3)
    torch.testing.assert_close(y.double(), F.layer_norm(xd, (512,), eps=1e-5), atol=5e-3, rtol=0)


def test_add_layer_norm_reference():
    r, x = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16, dtype=torch.bfloat16)
    w, b = torch.randn(16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    s, y, mean, rstd = ln_ops.add_layer_norm_fwd_ref(r, x, w, b, 1e-5)
    assert torch.equal(s, r + x)  # torch adds bf16 in fp32 and rounds once, as the kernel does
    torch.testing.assert_close(y, F.layer_norm(s.float(), (16,), w.float(), b.float()).to(torch.bfloat16))


# ---- the ops: opcheck and autograd wiring (CPU runs the reference implementation) ------------

@needs_ext
@pytest.mark.parametrize("affine", ["wb", "w", "b", "none"])
def test_opcheck_cpu(affine):
    x = torch.randn(6, 10, requires_grad=True)
    r = torch.randn(6, 10, requires_grad=True)
    w = torch.randn(10, requires_grad=True) if affine in ("wb", "w") else None
    b = torch.randn(10, requires_grad=True) if affine in ("wb", "b") else None
    torch.library.opcheck(torch.ops.gptkernels.layer_norm_fwd, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.gptkernels.add_layer_norm_fwd, (r, x, w, b, 1e-5))
    _, mean, rstd = ln_ops.layer_norm_fwd_ref(x.detach(), None, None, 1e-5)
    wd = None if w is None else w.detach()
    for ds in (None, torch.randn(6, 10)):
        torch.library.opcheck(torch.ops.gptkernels.layer_norm_bwd,
                              (torch.randn(6, 10), x.detach(), wd, mean, rstd, b is not None, ds))


@needs_ext
def test_op_autograd_cpu_matches_torch():
    """The registered autograd of both forward ops (run here on the CPU reference implementation)
    gives torch's gradients; add_layer_norm sums the gradient reaching s from both uses."""
    r = torch.randn(5, 3, 24, dtype=torch.float64)
    x = torch.randn(5, 3, 24, dtype=torch.float64)
    w, b = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    ds, dy = torch.randn_like(x), torch.randn_like(x)
    leaves = [t.float().requires_grad_() for t in (r, x, w, b)]
    s, y, _, _ = torch.ops.gptkernels.add_layer_norm_fwd(*leaves, 1e-5)
    ((s * ds.float()).sum() + (y * dy.float()).sum()).backward()
    ref = [t.clone().requires_grad_() for t in (r, x, w, b)]
    s_ref = ref[0] + ref[1]
    ((s_ref * ds).sum() + (F.layer_norm(s_ref, (24,), ref[2], ref[3]) * dy).sum()).backward()
    for name, got, want in zip(("residual", "x", "weight", "bias"), leaves, ref):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")

    xl = x.float().requires_grad_()
    y, mean, rstd = torch.ops.gptkernels.layer_norm_fwd(xl, None, None, 1e-5)
    assert not mean.requires_grad and not rstd.requires_grad
    y.backward(dy.float())
    xr = x.clone().requires_grad_()
    F.layer_norm(xr, (24,)).backward(dy)
    torch.testing.assert_close(xl.grad.double(), xr.grad, atol=1e-4, rtol=1e-4)


def test_compile_fullgraph_cpu():
    ln = torch.compile(lambda x, w, b: GF.layer_norm(x, (32,), w, b), fullgraph=True, backend="aot_eager")
    add_ln = torch.compile(lambda r, x, w, b: GF.add_layer_norm(r, x, w, b), fullgraph=True, backend="aot_eager")
    x, r, w, b = torch.randn(4, 32), torch.randn(4, 32), torch.randn(32), torch.randn(32)
    torch.testing.assert_close(ln(x, w, b), F.layer_norm(x, (32,), w, b))
    s, y = add_ln(r, x, w, b)
    torch.testing.assert_close(s, r + x)
    torch.testing.assert_close(y, F.layer_norm(r + x, (32,), w, b))


@needs_ext
def test_compile_fullgraph_ops_cpu():
    """The op with its fake implementation and autograd traces whole (the kernel path's graph)."""
    def f(r, x, w, b):
        s, y, _, _ = torch.ops.gptkernels.add_layer_norm_fwd(r, x, w, b, 1e-5)
        z, _, _ = torch.ops.gptkernels.layer_norm_fwd(y, w, None, 1e-5)
        return s, z
    g = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [torch.randn(3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True),
            torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)]
    s, z = g(*args)
    (s.sum() + (z * z).sum()).backward()
    ref = [a.detach().clone().requires_grad_() for a in args]
    s2, z2 = f(*ref)
    (s2.sum() + (z2 * z2).sum()).backward()
    torch.testing.assert_close(z, z2)
    for a, a2 in zip(args, ref):
        torch.testing.assert_close(a.grad, a2.grad)


# ---- Python API ----------------------------------------------------------------------------

def test_functional_cpu_matches_torch():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    w = torch.randn(4, 5, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)
    y = GF.layer_norm(x, (4, 5), w, b, eps=1e-6)
    torch.testing.assert_close(y, F.layer_norm(x, (4, 5), w, b, eps=1e-6))
    torch.testing.assert_close(GF.layer_norm(x, 5), F.layer_norm(x, (5,)))


@needs_ext
@pytest.mark.parametrize("cols,dtype,expect", [(768, torch.bfloat16, "kernel"), (1, torch.float32, "kernel"),
                                               (None, torch.bfloat16, "torch"), (768, torch.float64, "torch")])
def test_which_function_runs_on_a_gpu(cols, dtype, expect):
    """Rows wider than the kernels take (or float64) run torch's F.layer_norm on a GPU; the CPU runs
    the reference."""
    cols = cols or ln_ops.LIMITS["max_cols"] + 8
    x = torch.zeros(2, cols, dtype=dtype)
    path = _backend.decide(True, ln_ops._unsupported(x, cols), mode="auto", ext_loaded=True)
    assert path == expect
    assert ln_ops.LAYER_NORM["torch"] is F.layer_norm
    assert _backend.decide(False, ln_ops._unsupported(x, cols), mode="auto", ext_loaded=True) == "reference"


def test_torch_path_matches_reference():
    """What runs off the kernel (F.layer_norm) agrees with the math reference, also in gradients
    (the reference's written-out backward)."""
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(24, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 5, 24, dtype=torch.float64)
    s, y = ln_ops.ADD_LAYER_NORM["torch"](r, x, w, b, 1e-5)
    s_r, y_r, mean, rstd = ln_ops.add_layer_norm_fwd_ref(r, x.detach(), w.detach(), b.detach(), 1e-5)
    torch.testing.assert_close(s, s_r)
    torch.testing.assert_close(y, y_r)
    dy = torch.randn_like(y)
    y.backward(dy)
    dx, dw, db = ln_ops.layer_norm_bwd_ref(dy, s_r, w.detach(), mean, rstd)
    for got, want in ((x.grad, dx), (w.grad, dw), (b.grad, db)):
        torch.testing.assert_close(got, want)
    assert ln_ops.LAYER_NORM["torch"] is F.layer_norm


def test_add_layer_norm_mixed_dtypes_promote():
    r = torch.randn(3, 8)  # fp32 residual stream, bf16 branch output (autocast)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    w, b = torch.randn(8), torch.randn(8)
    s, y = GF.add_layer_norm(r, x, w, b)
    assert s.dtype == y.dtype == torch.float32
    torch.testing.assert_close(s, r + x)
    torch.testing.assert_close(y, F.layer_norm(r + x, (8,), w, b))


def test_layernorm_module_state_dict_both_ways():
    for kw in ({}, {"elementwise_affine": False}, {"bias": False}):
        ours, theirs = LayerNorm((6, 8), eps=1e-6, **kw), torch.nn.LayerNorm((6, 8), eps=1e-6, **kw)
        assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_()
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(3, 6, 8)
        torch.testing.assert_close(ours(x), theirs(x))
        theirs2 = torch.nn.LayerNorm((6, 8), eps=1e-6, **kw)
        theirs2.load_state_dict(ours.state_dict())
        torch.testing.assert_close(theirs2(x), theirs(x))


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight has dtype"):
        GF.layer_norm(x, (8,), torch.randn(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="normalized_shape"):
        GF.layer_norm(x, (7,))
    with pytest.raises(ValueError, match="normalized_shape"):
        GF.layer_norm(x, (2, 4, 8))
    with pytest.raises(ValueError, match="weight: expected shape"):
        GF.layer_norm(x, (8,), torch.randn(7))
    with pytest.raises(ValueError, match="x: expected dtype"):
        GF.layer_norm(torch.ones(4, 8, dtype=torch.int64), (8,))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        GF.layer_norm([1.0, 2.0], (2,))
    with pytest.raises(ValueError, match="x: expected the shape of residual"):
        GF.add_layer_norm(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match="bias has dtype"):
        GF.add_layer_norm(x, x, torch.randn(8), torch.randn(8, dtype=torch.float16))


def test_kernel_mode_on_cpu_raises():
    with gptkernels.backend("kernel"), pytest.raises(RuntimeError, match="CUDA tensors"):
        GF.layer_norm(torch.randn(2, 4), (4,))


# ---- CUDA kernels --------------------------------------------------------------------------

def _ref64(x, w, b, eps=1e-5):
    return ln_ops.layer_norm_fwd_ref(x.double(), None if w is None else w.double(), None if b is None else b.double(),
                                     eps)


def _poison_allocator(nbytes):
    """Fill the caching allocator's next blocks with NaN, so an output element the kernel does not
    write reads as NaN (the ops allocate their own outputs)."""
    t = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
    del t


def _check_forward(x, w, b, y, mean, rstd, eps=1e-5, s=None):
    rows_shape, c = x.shape[:-1], x.shape[-1]
    y_ref, mean_ref, rstd_ref = _ref64(x, w, b, eps)
    tol = reduction_tol(x.dtype, c)
    err = (y.double() - y_ref).abs()
    bound = tol * (1 + y_ref.abs())
    assert not y.isnan().any(), "y: NaN (an element was not written)"
    assert (err <= bound).all(), f"y: max error {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3g}"
    t32 = reduction_tol(torch.float32, c)
    scale = (x.double() - mean_ref.unsqueeze(-1)).abs().amax(-1) + 1e-30
    assert mean.shape == rstd.shape == rows_shape and mean.dtype == rstd.dtype == torch.float32
    assert ((mean.double() - mean_ref).abs() <= t32 * scale + 2 * 2.0**-24 * mean_ref.abs()).all(), "mean"
    assert ((rstd.double() - rstd_ref).abs() <= 4 * t32 * rstd_ref).all(), "rstd"


def _check_backward(dy, x, w, mean, rstd, dx, dw, db, ds=None, has_bias=True):
    c = x.shape[-1]
    rows = x.numel() // c
    m, r = mean.double(), rstd.double()
    dx_ref, dw_ref, db_ref = ln_ops.layer_norm_bwd_ref(dy.double(), x.double(), None if w is None else w.double(), m, r,
                                                       None if ds is None else ds.double())
    xhat = (x.double() - m.unsqueeze(-1)) * r.unsqueeze(-1)
    g = dy.double() * (w.double() if w is not None else 1)
    bound = r.unsqueeze(-1) * (g.abs() + g.mean(-1, keepdim=True).abs()
                               + xhat.abs() * (g * xhat).mean(-1, keepdim=True).abs())
    if ds is not None:
        bound = bound + ds.double().abs()
    tol = reduction_tol(x.dtype, c)
    err = (dx.double() - dx_ref).abs()
    lim = tol * bound + UNIT_ROUNDOFF[x.dtype] * dx_ref.abs() + UNDERFLOW[x.dtype]
    assert not dx.isnan().any(), "dx: NaN"
    assert (err <= lim).all(), f"dx: max error {err.max().item():.3g}, worst ratio {(err / lim).max().item():.3g}"
    tr = reduction_tol(x.dtype, rows)
    d2 = dy.double().reshape(-1, c)
    if w is not None:
        scale = (d2 * xhat.reshape(-1, c)).abs().sum(0)
        assert dw.dtype == w.dtype and dw.shape == w.shape
        assert ((dw.double() - dw_ref).abs() <= tr * scale + UNDERFLOW[x.dtype]).all(), "dweight"
    else:
        assert dw.numel() == 0
    if has_bias:
        assert ((db.double() - db_ref).abs() <= tr * d2.abs().sum(0) + UNDERFLOW[x.dtype]).all(), "dbias"
    else:
        assert db.numel() == 0


SHAPES = [(1, 1), (3, 7), (1000, 768), (65536, 768), (17, 1000), (3, 1023), (1000, 1023), (64, 4096), (5, 12288),
          (2, 16384), (65536, 7), (1, 4096)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_fp64_reference(shape, dtype):
    rows, c = shape
    x = torch.randn(rows, c, device="cuda", dtype=dtype)
    w = (1 + 0.5 * torch.randn(c, device="cuda")).to(dtype)
    b = torch.randn(c, device="cuda", dtype=dtype)
    _poison_allocator(2 * x.numel() * x.element_size())
    y, mean, rstd = torch.ops.gptkernels.layer_norm_fwd(x, w, b, 1e-5)
    _check_forward(x, w, b, y, mean, rstd)
    dy = torch.randn_like(x)
    _poison_allocator(2 * x.numel() * x.element_size())
    dx, dw, db = torch.ops.gptkernels.layer_norm_bwd(dy, x, w, mean, rstd, True, None)
    _check_backward(dy, x, w, mean, rstd, dx, dw, db)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", ["w", "b", "none"])
@pytest.mark.parametrize("shape", [(37, 768), (9, 1023), (8, 4096)])
def test_kernel_optional_affine(shape, affine, dtype):
    rows, c = shape
    x = torch.randn(rows, c, device="cuda", dtype=dtype)
    w = torch.randn(c, device="cuda", dtype=dtype) if affine == "w" else None
    b = torch.randn(c, device="cuda", dtype=dtype) if affine == "b" else None
    y, mean, rstd = torch.ops.gptkernels.layer_norm_fwd(x, w, b, 1e-5)
    _check_forward(x, w, b, y, mean, rstd)
    dy = torch.randn_like(x)
    dx, dw, db = torch.ops.gptkernels.layer_norm_bwd(dy, x, w, mean, rstd, b is not None, None)
    _check_backward(dy, x, w, mean, rstd, dx, dw, db, has_bias=b is not None)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (1000, 768), (17, 1000), (3, 1023), (64, 4096), (5, 12288)])
def test_add_layer_norm_kernel(shape, dtype):
    rows, c = shape
    r = torch.randn(rows, c, device="cuda", dtype=dtype)
    x = torch.randn(rows, c, device="cuda", dtype=dtype)
    w = (1 + 0.5 * torch.randn(c, device="cuda")).to(dtype)
    b = torch.randn(c, device="cuda", dtype=dtype)
    _poison_allocator(3 * x.numel() * x.element_size())
    s, y, mean, rstd = torch.ops.gptkernels.add_layer_norm_fwd(r, x, w, b, 1e-5)
    assert torch.equal(s, r + x), "s must be residual + x rounded once to the storage type"
    _check_forward(s, w, b, y, mean, rstd)
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    dx, dw, db = torch.ops.gptkernels.layer_norm_bwd(dy, s, w, mean, rstd, True, ds)
    _check_backward(dy, s, w, mean, rstd, dx, dw, db, ds=ds)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_misaligned_rows_take_general_path(dtype):
    """cols % 8 == 0 but the tensors start off a 16-byte boundary: the general path."""
    rows, c = 33, 768
    buf = torch.randn(rows * c + 1, device="cuda", dtype=dtype)
    x = buf[1:].view(rows, c)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    y, mean, rstd = torch.ops.gptkernels.layer_norm_fwd(x, None, None, 1e-5)
    _check_forward(x, None, None, y, mean, rstd)
    dyb = torch.randn(rows * c + 1, device="cuda", dtype=dtype)
    dy = dyb[1:].view(rows, c)
    dx, dw, db = torch.ops.gptkernels.layer_norm_bwd(dy, x, None, mean, rstd, True, None)
    _check_backward(dy, x, None, mean, rstd, dx, dw, db)


@pytest.mark.cuda
@pytest.mark.parametrize("c", [768, 4096])
def test_kernel_large_mean_offset(c):
    """1e4 + randn in fp32 (and 100 + randn in bf16): the statistics keep full precision. The
    forward is compared with float64 math on the same inputs at the usual tolerance."""
    for dtype, offset in ((torch.float32, 1e4), (torch.bfloat16, 100.0)):
        x = (offset + torch.randn(256, c, device="cuda")).to(dtype)
        w = torch.randn(c, device="cuda", dtype=dtype)
        y, mean, rstd = torch.ops.gptkernels.layer_norm_fwd(x, w, None, 1e-5)
        _check_forward(x, w, None, y, mean, rstd)
        dy = torch.randn_like(x)
        dx, dw, db = torch.ops.gptkernels.layer_norm_bwd(dy, x, w, mean, rstd, True, None)
        _check_backward(dy, x, w, mean, rstd, dx, dw, db)


@pytest.mark.cuda
def test_kernel_zero_rows():
    x = torch.empty(0, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    y, mean, rstd = torch.ops.gptkernels.layer_norm_fwd(x, w, w, 1e-5)
    assert y.shape == (0, 64) and mean.shape == (0,)
    dx, dw, db = torch.ops.gptkernels.layer_norm_bwd(x, x, w, mean, rstd, True, None)
    assert dx.shape == (0, 64) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(w))


@pytest.mark.cuda
def test_kernel_param_grads_deterministic():
    x = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    _, mean, rstd = torch.ops.gptkernels.layer_norm_fwd(x, w, w, 1e-5)
    a = torch.ops.gptkernels.layer_norm_bwd(dy, x, w, mean, rstd, True, None)
    b = torch.ops.gptkernels.layer_norm_bwd(dy, x, w, mean, rstd, True, None)
    for t, u in zip(a, b):
        assert torch.equal(t, u)


@pytest.mark.cuda
def test_kernel_int64_indexing():
    """More than 2^31 elements: rows past the 32-bit boundary are normalised correctly."""
    c = 1024
    rows = 2**31 // c + 3
    x = torch.randn(rows, c, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(c, device="cuda", dtype=torch.bfloat16)
    y, mean, rstd = torch.ops.gptkernels.layer_norm_fwd(x, w, None, 1e-5)
    pick = torch.tensor([0, rows // 2, rows - 4, rows - 1], device="cuda")
    _check_forward(x[pick], w, None, y[pick], mean[pick], rstd[pick])
    del y
    dy = torch.randn_like(x)
    dx, dw, _ = torch.ops.gptkernels.layer_norm_bwd(dy, x, w, mean, rstd, False, None)
    dx_ref, _, _ = ln_ops.layer_norm_bwd_ref(dy[pick].double(), x[pick].double(), w.double(), mean[pick].double(),
                                             rstd[pick].double())
    torch.testing.assert_close(dx[pick].double(), dx_ref, atol=0.05, rtol=0.02)
    assert dw.isfinite().all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_functional_autograd_cuda(dtype):
    """gptkernels.nn.functional on the kernel path: outputs and every gradient against float64
    torch autograd; a non-contiguous input; a 2-D normalized_shape."""
    x = torch.randn(48, 4, 96, device="cuda", dtype=dtype).transpose(0, 1).requires_grad_()  # non-contiguous
    w = (1 + 0.3 * torch.randn(96, device="cuda")).to(dtype).requires_grad_()
    b = torch.randn(96, device="cuda", dtype=dtype).requires_grad_()
    with gptkernels.backend("kernel"):
        y = GF.layer_norm(x, (96,), w, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.layer_norm(x64, (96,), w64, b64)
    y64.backward(dy.double())
    tol = 4 * reduction_tol(dtype, 96)
    torch.testing.assert_close(y.double(), y64, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=tol * 4, rtol=tol)
    tr = reduction_tol(dtype, 192) * 4
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=tr * w64.grad.abs().max().item() + tr, rtol=tr)
    torch.testing.assert_close(b.grad.double(), b64.grad, atol=tr * b64.grad.abs().max().item() + tr, rtol=tr)

    x2 = torch.randn(8, 6, 64, device="cuda", dtype=dtype)
    w2 = torch.randn(6, 64, device="cuda", dtype=dtype)
    with gptkernels.backend("kernel"):
        y2 = GF.layer_norm(x2, (6, 64), w2, None)
    torch.testing.assert_close(y2.double(), F.layer_norm(x2.double(), (6, 64), w2.double()), atol=tol, rtol=tol)


@pytest.mark.cuda
def test_add_layer_norm_autograd_cuda():
    dtype = torch.bfloat16
    leaves = [torch.randn(64, 768, device="cuda", dtype=dtype).requires_grad_() for _ in range(2)] + [
        (1 + 0.3 * torch.randn(768, device="cuda")).to(dtype).requires_grad_(),
        torch.randn(768, device="cuda", dtype=dtype).requires_grad_()]
    with gptkernels.backend("kernel"):
        s, y = GF.add_layer_norm(*leaves)
    ds, dy = torch.randn_like(s), torch.randn_like(y)
    ((s.float() * ds.float()).sum() + (y.float() * dy.float()).sum()).backward()
    ref = [t.detach().double().requires_grad_() for t in leaves]
    s64 = (ref[0] + ref[1]).to(dtype).double()  # s rounded to bf16, as the kernel stores it
    y64 = F.layer_norm(s64, (768,), ref[2], ref[3])
    ((s64 * ds.double()).sum() + (y64 * dy.double()).sum()).backward()
    tol = 4 * reduction_tol(dtype, 768)
    torch.testing.assert_close(y.double(), y64, atol=tol, rtol=tol)
    torch.testing.assert_close(leaves[0].grad.double(), ref[0].grad, atol=4 * tol, rtol=tol)
    torch.testing.assert_close(leaves[1].grad.double(), ref[1].grad, atol=4 * tol, rtol=tol)
    tr = 4 * reduction_tol(dtype, 64)
    for got, want in zip(leaves[2:], ref[2:]):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=tr * want.grad.abs().max().item(), rtol=tr)


@pytest.mark.cuda
def test_module_cuda_matches_torch():
    ours = LayerNorm(1024, device="cuda", dtype=torch.bfloat16)
    theirs = torch.nn.LayerNorm(1024, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict({k: v.to(torch.bfloat16) for k, v in theirs.state_dict().items()})
    theirs.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(4, 100, 1024, device="cuda", dtype=torch.bfloat16)
    with gptkernels.backend("kernel"):
        y = ours(x)
    tol = 4 * reduction_tol(torch.bfloat16, 1024)
    torch.testing.assert_close(y.double(), theirs(x.double()), atol=tol * 8, rtol=tol)


@pytest.mark.cuda
def test_opcheck_cuda():
    x = torch.randn(6, 40, device="cuda", requires_grad=True)
    r = torch.randn(6, 40, device="cuda", requires_grad=True)
    w = torch.randn(40, device="cuda", requires_grad=True)
    b = torch.randn(40, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.gptkernels.layer_norm_fwd, (x, w, b, 1e-5))
    torch.library.opcheck(torch.ops.gptkernels.layer_norm_fwd, (x, None, None, 1e-5))
    torch.library.opcheck(torch.ops.gptkernels.add_layer_norm_fwd, (r, x, w, b, 1e-5))
    _, mean, rstd = torch.ops.gptkernels.layer_norm_fwd(x.detach(), None, None, 1e-5)
    torch.library.opcheck(torch.ops.gptkernels.layer_norm_bwd,
                          (torch.randn(6, 40, device="cuda"), x.detach(), w.detach(), mean, rstd, True,
                           torch.randn(6, 40, device="cuda")))


@pytest.mark.cuda
def test_compile_fullgraph_cuda():
    f = torch.compile(lambda r, x, w, b: GF.add_layer_norm(r, x, w, b), fullgraph=True)
    r, x = (torch.randn(128, 768, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w, b = (torch.randn(768, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    s, y = f(r, x, w, b)
    assert torch.equal(s, r + x)
    _check_forward(s, w, b, y, *torch.ops.gptkernels.layer_norm_fwd(s, w, b, 1e-5)[1:])


@pytest.mark.cuda
def test_bad_input_cuda():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu"):
        GF.layer_norm(x, (8,), torch.randn(8))
    with pytest.raises(ValueError, match="x is on"):
        GF.add_layer_norm(x, torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="weight has dtype"):  # the binding double-checks
        torch.ops.gptkernels.layer_norm_fwd(x, torch.randn(8, device="cuda", dtype=torch.float16), None, 1e-5)
    wide = ln_ops.LIMITS["max_cols"] + 1
    with pytest.raises(RuntimeError, match=f"normalized size {wide} is outside"):  # layernorm_limits.h
        torch.ops.gptkernels.layer_norm_fwd(torch.randn(2, wide, device="cuda"), None, None, 1e-5)


@pytest.mark.cuda
def test_wide_rows_fall_back_to_torch():
    x = torch.randn(3, 20000, device="cuda")
    with pytest.warns(UserWarning, match="outside the kernel's range"):
        y = GF.layer_norm(x, (20000,))
    torch.testing.assert_close(y, F.layer_norm(x, (20000,)))
    with gptkernels.backend("kernel"), pytest.raises(ValueError, match="outside the kernel's range"):
        GF.layer_norm(x, (20000,))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_small_shapes_for_sanitize(dtype):
    """Tiny calls through every kernel configuration (units per thread 1..4, one warp and
    multi-warp rows, vectorised and general paths, with and without residual / weight / bias /
    ds), for compute-sanitizer (device_check.sh --sanitize)."""
    for rows, c in [(1, 1), (3, 7), (2, 8), (5, 64), (3, 200), (2, 768), (2, 1000), (3, 1023), (2, 1032), (2, 4104),
                    (1, 16384)]:
        x = torch.randn(rows, c, device="cuda", dtype=dtype)
        r = torch.randn_like(x)
        w = torch.randn(c, device="cuda", dtype=dtype)
        b = torch.randn(c, device="cuda", dtype=dtype)
        y, mean, rstd = torch.ops.gptkernels.layer_norm_fwd(x, w, b, 1e-5)
        _check_forward(x, w, b, y, mean, rstd)
        s, y2, mean2, rstd2 = torch.ops.gptkernels.add_layer_norm_fwd(r, x, None, b, 1e-5)
        _check_forward(s, None, b, y2, mean2, rstd2)
        dy = torch.randn_like(x)
        dx, dw, db = torch.ops.gptkernels.layer_norm_bwd(dy, x, w, mean, rstd, True, r)
        _check_backward(dy, x, w, mean, rstd, dx, dw, db, ds=r)
        dx, dw, db = torch.ops.gptkernels.layer_norm_bwd(dy, s, None, mean2, rstd2, False, None)
        _check_backward(dy, s, None, mean2, rstd2, dx, dw, db, has_bias=False)
