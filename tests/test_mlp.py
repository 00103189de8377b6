"""Fused linear layers and the feed-forward block: reference math, op registration, autocast, the
cuBLASLt path against float32 references."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn


import gptkernels
from gptkernels import _backend
from gptkernels._selftest import rule
from gptkernels.nn import FusedMLP
from gptkernels.nn import functional as GF

from gptkernels.ops import mlp as mlp_ops
ACTS = ["gelu_tanh", "gelu", "relu"]
TORCH_ACT = {"gelu_tanh": lambda u: F.gelu(u, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}
ops = torch.ops.gptkernels if _backend.EXT_LOADED else None
needs_ext = pytest.mark.skipif(not _backend.EXT_LOADED, reason="extension not built")


def torch_mlp(x, w1, b1, w2, b2, act):
    return F.linear(TORCH_ACT[act](F.linear(x, w1, b1)), w2, b2)


def make_params(c, h, o, dtype=torch.float32, device="cpu", bias=True, scale=1.0):
    g = lambda *s: (torch.randn(*s, device=device) * scale).to(dtype).requires_grad_()  # noqa: E731
    w1, w2 = g(h, c) / c**0.5, g(o, h) / h**0.5
    w1, w2 = w1.detach().requires_grad_(), w2.detach().requires_grad_()
    return w1, (g(h) if bias else None), w2, (g(o) if bias else None)


def grads(out, dy, tensors):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], dy)


# ---- CPU: the ops' reference implementations against torch autograd -----------------------

@needs_ext
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("hidden", [128, 40])  # 128: the ReLU bit-mask layout; 40: no mask
def test_mlp_op_cpu_matches_torch(act, bias, hidden):
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    w1, b1, w2, b2 = make_params(16, hidden, 8, torch.float64, bias=bias)
    y, pre, h = ops.mlp_fwd(x, w1, b1, w2, b2, act, True)
    y_ref = torch_mlp(x, w1, b1, w2, b2, act)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)  # the references' activation math is fp32
    if act == "relu":
        assert pre.dtype == (torch.uint8 if hidden % 128 == 0 else torch.float64)
    dy = torch.randn_like(y)
    got = grads(y, dy, [x, w1, b1, w2, b2])
    want = grads(y_ref, dy, [x, w1, b1, w2, b2])
    for g, r, name in zip(got, want, ["dx", "dw1", "db1", "dw2", "db2"]):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@needs_ext
@pytest.mark.parametrize("act", ACTS + ["none"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_act_op_cpu_matches_torch(act, bias):
    x = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 24, dtype=torch.float64, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, requires_grad=True) if bias else None
    y, _aux = ops.linear_act_fwd(x.reshape(-1, 24), w, b, act, True)
    u = F.linear(x, w, b)
    y_ref = u if act == "none" else TORCH_ACT[act](u)
    torch.testing.assert_close(y.reshape(2, 3, 16), y_ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(y_ref)
    got = grads(y.reshape(2, 3, 16), dy, [x, w, b])
    want = grads(y_ref, dy, [x, w, b])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_relu_mask_reference_layout():
    u = torch.tensor([[1.0, -1, 0, 2, -3, 4, 5, -6] * 16])
    m = mlp_ops._relu_mask_ref(u)
    assert m.shape == (1, 16) and m.dtype == torch.uint8
    assert int(m[0, 0]) == 1 + 8 + 32 + 64  # bits 0, 3, 5, 6 set (LSB first)


@pytest.mark.parametrize("act", ACTS)
def test_fused_mlp_module_cpu_matches_torch(act):
    m = FusedMLP(24, 96, activation=act)
    ref = nn.Sequential(nn.Linear(24, 96), nn.GELU("tanh") if act == "gelu_tanh" else
                        (nn.GELU() if act == "gelu" else nn.ReLU()), nn.Linear(96, 24))
    ref.load_state_dict({k.replace("fc.", "0.").replace("proj.", "2."): v for k, v in m.state_dict().items()})
    x = torch.randn(3, 5, 24, requires_grad=True)
    y, y_ref = m(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    torch.testing.assert_close(grads(y, dy, [x] + list(m.parameters())), grads(y_ref, dy, [x] + list(ref.parameters())))


def test_fused_mlp_state_dict_keys_gpt2_layout():
    m = FusedMLP(32, 128, activation="gelu_tanh")
    assert set(m.state_dict()) == {"fc.weight", "fc.bias", "proj.weight", "proj.bias"}
    assert m.fc.weight.shape == (128, 32) and m.proj.weight.shape == (32, 128)
    m2 = FusedMLP(32, 128, out_features=16, bias=False, activation="relu")
    assert set(m2.state_dict()) == {"fc.weight", "proj.weight"} and m2.proj.weight.shape == (16, 128)
    assert torch.isfinite(m2(torch.randn(4, 32))).all()


def test_functional_cpu_matches_torch():
    x = torch.randn(7, 16)
    w1, b1, w2, b2 = make_params(16, 64, 16)
    torch.testing.assert_close(GF.fused_mlp(x, w1, b1, w2, b2, "gelu"), torch_mlp(x, w1, b1, w2, b2, "gelu"))
    torch.testing.assert_close(GF.linear_act(x, w1, b1, "relu"), F.relu(F.linear(x, w1, b1)))


def test_autocast_cpu_matches_torch():
    """Under autocast the block computes in the autocast dtype, as nn.Linear does, with fp32 parameters
    receiving fp32 gradients."""
    m = FusedMLP(16, 64, activation="gelu_tanh")
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y_ref = torch_mlp(x, m.fc.weight, m.fc.bias, m.proj.weight, m.proj.bias, "gelu_tanh")
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    y.float().sum().backward()
    assert m.fc.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_autocast_inputs_rule():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    assert mlp_ops.autocast_inputs(x, w, None)[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cx, cw, cb = mlp_ops.autocast_inputs(x, w, None)
    assert cx.dtype == cw.dtype == torch.bfloat16 and cb is None


def test_bad_input():
    x = torch.randn(4, 16)
    w1, b1, w2, b2 = make_params(16, 32, 16)
    with pytest.raises(ValueError, match="activation"):
        GF.fused_mlp(x, w1, b1, w2, b2, "swish")
    with pytest.raises(ValueError, match="fc_weight: expected shape"):
        GF.fused_mlp(torch.randn(4, 8), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="proj_weight: expected shape"):
        GF.fused_mlp(x, w1, b1, torch.randn(16, 31), b2)
    with pytest.raises(ValueError, match="fc_bias: expected shape"):
        GF.fused_mlp(x, w1, torch.randn(31), w2, b2)
    with pytest.raises(ValueError, match="proj_bias: expected shape"):
        GF.fused_mlp(x, w1, b1, w2, torch.randn(3))
    with pytest.raises(ValueError, match="x: expected dtype"):
        GF.fused_mlp(x.to(torch.int32), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="has dtype"):
        GF.fused_mlp(x.half(), w1, b1, w2, b2)
    with pytest.raises(ValueError, match="activation"):
        FusedMLP(8, 32, activation="none")
    with pytest.raises(ValueError, match="weight: expected shape"):
        GF.linear_act(x, torch.randn(8, 15))


@needs_ext
@pytest.mark.parametrize("dtype,feats,expect", [(torch.bfloat16, (16, 64, 16), "kernel"),
                                                (torch.bfloat16, (12, 64, 12), "torch"),
                                                (torch.float32, (16, 64, 16), "torch")])
def test_which_function_runs_on_a_gpu(dtype, feats, expect):
    x = torch.zeros(4, feats[0], dtype=dtype)
    path = _backend.decide(True, mlp_ops._unsupported(True, x, feats), mode="auto", ext_loaded=True)
    assert path == expect
    assert mlp_ops.FUSED_MLP["torch"] is mlp_ops._fused_mlp_torch
    assert mlp_ops.LINEAR_ACT["torch"] is mlp_ops.linear_act_ref


def test_unsupported_reasons():
    bf = torch.randn(2, 16, dtype=torch.bfloat16)
    assert mlp_ops._unsupported(True, bf, (16, 64, 16)) is None
    assert "multiples of 8" in mlp_ops._unsupported(True, bf, (12, 64, 12))
    assert "float32" in mlp_ops._unsupported(True, bf.float(), (16, 64, 16))
    assert "not in this build" in mlp_ops._unsupported(False, bf, (16, 64, 16))


def test_kernel_mode_on_cpu_raises():
    m = FusedMLP(8, 32)
    with gptkernels.backend("kernel"), pytest.raises(RuntimeError, match="CUDA tensors"):
        m(torch.randn(2, 8))


@needs_ext
@pytest.mark.parametrize("act", ACTS)
def test_opcheck_cpu(act):
    x = torch.randn(6, 16, requires_grad=True)
    w1, b1, w2, b2 = make_params(16, 128, 8)
    torch.library.opcheck(ops.mlp_fwd, (x, w1, b1, w2, b2, act, True))
    torch.library.opcheck(ops.mlp_fwd, (x, w1, None, w2, None, act, True))
    torch.library.opcheck(ops.mlp_fwd, (x.detach(), w1.detach(), None, w2.detach(), None, act, False))
    torch.library.opcheck(ops.linear_act_fwd, (x, w1, b1, act, True))
    y, pre, h = ops.mlp_fwd(x.detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach(), act, True)
    torch.library.opcheck(ops.mlp_bwd, (torch.randn_like(y), x.detach(), w1.detach(), b1.detach(), w2.detach(),
                                        b2.detach(), pre, h, act))


def test_compile_fullgraph_cpu():
    m = FusedMLP(16, 64, activation="gelu_tanh")
    f = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 16)
    torch.testing.assert_close(f(x), m(x))


@needs_ext
def test_compile_fullgraph_op_cpu():
    """The op itself (kernel path's graph) under torch.compile, forward and backward."""
    x = torch.randn(5, 16, requires_grad=True)
    w1, b1, w2, b2 = make_params(16, 128, 16)
    fn = lambda *a: ops.mlp_fwd(*a, "relu", True)[0].square().sum()  # noqa: E731
    f = torch.compile(fn, fullgraph=True, backend="aot_eager")
    args = (x, w1, b1, w2, b2)
    g1 = torch.autograd.grad(f(*args), args)
    g2 = torch.autograd.grad(fn(*args), args)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ---- CUDA: the cuBLASLt path -------------------------------------------------------------

def assert_within_baseline(out, ref, baseline, name, dtype):
    """FlashAttention's rule (gptkernels._selftest.rule): the kernel's error vs the fp64 reference is at
    most twice that of the same math in torch at the same low precision, plus 4 units of roundoff of
    max|ref| (for exact-zero baselines)."""
    e, bound = rule.compare(out, ref, baseline, dtype, floor_ulps=4.0)
    assert e <= bound, f"{name}: max error {e:.3g} > bound {bound:.3g} (2 x torch's error + floor)"


SHAPES = [(1, 8, 32, 8), (7, 64, 136, 64), (1000, 768, 3072, 768), (7, 2048, 8192, 2048), (33, 128, 256, 200)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_kernel_matches_reference(act, shape, dtype, bias):
    n, c, h, o = shape
    x = torch.randn(n, c, device="cuda").to(dtype).requires_grad_()
    w1, b1, w2, b2 = make_params(c, h, o, dtype, "cuda", bias)
    params = [x, w1, b1, w2, b2]
    with gptkernels.backend("kernel"):
        y = GF.fused_mlp(x, w1, b1, w2, b2, act)
    y_low = torch_mlp(x, w1, b1, w2, b2, act)  # torch at the same precision
    p64 = [None if t is None else t.detach().double().requires_grad_() for t in params]
    y64 = torch_mlp(*p64, act)
    dy = torch.randn_like(y)
    got, low, ref = grads(y, dy, params), grads(y_low, dy, params), grads(y64, dy.double(), p64)
    assert_within_baseline(y, y64, y_low, "y", dtype)
    for g, lo, r, name in zip(got, low, ref, ["dx", "dw1", "db1", "dw2", "db2"]):
        assert torch.isfinite(g).all(), name
        assert_within_baseline(g, r, lo, name, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("act", ACTS + ["none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_act_kernel_matches_reference(act, dtype):
    x = torch.randn(3, 37, 256, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(384, 256, device="cuda") / 16).to(dtype).requires_grad_()
    b = torch.randn(384, device="cuda").to(dtype).requires_grad_()
    with gptkernels.backend("kernel"):
        y = GF.linear_act(x, w, b, act)
    y_low = mlp_ops.linear_act_ref(x, w, b, act)
    p64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = mlp_ops.linear_act_ref(*p64, act)
    dy = torch.randn_like(y)
    assert_within_baseline(y, y64, y_low, "y", dtype)
    for g, lo, r, name in zip(grads(y, dy, [x, w, b]), grads(y_low, dy, [x, w, b]), grads(y64, dy.double(), p64),
                              ["dx", "dw", "db"]):
        assert_within_baseline(g, r, lo, name, dtype)


@pytest.mark.cuda
def test_mlp_autocast_cuda_uses_kernel_and_matches_torch():
    m = FusedMLP(256, 1024, activation="gelu_tanh").cuda()
    ref = nn.Sequential(nn.Linear(256, 1024), nn.GELU("tanh"), nn.Linear(1024, 256)).cuda()
    ref.load_state_dict({k.replace("fc.", "0.").replace("proj.", "2."): v for k, v in m.state_dict().items()})
    x = torch.randn(4, 50, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16), gptkernels.backend("kernel"):
        y = m(x)
        y_ref = ref(x)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=3e-2, rtol=3e-2)
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    assert m.fc.weight.grad.dtype == torch.float32
    for (k, p), q in zip(m.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, atol=3e-2 * scale, rtol=5e-2, msg=lambda s, k=k: f"{k}: {s}")


@pytest.mark.cuda
def test_mlp_no_grad_and_empty_batch_cuda():
    w1, b1, w2, b2 = make_params(64, 256, 64, torch.bfloat16, "cuda")
    x = torch.randn(9, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), gptkernels.backend("kernel"):
        y = GF.fused_mlp(x, w1, b1, w2, b2, "gelu_tanh")
    torch.testing.assert_close(y, torch_mlp(x, w1, b1, w2, b2, "gelu_tanh").detach(), atol=3e-2, rtol=3e-2)
    x0 = torch.randn(0, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with gptkernels.backend("kernel"):
        y0 = GF.fused_mlp(x0, w1, b1, w2, b2, "gelu")
    y0.sum().backward()
    assert y0.shape == (0, 64) and w1.grad.abs().sum() == 0 and b2.grad.abs().sum() == 0


@pytest.mark.cuda
def test_mlp_noncontiguous_input_and_odd_bias_view_cuda():
    x = torch.randn(64, 40, device="cuda", dtype=torch.bfloat16).t()  # [40, 64], non-contiguous
    w1, _b1, w2, b2 = make_params(64, 256, 64, torch.bfloat16, "cuda")
    big = torch.randn(257, device="cuda", dtype=torch.bfloat16)
    b1 = big[1:]  # 2-byte aligned view
    with gptkernels.backend("kernel"):
        y = GF.fused_mlp(x, w1, b1, w2, b2, "gelu_tanh")
    torch.testing.assert_close(y, torch_mlp(x, w1, b1, w2, b2, "gelu_tanh").detach(), atol=3e-2, rtol=3e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("act", ACTS)
def test_opcheck_cuda(act):
    x = torch.randn(6, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1, b1, w2, b2 = make_params(64, 256, 64, torch.bfloat16, "cuda")
    torch.library.opcheck(ops.mlp_fwd, (x, w1, b1, w2, b2, act, True))
    torch.library.opcheck(ops.linear_act_fwd, (x, w1, b1, act, True))


@pytest.mark.cuda
def test_compile_fullgraph_cuda():
    m = FusedMLP(128, 512, activation="gelu_tanh").cuda().to(torch.bfloat16)
    x = torch.randn(3, 17, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    f = torch.compile(m, fullgraph=True)
    with gptkernels.backend("kernel"):
        y = f(x)
        y.sum().backward()
        y_e = m(x)
    torch.testing.assert_close(y, y_e)


@pytest.mark.cuda
def test_unsupported_shapes_and_fp32_fall_back_cuda():
    """Feature sizes that are not multiples of 8, and float32, take torch's path in auto mode and raise
    a clear error in kernel mode."""
    _backend._warned.clear()  # the fallback warning is once per process and reason
    for c, dtype in [(12, torch.bfloat16), (64, torch.float32)]:
        w1, b1, w2, b2 = make_params(c, 4 * c, c, dtype, "cuda")
        x = torch.randn(5, c, device="cuda", dtype=dtype)
        with pytest.warns(UserWarning, match="PyTorch fallback"):
            y = GF.fused_mlp(x, w1, b1, w2, b2, "gelu")
        torch.testing.assert_close(y, torch_mlp(x, w1, b1, w2, b2, "gelu"))
        with gptkernels.backend("kernel"), pytest.raises(ValueError, match="does not support"):
            GF.fused_mlp(x, w1, b1, w2, b2, "gelu")


@pytest.mark.cuda
def test_cpu_cuda_mix_raises():
    w1, b1, w2, b2 = make_params(16, 64, 16)
    with pytest.raises(ValueError, match="is on cpu"):
        GF.fused_mlp(torch.randn(4, 16, device="cuda"), w1, b1, w2, b2)


@pytest.mark.cuda
@pytest.mark.parametrize("act", ACTS)
def test_small_shapes_for_sanitize(act):
    """Tiny calls through every epilogue combination, for compute-sanitizer (device_check.sh --sanitize)."""
    for bias in (True, False):
        x = torch.randn(3, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w1, b1, w2, b2 = make_params(8, 128, 16, torch.bfloat16, "cuda", bias)
        with gptkernels.backend("kernel"):
            GF.fused_mlp(x, w1, b1, w2, b2, act).float().sum().backward()
            GF.linear_act(x, w1, b1, act).float().sum().backward()
        assert torch.isfinite(x.grad).all() and torch.isfinite(w1.grad).all()


@pytest.mark.cuda
def test_cublaslt_epilogue_fallback_cuda():
    """GPTKERNELS_LT_FALLBACK=1 runs every fused cuBLASLt epilogue through its fallback (plain GEMM, then
    bias add, column sums or the bias_act kernels): the CUDA accuracy tests of the FFN, linear_act and
    the linear cross-entropy pass on that path too, and each epilogue is named in one warning."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, GPTKERNELS_LT_FALLBACK="1")
    tests = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.join(tests, "test_mlp.py"), os.path.join(tests, "test_loss.py"),
                        "-k", "kernel_matches_reference and not 1000x and not 2048"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    code = ("import warnings, torch\nfrom gptkernels.nn import functional as GF\n"
            "x = torch.randn(8, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True)\n"
            "w1, w2 = (torch.randn(s, device='cuda', dtype=torch.bfloat16) for s in ((256, 64), (64, 256)))\n"
            "b1, b2 = torch.zeros(256, device='cuda', dtype=torch.bfloat16), torch.zeros(64, device='cuda', "
            "dtype=torch.bfloat16)\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    GF.fused_mlp(x, w1, b1, w2, b2, 'gelu_tanh').sum().backward()\n"
            "print('|'.join(str(m.message) for m in w))\n")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for epi in ("GELU_AUX_BIAS", "BIAS", "BGRADB", "DGELU_BGRAD"):
        assert f"epilogue {epi};" in p.stdout, p.stdout
