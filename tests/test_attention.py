"""Attention: the reference semantics (CPU, in CI), op registration (opcheck, torch.compile), input
checks, and the CUDA kernels (forward, backward, decode) against a float32 reference.

Kernel accuracy follows FlashAttention's rule: the kernel's max error against the fp32 math must be
at most 2x (plus a small epsilon) the error of the same math done by PyTorch in the inputs' low
precision (attention_ref(upcast=False)).
"""
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

import gptkernels
from gptkernels import _backend
from gptkernels.nn import functional as GF
from gptkernels._selftest import rule
from gptkernels._selftest.rule import max_err
from gptkernels.ops import attention as A

EXT = _backend.EXT_LOADED and hasattr(torch.ops.gptkernels, "flash_attn_fwd")
needs_ext = pytest.mark.skipif(not EXT, reason="extension not built")


def rand_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, device="cpu", layout="bhsd", requires_grad=False):
    def mk(H, S):
        shape = (B, H, S, D) if layout == "bhsd" else (B, S, H, D)
        return torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)
    return mk(Hq, Sq), mk(Hkv, Sk), mk(Hkv, Sk)


def close(a, b):
    """attention_ref computes in fp32 (also for fp64 inputs): compare at fp32 accuracy."""
    torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=2e-5)


def sdpa_reference(q, k, v, causal, scale, kv_lens=None):
    """torch's SDPA with an explicit boolean mask implementing our (bottom-right, kv_lens) rules, and
    the matching lse; inputs (B, H, S, D)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    kx, vx = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    j = torch.arange(Sk)
    i = torch.arange(Sq)
    lens = kv_lens.long() if kv_lens is not None else torch.full((B,), Sk)
    allowed = (j[None, None, :] < lens[:, None, None]).expand(B, Sq, Sk)
    if causal:
        allowed = allowed & (j[None, None, :] <= i[None, :, None] + (lens[:, None, None] - Sq))
    allowed = allowed[:, None]
    s = (q @ kx.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    any_row = allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, kx, vx, attn_mask=allowed | ~any_row, scale=scale)
    out = out.masked_fill(~any_row, 0.0)  # rows that see no key: zeros (torch would average all keys)
    return out, lse


# ---- reference semantics (CPU) ---------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1, 1), (5, 5), (3, 9), (9, 3), (1, 7), (16, 16)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_reference_matches_sdpa_masks(causal, sq, sk, hq, hkv):
    q, k, v = rand_qkv(2, hq, hkv, sq, sk, 8, dtype=torch.float64)
    out, lse = A.attention_ref(q, k, v, causal, 0.3)
    out_t, lse_t = sdpa_reference(q, k, v, causal, 0.3)
    close(out, out_t)
    close(lse, lse_t)


def test_reference_matches_torch_sdpa_directly():
    """No masks to build: plain, causal with Sq == Sk (where top-left == bottom-right), GQA."""
    q, k, v = rand_qkv(2, 6, 2, 11, 11, 16, dtype=torch.float64)
    for causal in (False, True):
        out, _ = A.attention_ref(q, k, v, causal)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        close(out, ref)


def test_reference_bottom_right_causal():
    """Sq < Sk: the last query sees every key (decoding); Sq > Sk: the first Sq - Sk rows see none."""
    q, k, v = rand_qkv(1, 2, 2, 3, 8, 4, dtype=torch.float64)
    out, lse = A.attention_ref(q, k, v, True, 0.5)
    full, _ = A.attention_ref(q[:, :, -1:], k, v, False, 0.5)
    close(out[:, :, -1:], full)
    q, k, v = rand_qkv(1, 2, 2, 8, 3, 4, dtype=torch.float64)
    out, lse = A.attention_ref(q, k, v, True, 0.5)
    assert torch.all(out[:, :, :5] == 0) and torch.all(lse[:, :, :5] == float("-inf"))
    assert torch.isfinite(lse[:, :, 5:]).all()


def test_reference_kv_lens_and_bshd():
    B, Hq, Hkv, Sq, Sk, D = 3, 4, 2, 2, 10, 8
    q, k, v = rand_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float64, layout="bshd")
    kv_lens = torch.tensor([10, 4, 0], dtype=torch.int32)
    for causal in (False, True):
        out, lse = A.attention_ref(q, k, v, causal, 0.25, "bshd", kv_lens)
        ref, lse_r = sdpa_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, 0.25, kv_lens)
        close(out, ref.transpose(1, 2))
        close(lse, lse_r)
        # batch 1 only uses its first 4 keys: garbage past them changes nothing
        k2, v2 = k.clone(), v.clone()
        k2[1, 4:], v2[1, 4:] = 1e4, float("nan")
        out2, _ = A.attention_ref(q, k2, v2, causal, 0.25, "bshd", kv_lens)
        torch.testing.assert_close(out2[1], out[1])
        assert torch.all(out[2] == 0)  # kv_lens = 0


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal,sq,sk", [(False, 7, 5), (True, 7, 7), (True, 4, 9), (True, 9, 4)])
def test_bwd_reference_matches_autograd(layout, causal, sq, sk):
    q, k, v = rand_qkv(2, 4, 2, sq, sk, 8, dtype=torch.float64, layout=layout, requires_grad=True)
    out, lse = A.attention_ref(q, k, v, causal, 0.4, layout)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    dlse = dlse.masked_fill(lse == float("-inf"), 0.0)
    (out * dout).sum().backward(retain_graph=True)
    (lse.masked_fill(lse == float("-inf"), 0.0) * dlse).sum().backward()
    dq, dk, dv = A.attention_bwd_ref(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), dlse,
                                     causal, 0.4, layout)
    close(dq, q.grad)
    close(dk, k.grad)
    close(dv, v.grad)
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()


def test_flash_attention_cpu_is_reference_and_contiguous():
    q, k, v = rand_qkv(2, 4, 1, 5, 6, 8, layout="bshd")
    out, lse = GF.flash_attention(q, k, v, causal=True, layout="bshd")
    ref, lse_r = A.attention_ref(q, k, v, True, None, "bshd")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, lse_r)
    assert out.is_contiguous() and out.shape == q.shape
    assert out.view(2, 5, 4 * 8).shape == (2, 5, 32)


@pytest.mark.parametrize("kwargs", [dict(), dict(is_causal=True), dict(scale=0.3), dict(dropout_p=0.0)])
def test_sdpa_dropin_cpu_matches_torch(kwargs):
    q, k, v = rand_qkv(2, 3, 3, 6, 6, 8)
    torch.testing.assert_close(GF.scaled_dot_product_attention(q, k, v, **kwargs),
                               F.scaled_dot_product_attention(q, k, v, **kwargs))
    q, k, v = rand_qkv(2, 4, 2, 3, 6, 8)
    torch.testing.assert_close(GF.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    mask = torch.rand(3, 6) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(GF.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))


def test_sdpa_dropin_requires_enable_gqa_like_torch():
    q, k, v = rand_qkv(1, 4, 2, 3, 3, 8)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError):
        GF.scaled_dot_product_attention(q, k, v)


def test_bad_input():
    q, k, v = rand_qkv(2, 4, 2, 5, 6, 8)
    with pytest.raises(ValueError, match="k: head dim"):
        GF.flash_attention(q, torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16))
    with pytest.raises(ValueError, match="q: expected dtype"):
        GF.flash_attention(q.long(), k, v)
    with pytest.raises(ValueError, match="k has dtype"):
        GF.flash_attention(q, k.half(), v.half())
    with pytest.raises(ValueError, match="must divide"):
        GF.flash_attention(q, torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8))
    with pytest.raises(ValueError, match="v: expected the shape of k"):
        GF.flash_attention(q, k, torch.randn(2, 2, 7, 8))
    with pytest.raises(ValueError, match="layout"):
        GF.flash_attention(q, k, v, layout="sbhd")
    with pytest.raises(ValueError, match="kv_lens: expected shape"):
        GF.flash_attention(q, k, v, kv_lens=torch.tensor([1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_lens: expected dtype"):
        GF.flash_attention(q, k, v, kv_lens=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="expected 4 dimensions"):
        GF.flash_attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        GF.flash_attention(None, k, v)


@needs_ext
def test_kernel_unsupported_reasons():
    q = torch.randn(1, 2, 3, 64, dtype=torch.bfloat16)
    top = A.LIMITS["max_head_dim"]
    assert A._unsupported(q, 64, 3, 3, 0.125, None, True) is None
    assert A._unsupported(q, 40, 3, 3, 0.125, None, True) is None  # padded to 64
    assert f"head_dim {2 * top}" in A._unsupported(q, 2 * top, 3, 3, 0.125, None, False)
    assert "head_dim 36" in A._unsupported(q, 36, 3, 3, 0.125, None, False)
    assert "float32" in A._unsupported(q.float(), 64, 3, 3, 0.125, None, False)
    assert "scale" in A._unsupported(q, 64, 3, 3, -1.0, None, False)
    assert "kv_lens" in A._unsupported(q, 64, 3, 3, 0.125, torch.ones(1), True)
    assert A._unsupported(q, 64, 3, 3, 0.125, torch.ones(1), False) is None


@needs_ext
@pytest.mark.parametrize("case,expect", [
    (dict(D=256), "torch"), (dict(D=36), "torch"), (dict(dtype=torch.float32), "torch"),
    (dict(kv_lens=True, needs_grad=True), "torch"), (dict(), "kernel"), (dict(kv_lens=True), "kernel")])
def test_which_function_runs_on_a_gpu(case, expect):
    """The path a call would take on a GPU (decided without one), and the function that path runs."""
    D, dt = case.get("D", 64), case.get("dtype", torch.bfloat16)
    q = torch.randn(1, 2, 3, D, dtype=dt)
    kv = torch.ones(1, dtype=torch.int32) if case.get("kv_lens") else None
    why = A._unsupported(q, D, 3, 3, 1 / math.sqrt(D), kv, case.get("needs_grad", False))
    path = _backend.decide(True, why, mode="auto", ext_loaded=True)
    assert path == expect
    assert A.FLASH_ATTENTION[path] is {"kernel": A._attention_kernel, "torch": A._attention_torch}[expect]
    assert _backend.decide(False, why, mode="auto", ext_loaded=True) == "reference"
    assert A.FLASH_ATTENTION["reference"] is A._attention_reference


def test_instantiation_files_are_current():
    """csrc/attention/flash_{fwd,bwd}_hdim*_*.cu are generated from the list in attention_limits.h."""
    import subprocess
    import sys
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, str(root / "tools" / "gen_instantiations.py"), "--check"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    if EXT:  # the extension's head dims are the list the files were generated from
        sys.path.insert(0, str(root / "tools"))
        try:
            import gen_instantiations
        finally:
            sys.path.pop(0)
        assert gen_instantiations.head_dims() == A.LIMITS["head_dims"]


# ---- torch's fast path (what a GPU runs when the kernels do not take a call) -------------------

@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal,sq,sk,kv", [
    (False, 5, 7, None), (True, 6, 6, None), (True, 3, 9, None), (True, 9, 4, None), (True, 1, 8, None),
    (False, 4, 9, [9, 3, 0]), (True, 4, 9, [9, 3, 0]), (True, 9, 4, [4, 2, 0]), (True, 1, 6, [6, 1, 0])])
def test_torch_path_matches_reference(layout, causal, sq, sk, kv):
    """attention_torch (SDPA + the chunked lse) gives the reference's out, lse and gradients (also
    through lse), with GQA, bottom-right causal for every Sq/Sk, kv_lens, rows that see no key, and
    garbage in the cache past kv_lens."""
    B = 3 if kv else 2
    q, k, v = rand_qkv(B, 4, 2, sq, sk, 8, dtype=torch.float64, layout=layout)
    kv_lens = torch.tensor(kv, dtype=torch.int32) if kv else None
    if kv:
        kb, vb = A.to_bhsd(k, layout), A.to_bhsd(v, layout)
        for b, n in enumerate(kv):
            kb[b, :, n:], vb[b, :, n:] = 1e4, float("nan")
    dout = torch.randn(q.shape, dtype=torch.float64)
    grads = []
    for fn in (A.attention_torch, A.attention_ref):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, lse = fn(qq, kk, vv, causal, 0.3, layout, kv_lens)
        seen = lse > float("-inf")
        ((out * dout).sum() + (lse.masked_fill(~seen, 0.0) * 0.7).sum()).backward()
        grads.append((out.detach(), lse.detach(), qq.grad, kk.grad, vv.grad))
        if fn is A.attention_torch:
            assert out.is_contiguous() and out.shape == q.shape
    for got, want in zip(*grads):
        close(got, want)


def test_set_attention_impl(monkeypatch):
    monkeypatch.setenv("GPTKERNELS_ATTENTION_IMPL", "")  # restored after the test
    assert gptkernels.get_attention_impl() == "auto"
    for impl in A.ATTENTION_IMPLS:
        gptkernels.set_attention_impl(impl)
        assert gptkernels.get_attention_impl() == impl
    with pytest.raises(ValueError, match="set_attention_impl: expected one of"):
        gptkernels.set_attention_impl("sm75")


@needs_ext
def test_attention_impl_names_match_the_extension(monkeypatch):
    """set_attention_impl's names are the rows of the C++ implementation table (flash_api.cu)."""
    for impl in A.ATTENTION_IMPLS:
        monkeypatch.setenv("GPTKERNELS_ATTENTION_IMPL", impl)
        assert A.kernel_implementation("fwd", (9, 0))
    monkeypatch.setenv("GPTKERNELS_ATTENTION_IMPL", "sm75")
    with pytest.raises(RuntimeError, match="(?m)expected one of " + ", ".join(A.ATTENTION_IMPLS) + "$"):
        A.kernel_implementation("fwd", (9, 0))


