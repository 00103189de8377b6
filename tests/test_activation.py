"""bias + GELU/ReLU: reference math, op registration, and the CUDA kernel against fp32."""
import pytest
import torch
import torch.nn.functional as F

import gptkernels
from gptkernels import _backend
from gptkernels.nn import functional as GF
from gptkernels.ops import activation as act_ops
from helpers import assert_close, elementwise_tol, poison, reduction_tol

ACTS = ["gelu_tanh", "gelu", "relu"]
TORCH_ACT = {"gelu_tanh": lambda u: F.gelu(u, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}


@pytest.mark.parametrize("act", ACTS)
def test_reference_grad_formula_matches_autograd(act):
    x = torch.randn(33, 17, dtype=torch.float64)
    b = torch.randn(17, dtype=torch.float64)
    dy = torch.randn_like(x)
    xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
    TORCH_ACT[act](xr + br).backward(dy)
    dx, db = act_ops.bias_act_bwd_ref(dy, x, b, act)  # fp32 math by design
    torch.testing.assert_close(dx, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(db, br.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("act", ACTS)
def test_functional_cpu_matches_torch(act):
    x = torch.randn(5, 3, 12, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    fn = {"gelu_tanh": lambda: GF.bias_gelu(x, b), "gelu": lambda: GF.bias_gelu(x, b, approximate="none"),
          "relu": lambda: GF.bias_relu(x, b)}[act]
    y = fn()
    y_ref = TORCH_ACT[act](x + b)
    torch.testing.assert_close(y, y_ref)


@pytest.mark.skipif(not _backend.EXT_LOADED, reason="extension not built")
def test_which_function_runs_on_a_gpu():
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert _backend.decide(True, act_ops._unsupported(x), mode="auto", ext_loaded=True) == "kernel"
    assert _backend.decide(True, None, mode="auto", ext_loaded=False) == "torch"
    assert act_ops.BIAS_ACT["torch"] is act_ops._bias_act_torch
    assert _backend.decide(False, act_ops._unsupported(x), mode="auto", ext_loaded=True) == "reference"


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu", "relu"])
def test_torch_path_matches_reference(act):
    x, b = torch.randn(5, 24), torch.randn(24)  # the reference computes in fp32
    torch.testing.assert_close(act_ops.BIAS_ACT["torch"](x, b, act), act_ops.BIAS_ACT["reference"](x, b, act))


def test_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bias: expected shape"):
        GF.bias_gelu(x, torch.randn(7))
    with pytest.raises(ValueError, match="bias has dtype"):
        GF.bias_gelu(x, torch.randn(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="approximate"):
        GF.bias_gelu(x, torch.randn(8), approximate="fast")
    with pytest.raises(ValueError, match="x: expected dtype"):
        GF.bias_relu(torch.ones(4, 8, dtype=torch.int32), torch.randn(8))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        GF.bias_relu([1.0], torch.randn(1))


@pytest.mark.skipif(not _backend.EXT_LOADED, reason="extension not built")
@pytest.mark.parametrize("act", ACTS)
def test_opcheck_cpu(act):
    x = torch.randn(6, 10, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    torch.library.opcheck(torch.ops.gptkernels.bias_act_fwd, (x, b, act))
    torch.library.opcheck(torch.ops.gptkernels.bias_act_bwd, (torch.randn(6, 10), x.detach(), b.detach(), act))


def test_compile_fullgraph_cpu():
    f = torch.compile(lambda x, b: GF.bias_gelu(x, b), fullgraph=True, backend="aot_eager")
    x, b = torch.randn(4, 16), torch.randn(16)
    torch.testing.assert_close(f(x, b), F.gelu(x + b, approximate="tanh"))


# ---- CUDA kernel ---------------------------------------------------------------------------

SHAPES = [(1, 1), (3, 7), (1000, 768), (65536, 1000), (17, 4096), (5, 12288), (2, 3072)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ACTS)
def test_kernel_matches_fp32_reference(act, shape, dtype):
    rows, cols = shape
    x = torch.randn(rows, cols, device="cuda", dtype=dtype)
    b = torch.randn(cols, device="cuda", dtype=dtype)
    dy = torch.randn_like(x)
    y = torch.ops.gptkernels.bias_act_fwd(x, b, act)
    dx, db = torch.ops.gptkernels.bias_act_bwd(dy, x, b, act)
    y_ref = act_ops.bias_act_fwd_ref(x.float(), b.float(), act)
    dx_ref, db_ref = act_ops.bias_act_bwd_ref(dy.float(), x.float(), b.float(), act)
    atol, rtol = elementwise_tol(dtype)
    assert_close(y, y_ref, atol, rtol, "y")
    assert_close(dx, dx_ref, atol, rtol, "dx")
    scale = dx_ref.abs().sum(0).max().item() + 1e-6  # tolerance relative to the summed magnitudes
    assert_close(db, db_ref, reduction_tol(dtype, rows) * scale, reduction_tol(dtype, rows), "dbias")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(37, 1000), (5, 1003), (4096, 3072)])
def test_kernel_writes_every_element(shape):
    """The ops allocate their outputs: fill the caching allocator's free blocks with NaN first, so
    an element the kernel does not write reads back as NaN."""
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(shape[1], device="cuda", dtype=torch.bfloat16)
    poison(torch.empty(4 * x.numel() + 4096, device="cuda"))  # freed at once, reused by the op
    y = torch.ops.gptkernels.bias_act_fwd(x, b, "gelu_tanh")
    assert not y.isnan().any()
    poison(torch.empty(4 * x.numel() + 4096, device="cuda"))
    dx, db = torch.ops.gptkernels.bias_act_bwd(torch.randn_like(x), x, b, "gelu_tanh")
    assert not dx.isnan().any() and not db.isnan().any()


@pytest.mark.cuda
@pytest.mark.parametrize("act", ACTS)
def test_functional_autograd_cuda(act):
    x = torch.randn(64, 3, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with gptkernels.backend("kernel"):
        y = GF.bias_relu(x, b) if act == "relu" else GF.bias_gelu(x, b, "tanh" if act == "gelu_tanh" else "none")
    dy = torch.randn_like(y)
    y.backward(dy)
    dx_ref, db_ref = act_ops.bias_act_bwd_ref(dy.float(), x.detach().float(), b.detach().float(), act)
    atol, rtol = elementwise_tol(torch.bfloat16)
    assert_close(x.grad, dx_ref, atol, rtol, "x.grad")
    assert_close(b.grad, db_ref, 0.05 * db_ref.abs().max().item(), 0.02, "b.grad")


@pytest.mark.cuda
def test_noncontiguous_and_opcheck_cuda():
    x = torch.randn(512, 64, device="cuda", dtype=torch.float16).t()  # non-contiguous
    b = torch.randn(512, device="cuda", dtype=torch.float16)
    with gptkernels.backend("kernel"):
        y = GF.bias_gelu(x, b)
    assert_close(y, act_ops.bias_act_fwd_ref(x.float(), b.float(), "gelu_tanh"), *elementwise_tol(torch.float16))
    torch.library.opcheck(torch.ops.gptkernels.bias_act_fwd,
                          (x.contiguous().requires_grad_(), b.clone().requires_grad_(), "gelu_tanh"))


@pytest.mark.cuda
def test_compile_fullgraph_cuda():
    f = torch.compile(lambda x, b: GF.bias_gelu(x, b), fullgraph=True)
    x = torch.randn(128, 768, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    assert_close(f(x, b), act_ops.bias_act_fwd_ref(x.float(), b.float(), "gelu_tanh"),
                 *elementwise_tol(torch.bfloat16))


@pytest.mark.cuda
def test_cpu_cuda_mix_raises():
    with pytest.raises(ValueError, match="bias is on cpu"):
        GF.bias_gelu(torch.randn(4, 8, device="cuda"), torch.randn(8))


@pytest.mark.cuda
@pytest.mark.parametrize("act", ACTS)
def test_small_shapes_for_sanitize(act):
    """Tiny calls through the vectorised and scalar paths of both kernels, for compute-sanitizer."""
    for dtype in (torch.bfloat16, torch.float32):
        for rows, cols in [(1, 1), (3, 7), (2, 8), (70, 16), (5, 1003)]:
            x = torch.randn(rows, cols, device="cuda", dtype=dtype)
            b = torch.randn(cols, device="cuda", dtype=dtype)
            y = torch.ops.gptkernels.bias_act_fwd(x, b, act)
            dx, db = torch.ops.gptkernels.bias_act_bwd(torch.ones_like(x), x, b, act)
            atol, rtol = elementwise_tol(dtype)
            assert_close(y, act_ops.bias_act_fwd_ref(x.float(), b.float(), act), atol, rtol, "y")
            assert_close(db, act_ops.bias_act_bwd_ref(torch.ones_like(x).float(), x.float(), b.float(), act)[1],
                         0.05, 0.02, "dbias")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gelu_extreme_inputs(dtype):
    """GELU saturates exactly: -0 for very negative inputs, u for very positive ones (the bf16/fp16
    path uses the sigmoid form u / (1 + e^-2z), which must not leave a tiny residue)."""
    big = torch.finfo(dtype).max / 2
    vals = [-big, -1e4, -100.0, -50.0, -10.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 10.0, 100.0, 1e4, big]
    x = torch.tensor(vals, device="cuda").to(dtype).repeat(64, 1)
    b = torch.zeros(x.shape[1], device="cuda", dtype=dtype)
    for act in ("gelu_tanh", "gelu"):
        y = torch.ops.gptkernels.bias_act_fwd(x, b, act)
        assert_close(y, act_ops.bias_act_fwd_ref(x.float(), b.float(), act), *elementwise_tol(dtype), act)


@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (2, 3, 4)])
def test_reference_backward_any_rows_and_empty(shape):
    """dbias sums over every leading dimension, also when a dimension is empty."""
    x, dy = torch.randn(shape), torch.randn(shape)
    b = torch.randn(shape[-1])
    dx, db = act_ops.bias_act_bwd_ref(dy, x, b, "relu")
    assert dx.shape == x.shape and db.shape == b.shape
    torch.testing.assert_close(db, (dy * (x + b > 0)).reshape(-1, shape[-1]).sum(0) if x.numel() else torch.zeros_like(b))