@needs_ext
def test_sm90_row_of_the_implementation_table(monkeypatch):
    """The Hopper forward and backward are one opt-in row of select_impl's table: forward and backward
    (not decode), compute capability 9.0 only, in a build with sm_90a only; attention_impl (what
    `gptkernels info` prints) names it where it could run and says how to select it."""
    from gptkernels import _info
    built = "90a" in _info.build_info()["archs"].split(";")
    impl = A.kernel_implementation
    monkeypatch.setenv("GPTKERNELS_ATTENTION_IMPL", "auto")
    for op in ("fwd", "bwd"):
        auto90 = impl(op, (9, 0))
        assert auto90.startswith("sm80 mma.sync kernel; ")
        assert ("opt-in: sm90 wgmma/TMA kernel (not verified on a GPU), GPTKERNELS_ATTENTION_IMPL=sm90" in auto90) == built
        assert ("sm90 wgmma/TMA kernel: not in this build" in auto90) == (not built)
    monkeypatch.setenv("GPTKERNELS_ATTENTION_IMPL", "sm90")
    for op in ("fwd", "bwd"):
        if built:
            assert impl(op, (9, 0)) == ("sm90 wgmma/TMA kernel (opt-in, not verified on a GPU); "
                                        "calls it refuses: sm80 mma.sync kernel")
        else:
            assert impl(op, (9, 0)).startswith("sm80 mma.sync kernel; sm90 wgmma/TMA kernel: not in this build")
    for op, cc in (("bwd", (8, 0)), ("fwd", (8, 0)), ("fwd", (10, 0)), ("fwd", (8, 9)), ("bwd", (10, 0))):
        assert impl(op, cc) == "sm80 mma.sync kernel", (op, cc)  # no sm90 row for them
    assert impl("decode", (9, 0)) == "sm80 split-KV decode kernel"
    monkeypatch.setenv("GPTKERNELS_ATTENTION_IMPL", "sm80")
    assert impl("fwd", (9, 0)) == "sm80 mma.sync kernel"
    if built:  # info, without a GPU, shows what an sm_90a GPU would run
        monkeypatch.setenv("GPTKERNELS_ATTENTION_IMPL", "sm90")
        out = io.StringIO()
        d = gptkernels.info(file=out)
        assert "sm90 wgmma/TMA kernel (opt-in" in out.getvalue()
        if not torch.cuda.is_available():
            assert "on an sm_90a GPU" in out.getvalue()
        else:
            cap = torch.cuda.get_device_capability()
            assert d["ops"]["attention fwd"].startswith("sm90" if cap == (9, 0) else "sm80")


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
def test_sm90_sass_has_hopper_instructions(tmp_path, kind):
    """The sm_90a builds of the Hopper forward and backward use wgmma (HGMMA), TMA (UTMALDG; the forward
    also UTMASTG), mbarriers (SYNCS) and setmaxnreg, nothing in local memory, and each warpgroup role
    fits the registers setmaxnreg gives it (tools/sass_check.py; needs nvcc and cuobjdump, not a GPU)."""
    import importlib.util
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("gptk_sass_check", os.path.join(root, "tools", "sass_check.py"))
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    if sc.find_tool("nvcc") is None or sc.find_tool("cuobjdump") is None:
        pytest.skip("needs nvcc and cuobjdump")
    src = os.path.join(root, "csrc", "attention", "sm90", f"flash_{kind}_sm90_hdim128_bf16.cu")
    out = tmp_path / "sass.json"
    p = subprocess.run([sys.executable, os.path.join(root, "tools", "sass_check.py"), src, "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    import json
    (row,) = json.loads(out.read_text())
    assert row["ok"] and not row["missing"] and not row["local_memory"]
    assert set(row["roles"]) == {"producer", "consumer"}
    assert row["roles"]["producer"]["setmaxnreg"] == 24 and row["roles"]["consumer"]["setmaxnreg"] == 240


# ---- op registration (CPU: the ops' CPU implementation is the reference) ----------------------

@needs_ext
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_fwd_cpu(layout, causal):
    q, k, v = rand_qkv(2, 4, 2, 5, 7, 8, layout=layout, requires_grad=True)
    torch.library.opcheck(torch.ops.gptkernels.flash_attn_fwd, (q, k, v, causal, 0.35, layout, None, False))
    kv_lens = torch.tensor([7, 3], dtype=torch.int32)
    torch.library.opcheck(torch.ops.gptkernels.flash_attn_fwd,
                          (q.detach(), k.detach(), v.detach(), causal, 0.35, layout, kv_lens, False))


@needs_ext
@pytest.mark.skipif(not (EXT and hasattr(torch.ops.gptkernels, "flash_attn_bwd")), reason="no backward op")
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_opcheck_bwd_cpu(layout):
    q, k, v = rand_qkv(2, 4, 2, 5, 7, 8, layout=layout)
    out, lse = A.attention_ref(q, k, v, True, 0.35, layout)
    out = out.contiguous()
    dout = torch.randn_like(out)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(torch.ops.gptkernels.flash_attn_bwd,
                              (dout, q, k, v, out, lse, dlse, True, 0.35, layout, False))


@needs_ext
@pytest.mark.skipif(not (EXT and hasattr(torch.ops.gptkernels, "flash_attn_decode")), reason="no decode op")
def test_opcheck_decode_cpu():
    q, k, v = rand_qkv(2, 4, 2, 1, 9, 8, layout="bshd")
    kv_lens = torch.tensor([9, 4], dtype=torch.int32)
    torch.library.opcheck(torch.ops.gptkernels.flash_attn_decode, (q, k, v, True, 0.35, "bshd", kv_lens))


@needs_ext
def test_autograd_through_op_cpu():
    """The registered autograd (which calls the backward op, reference on CPU) matches autograd of
    the reference, including a gradient flowing into lse."""
    q, k, v = rand_qkv(2, 4, 2, 6, 6, 8, dtype=torch.float64, requires_grad=True)
    out, lse = torch.ops.gptkernels.flash_attn_fwd(q, k, v, True, 0.3, "bhsd", None, False)
    (out.sum() + (lse * 0.5).sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out_r, lse_r = A.attention_ref(q, k, v, True, 0.3)
    (out_r.sum() + (lse_r * 0.5).sum()).backward()
    for g, t in zip(grads, (q, k, v)):
        close(g, t.grad)


def test_compile_fullgraph_cpu():
    def f(q, k, v):
        out, lse = GF.flash_attention(q, k, v, causal=True, layout="bshd")
        return out.sum() + lse.sum()

    q, k, v = rand_qkv(2, 4, 2, 5, 5, 8, layout="bshd", requires_grad=True)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    cf(q, k, v).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v).backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)
    g = torch.compile(lambda q, k, v: GF.scaled_dot_product_attention(q, k, v, is_causal=True), fullgraph=True,
                      backend="aot_eager")
    q, k, v = rand_qkv(1, 2, 2, 4, 4, 8)
    torch.testing.assert_close(g(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))


# ---- CUDA kernels ------------------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16]
EPS = {torch.bfloat16: 1e-3, torch.float16: 2e-4}


def poison_cuda_cache(nbytes=256 << 20):
    """Fill free memory of torch's caching allocator with NaN so that outputs the kernels fail to write
    show up as NaN (new allocations reuse the freed blocks): one large block (the large pool) and a few
    sub-1 MB blocks (the small pool, where outputs under 1 MB come from)."""
    big = torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    small = [torch.empty((1 << 18) - 256, device="cuda").fill_(float("nan")) for _ in range(16)]
    torch.cuda.synchronize()
    del big, small


def assert_2x(name, got, ref, base, dtype):
    """FlashAttention's rule (gptkernels._selftest.rule): error(got) <= 2 * error(low-precision PyTorch)
    + EPS * max(1, |ref|)."""
    assert not got.isnan().any(), f"{name}: NaN in the kernel's result"
    e, bound = rule.compare(got, ref, base, dtype, floor_ulps=EPS[dtype] / rule.UNIT_ROUNDOFF[dtype], min_scale=1.0)
    assert e <= bound, f"{name}: kernel error {e:.3e} > bound {bound:.3e} (2 x PyTorch {dtype} error + EPS)"


def assert_fwd_matches_ref(out, lse, q, k, v, causal, scale, layout, kv_lens, dtype):
    """out by FlashAttention's rule (assert_2x) and lse (no NaN, the same -inf rows, within 1e-3 x
    max(1, |lse|)) against attention_ref on q, k, v (k, v: what the reference sees)."""
    ref, lse_ref = A.attention_ref(q, k, v, causal, scale, layout, kv_lens, upcast=True)
    base, _ = A.attention_ref(q, k, v, causal, scale, layout, kv_lens, upcast=False)
    assert_2x("out", out, ref, base, dtype)
    assert not lse.isnan().any(), "lse: NaN"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), "lse: -inf rows differ"
    fin = torch.isfinite(lse_ref)
    if fin.any():
        assert max_err(lse[fin], lse_ref[fin]) <= 1e-3 * max(1.0, lse_ref[fin].abs().max().item()), "lse"


def run_kernel_fwd(q, k, v, causal, scale, layout, kv_lens=None, decode=False):
    op = torch.ops.gptkernels.flash_attn_decode if decode else torch.ops.gptkernels.flash_attn_fwd
    args = (q, k, v, causal, scale, layout, kv_lens) + (() if decode else (False,))
    poison_cuda_cache()
    return op(*args)


def check_fwd(B, Hq, Hkv, Sq, Sk, D, dtype, causal, layout="bhsd", kv_lens=None, decode=False, qkv=None):
    q, k, v = qkv if qkv is not None else rand_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, "cuda", layout)
    scale = 1.0 / math.sqrt(D)
    out, lse = run_kernel_fwd(q, k, v, causal, scale, layout, kv_lens, decode)
    assert out.shape == q.shape and out.is_contiguous() and out.dtype == dtype
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    assert_fwd_matches_ref(out, lse, q, k, v, causal, scale, layout, kv_lens, dtype)
    return out, lse


SEQS = [(1, 1), (1, 1023), (17, 17), (17, 113), (113, 17), (113, 203), (1000, 1000), (1023, 1023), (1000, 2048),
        (2048, 2048)]
GQA = [(8, 8), (8, 2), (8, 1)]
IMPLS = ["sm80", "sm90"]


def sm90_active() -> bool:
    """Whether the current GPU runs the sm90 forward under GPTKERNELS_ATTENTION_IMPL (as now set)."""
    return (A.kernel_implementation("fwd") or "").startswith("sm90")


@pytest.fixture(params=IMPLS)
def attn_impl(request, monkeypatch):
    """Runs a forward test on each kernel family (GPTKERNELS_ATTENTION_IMPL, read by the extension at
    every call). sm90 needs compute capability 9.0 and a build for sm_90a."""
    monkeypatch.setenv("GPTKERNELS_ATTENTION_IMPL", request.param)
    if request.param == "sm90" and torch.cuda.is_available() and EXT and not sm90_active():
        pytest.skip("the sm90 kernel needs compute capability 9.0 and an extension built for sm_90a")
    return request.param


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("sq,sk", SEQS)
@pytest.mark.parametrize("hq,hkv", GQA)
def test_fwd_kernel(dtype, causal, D, sq, sk, hq, hkv, attn_impl):
    B = 2 if sq * sk <= 1024 * 1024 else 1
    check_fwd(B, hq, hkv, sq, sk, D, dtype, causal)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [8, 40, 96, 120])
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_kernel_padded_head_dims(D, causal, attn_impl):
    check_fwd(2, 4, 2, 77, 130, D, torch.bfloat16, causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_fwd_kernel_bshd(dtype, causal, D, attn_impl):
    check_fwd(2, 6, 2, 257, 300, D, dtype, causal, layout="bshd")


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_kernel_fused_qkv_views(causal, attn_impl):
    """q, k, v as strided views of one (B, S, (Hq + 2 Hkv) * D) projection, as the GPT block feeds them."""
    B, S, Hq, Hkv, D = 2, 301, 8, 2, 64
    qkv = torch.randn(B, S, (Hq + 2 * Hkv) * D, device="cuda", dtype=torch.bfloat16).view(B, S, Hq + 2 * Hkv, D)
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
    assert not q.is_contiguous()
    out, _ = check_fwd(B, Hq, Hkv, S, S, D, torch.bfloat16, causal, layout="bshd", qkv=(q, k, v))
    assert out.view(B, S, Hq * D).shape == (B, S, Hq * D)


@pytest.mark.cuda
def test_fwd_kernel_unaligned_inputs_are_copied(attn_impl):
    """A q that starts off a 16-byte boundary (or has odd strides) is copied by the binding, not misread."""
    base = torch.randn(2 * 4 * 50 * 64 + 3, device="cuda", dtype=torch.float16)
    q = base[3:].view(2, 4, 50, 64)
    k = torch.randn(2, 4, 70, 72, device="cuda", dtype=torch.float16)[..., :64]  # row stride 72, fine
    v = torch.randn(2, 4, 70, 64, device="cuda", dtype=torch.float16)
    check_fwd(2, 4, 4, 50, 70, 64, torch.float16, True, qkv=(q, k, v))


@pytest.mark.cuda
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("sq", [1, 2, 4])
@pytest.mark.parametrize("hq,hkv", [(12, 12), (8, 2), (4, 1)])
def test_kv_cache_decode(decode, dtype, D, sq, hq, hkv, attn_impl):
    """A static cache (B, S_max, Hkv, D) filled to kv_lens[b]; the rest holds NaN, which must never be
    read. Both the forward kernel and the split-KV decode kernel."""
    if decode and not hasattr(torch.ops.gptkernels, "flash_attn_decode"):
        pytest.skip("no decode op in this build")
    if decode and attn_impl == "sm90":
        pytest.skip("the decode kernel has one implementation")
    B, S_max = 5, 1024
    q = torch.randn(B, sq, hq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, S_max, hkv, D, device="cuda", dtype=dtype)
    v = torch.randn(B, S_max, hkv, D, device="cuda", dtype=dtype)
    kv_lens = torch.tensor([1024, 1, 0, 517, 64], device="cuda", dtype=torch.int32)
    for b, n in enumerate(kv_lens.tolist()):
        k[b, n:], v[b, n:] = float("nan"), float("nan")
    kr, vr = k, v  # the reference masks keys past kv_lens (and zeroes those values)
    scale = 1.0 / math.sqrt(D)
    for causal in (False, True):
        out, lse = run_kernel_fwd(q, k, v, causal, scale, "bshd", kv_lens, decode)
        assert_fwd_matches_ref(out, lse, q, kr, vr, causal, scale, "bshd", kv_lens, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("sq", [1, 2, 5, 17, 64])
@pytest.mark.parametrize("hq,hkv", [(32, 32), (32, 8)])
def test_split_kv_cache_far_below_capacity(D, sq, hq, hkv):
    """The split-KV forward (flash_attn_decode) over a 4096-key cache filled to 1, 1000 and 4096
    keys: the split ranges come from kv_lens inside the kernels. Sq * Hq/Hkv <= 16 runs the CUDA-core
    kernel, more rows the tensor-core forward split over the keys (B = 3, H = 32: few query tiles)."""
    B, S_max, dtype = 3, 4096, torch.bfloat16
    q = torch.randn(B, sq, hq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, S_max, hkv, D, device="cuda", dtype=dtype)
    v = torch.randn(B, S_max, hkv, D, device="cuda", dtype=dtype)
    kv_lens = torch.tensor([1, 1000, 4096], device="cuda", dtype=torch.int32)
    for b, n in enumerate(kv_lens.tolist()):
        k[b, n:], v[b, n:] = float("nan"), float("nan")
    scale = 1.0 / math.sqrt(D)
    for causal in (False, True):
        out, lse = run_kernel_fwd(q, k, v, causal, scale, "bshd", kv_lens, decode=True)
        assert_fwd_matches_ref(out, lse, q, k, v, causal, scale, "bshd", kv_lens, dtype)


@pytest.mark.cuda
def test_fwd_small_sanitize(attn_impl):
    """Small shapes for compute-sanitizer runs (tools/device_check.sh --sanitize picks 'sanitize')."""
    for sq, sk in [(1, 1), (17, 5), (5, 17), (65, 129)]:
        for causal in (False, True):
            check_fwd(1, 2, 1, sq, sk, 64, torch.bfloat16, causal)
            check_fwd(1, 2, 2, sq, sk, 128, torch.float16, causal, layout="bshd")


@pytest.mark.cuda
def test_flash_attention_kernel_mode_and_fallback():
    q, k, v = rand_qkv(1, 2, 2, 33, 33, 64, torch.bfloat16, "cuda")
    with gptkernels.backend("kernel"):
        out, _ = GF.flash_attention(q, k, v, causal=True)
    ref, _ = A.attention_ref(q, k, v, True, None, upcast=True)
    base, _ = A.attention_ref(q, k, v, True, None, upcast=False)
    assert_2x("out", out, ref, base, torch.bfloat16)
    q2, k2, v2 = rand_qkv(1, 2, 2, 33, 33, 256, torch.bfloat16, "cuda")
    with gptkernels.backend("kernel"), pytest.raises(ValueError, match="head_dim 256"):
        GF.flash_attention(q2, k2, v2)
    with pytest.warns(UserWarning, match="head_dim 256"):
        out2, lse2 = GF.flash_attention(q2, k2, v2)  # torch's SDPA + the chunked lse
    ref2, lse_r = A.attention_ref(q2, k2, v2, upcast=True)
    assert_2x("out (torch path)", out2, ref2, A.attention_ref(q2, k2, v2, upcast=False)[0], torch.bfloat16)
    torch.testing.assert_close(lse2, lse_r, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("causal,sq,sk", [(True, 5, 40), (True, 40, 5), (False, 7, 33)])
def test_torch_path_cuda_with_kv_lens_and_grad(causal, sq, sk):
    """Gradients through kv_lens take torch's SDPA path on a GPU: same values and gradients as the
    fp32 reference (within bf16 rounding)."""
    q, k, v = rand_qkv(2, 4, 2, sq, sk, 64, torch.bfloat16, "cuda", requires_grad=True)
    kv_lens = torch.tensor([sk, sk // 2], dtype=torch.int32, device="cuda")
    out, lse = GF.flash_attention(q, k, v, causal=causal, kv_lens=kv_lens)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, lse_r = A.attention_ref(qf, kf, vf, causal, None, "bhsd", kv_lens)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    seen = lse_r > float("-inf")
    torch.testing.assert_close(lse[seen], lse_r[seen], atol=1e-3, rtol=1e-3)
    dout = torch.randn_like(ref)
    out.float().mul(dout).sum().backward()
    ref.mul(dout).sum().backward()
    for g, r in zip((q.grad, k.grad, v.grad), (qf.grad, kf.grad, vf.grad)):
        torch.testing.assert_close(g.float(), r, atol=3e-2 * r.abs().max().item(), rtol=5e-2)


# ---- the sm90 (Hopper) forward: selection and what only it does ---------------------------------

def kernels_launched(fn):
    """Names of the CUDA kernels fn() launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}


@pytest.mark.cuda
def test_sm90_selection_runs_the_sm90_kernel(attn_impl):
    """GPTKERNELS_ATTENTION_IMPL picks the kernel that runs: the sm90 one really runs when asked for
    (no silent fallback for a supported call), and unsupported calls fall back to sm80."""
    q, k, v = rand_qkv(1, 4, 2, 300, 300, 128, torch.bfloat16, "cuda", "bshd")
    names = kernels_launched(lambda: torch.ops.gptkernels.flash_attn_fwd(q, k, v, True, 0.1, "bshd", None, False))
    ran_sm90 = any("flash_fwd_sm90_kernel" in n for n in names)
    assert ran_sm90 == (attn_impl == "sm90"), names
    assert A.kernel_implementation("fwd").startswith(attn_impl)


@pytest.mark.cuda
def test_sm90_bad_impl_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("GPTKERNELS_ATTENTION_IMPL", "sm75")
    q, k, v = rand_qkv(1, 2, 2, 8, 8, 64, torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match="GPTKERNELS_ATTENTION_IMPL"):
        torch.ops.gptkernels.flash_attn_fwd(q, k, v, False, 0.1, "bhsd", None, False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_sm90_tile_edges(dtype, D, causal, attn_impl):
    """Lengths a few keys / rows from every tile edge of the sm90 kernel (128 x 128 tiles) and of the
    sm80 one, with Sq != Sk and GQA; both layouts."""
    for sq, sk in [(127, 129), (129, 255), (256, 383), (385, 126), (2, 513)]:
        for layout in ("bhsd", "bshd"):
            check_fwd(2, 6, 3, sq, sk, D, dtype, causal, layout=layout)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
def test_sm90_kv_lens_straddling_tiles(D, attn_impl):
    """kv_lens that end inside a key tile, at its edges, at 0 and at Sk, with NaN past them: the sm90
    producer zeroes V rows past kv_len in shared memory (TMA would load the NaN)."""
    B, Sq, S_max, H = 7, 130, 640, 4
    q = torch.randn(B, Sq, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, S_max, H, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, S_max, H, D, device="cuda", dtype=torch.bfloat16)
    kv_lens = torch.tensor([640, 1, 0, 127, 128, 129, 383], device="cuda", dtype=torch.int32)
    for b, n in enumerate(kv_lens.tolist()):
        k[b, n:], v[b, n:] = float("nan"), float("nan")
    for causal in (False, True):
        check_fwd(B, H, H, Sq, S_max, D, torch.bfloat16, causal, layout="bshd", kv_lens=kv_lens, qkv=(q, k, v))


@pytest.mark.cuda
def test_sm90_backward_from_sm90_forward(attn_impl):
    """Each implementation's backward runs on out / lse from its forward (sm90: both Hopper kernels)."""
    check_bwd(2, 4, 2, 200, 333, 64, torch.bfloat16, True, layout="bshd")


# ---- the sm90 (Hopper) backward ------------------------------------------------------------------

@pytest.mark.cuda
def test_sm90_bwd_selection_runs_the_sm90_kernel(attn_impl):
    """GPTKERNELS_ATTENTION_IMPL=sm90 runs the Hopper backward (no silent fallback for a supported call)."""
    q, k, v = rand_qkv(1, 4, 2, 300, 300, 128, torch.bfloat16, "cuda", "bshd")
    out, lse = torch.ops.gptkernels.flash_attn_fwd(q, k, v, True, 0.1, "bshd", None, False)
    dout = torch.randn_like(out)
    names = kernels_launched(lambda: torch.ops.gptkernels.flash_attn_bwd(dout, q, k, v, out, lse, None, True, 0.1,
                                                                          "bshd", False))
    assert any("flash_bwd_sm90_kernel" in n for n in names) == (attn_impl == "sm90"), names
    assert A.kernel_implementation("bwd").startswith(attn_impl)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_sm90_bwd_tile_edges(dtype, D, causal, attn_impl):
    """Backward lengths a few rows / keys from the sm90 backward's tile edges (128 keys; 128 queries at
    d = 64, 64 at d = 128), Sq != Sk both ways, GQA, both layouts, dlse."""
    for sq, sk in [(127, 129), (63, 65), (129, 255), (300, 17), (17, 300)]:
        for layout in ("bhsd", "bshd"):
            check_bwd(2, 6, 3, sq, sk, D, dtype, causal, layout=layout, with_dlse=layout == "bshd")


@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
def test_sm90_bwd_deterministic(D, attn_impl):
    """deterministic=True on the sm90 backward: bitwise identical gradients run to run (dq slices), GQA."""
    q, k, v = rand_qkv(2, 8, 2, 700, 900, D, torch.bfloat16, "cuda", requires_grad=True)
    check_bwd(2, 8, 2, 700, 900, D, torch.bfloat16, True, deterministic=True, qkv=(q, k, v))
    dout = torch.randn_like(q)
    runs = []
    for _ in range(3):
        with gptkernels.backend("kernel"):
            _, g = grads_of(lambda: GF.flash_attention(q, k, v, True, None, deterministic=True), (q, k, v), dout)
        runs.append([t.clone() for t in g])
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cpu_cuda_mix_raises():
    q, k, v = rand_qkv(1, 2, 2, 4, 4, 64)
    with pytest.raises(ValueError, match="k is on cpu"):
        GF.flash_attention(q.cuda(), k, v.cuda())
    with pytest.raises(ValueError, match="kv_lens is on cpu"):
        GF.flash_attention(q.cuda(), k.cuda(), v.cuda(), kv_lens=torch.ones(1, dtype=torch.int32))


@pytest.mark.cuda
def test_opcheck_fwd_cuda():
    q, k, v = rand_qkv(2, 4, 2, 37, 50, 64, torch.bfloat16, "cuda", "bshd", requires_grad=True)
    torch.library.opcheck(torch.ops.gptkernels.flash_attn_fwd, (q, k, v, True, 0.125, "bshd", None, False))


@pytest.mark.cuda
def test_compile_fullgraph_cuda():
    f = torch.compile(lambda q, k, v: GF.flash_attention(q, k, v, causal=True, layout="bshd")[0], fullgraph=True)
    q, k, v = rand_qkv(2, 4, 2, 100, 100, 64, torch.bfloat16, "cuda", "bshd")
    ref, _ = A.attention_ref(q, k, v, True, None, "bshd", upcast=True)
    base, _ = A.attention_ref(q, k, v, True, None, "bshd", upcast=False)
    assert_2x("out", f(q, k, v), ref, base, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_dropin_cuda(causal):
    q, k, v = rand_qkv(2, 4, 4, 200, 200, 64, torch.float16, "cuda")
    with gptkernels.backend("kernel"):
        out = GF.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    base = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert_2x("out", out, ref, base, torch.float16)
    # causal with Sq != Sk is top-left in torch: routed to torch's SDPA, same result
    q2 = q[:, :, :50]
    torch.testing.assert_close(GF.scaled_dot_product_attention(q2, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q2, k, v, is_causal=True))


# ---- CUDA backward -------------------------------------------------------------------------------

def grads_of(fn, tensors, dout, dlse=None):
    for t in tensors:
        t.grad = None
    out, lse = fn()
    loss = (out.float() * dout.float()).sum()
    if dlse is not None:
        loss = loss + (lse.masked_fill(torch.isneginf(lse), 0.0) * dlse).sum()
    loss.backward()
    return out, [t.grad for t in tensors]


def check_bwd(B, Hq, Hkv, Sq, Sk, D, dtype, causal, layout="bhsd", deterministic=False, with_dlse=False, qkv=None):
    q, k, v = qkv if qkv is not None else rand_qkv(B, Hq, Hkv, Sq, Sk, D, dtype, "cuda", layout, requires_grad=True)
    scale = 1.0 / math.sqrt(D)
    dout = torch.randn(q.shape, device="cuda", dtype=dtype)
    dlse = torch.randn(B, Hq, Sq, device="cuda") if with_dlse else None
    poison_cuda_cache()
    with gptkernels.backend("kernel"):
        out, g = grads_of(lambda: GF.flash_attention(q, k, v, causal, scale, layout, deterministic=deterministic),
                          (q, k, v), dout, dlse)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    _, g_ref = grads_of(lambda: A.attention_ref(q32, k32, v32, causal, scale, layout, upcast=True), (q32, k32, v32),
                        dout, dlse)
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _, g_base = grads_of(lambda: A.attention_ref(qb, kb, vb, causal, scale, layout, upcast=False), (qb, kb, vb),
                         dout, dlse)
    for name, got, ref, base in zip(("dq", "dk", "dv"), g, g_ref, g_base):
        assert got.shape == ref.shape and got.dtype == dtype, name
        assert_2x(name, got, ref, base, dtype)
    return g


BWD_SEQS = [(1, 1), (17, 17), (17, 113), (113, 17), (113, 203), (1000, 1000), (1023, 1023), (2048, 2048)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("sq,sk", BWD_SEQS)
@pytest.mark.parametrize("hq,hkv", GQA)
def test_bwd_kernel(dtype, causal, D, sq, sk, hq, hkv):
    B = 2 if sq * sk <= 1024 * 1024 else 1
    check_bwd(B, hq, hkv, sq, sk, D, dtype, causal)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [40, 96])
def test_bwd_kernel_padded_head_dims(D):
    check_bwd(2, 4, 2, 77, 130, D, torch.bfloat16, True)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_bwd_kernel_bshd_and_dlse(causal, D):
    check_bwd(2, 6, 2, 257, 300, D, torch.bfloat16, causal, layout="bshd", with_dlse=True)


@pytest.mark.cuda
def test_bwd_kernel_fused_qkv_views():
    B, S, Hq, Hkv, D = 2, 301, 8, 2, 64
    qkv = torch.randn(B, S, Hq + 2 * Hkv, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.split([Hq, Hkv, Hkv], dim=2)
    g = check_bwd(B, Hq, Hkv, S, S, D, torch.bfloat16, True, layout="bshd", qkv=(q, k, v))
    assert all(t.shape == s.shape for t, s in zip(g, (q, k, v)))


@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B,hq,hkv", [(2, 8, 1), (4, 32, 32)])
def test_bwd_deterministic(D, B, hq, hkv):
    """deterministic=True: bitwise identical gradients run to run, and as accurate as the default.
    (4, 32, 32): fewer dq slices than key blocks, so each CTA walks several key blocks in order."""
    q, k, v = rand_qkv(B, hq, hkv, 1000, 1000, D, torch.bfloat16, "cuda", requires_grad=True)
    check_bwd(B, hq, hkv, 1000, 1000, D, torch.bfloat16, True, deterministic=True, qkv=(q, k, v))
    dout = torch.randn_like(q)
    runs = []
    for _ in range(3):
        with gptkernels.backend("kernel"):
            _, g = grads_of(lambda: GF.flash_attention(q, k, v, True, None, deterministic=True), (q, k, v), dout)
        runs.append([t.clone() for t in g])
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_bwd_opcheck_cuda():
    q, k, v = rand_qkv(2, 4, 2, 37, 50, 64, torch.bfloat16, "cuda", "bshd")
    out, lse = torch.ops.gptkernels.flash_attn_fwd(q, k, v, True, 0.125, "bshd", None, False)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.gptkernels.flash_attn_bwd,
                          (dout, q, k, v, out, lse, None, True, 0.125, "bshd", False))


@pytest.mark.cuda
def test_bwd_small_sanitize(attn_impl):
    """Small backward shapes for compute-sanitizer runs (on each implementation's backward)."""
    for sq, sk in [(1, 1), (17, 5), (5, 17), (65, 129)]:
        check_bwd(1, 2, 1, sq, sk, 64, torch.bfloat16, True)
        check_bwd(1, 2, 2, sq, sk, 128, torch.float16, False, layout="bshd", deterministic=True)


@pytest.mark.cuda
def test_compile_fullgraph_fwd_bwd_cuda():
    def f(q, k, v):
        return GF.flash_attention(q, k, v, causal=True, layout="bshd")[0]

    q, k, v = rand_qkv(2, 4, 2, 100, 100, 64, torch.bfloat16, "cuda", "bshd", requires_grad=True)
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    cf = torch.compile(f, fullgraph=True)
    _, g = grads_of(lambda: (cf(q, k, v), torch.zeros(1, device="cuda")), (q, k, v), dout)
    g = [t.clone() for t in g]
    _, g_eager = grads_of(lambda: (f(q, k, v), torch.zeros(1, device="cuda")), (q, k, v), dout)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
