"""Attention variants (issue 16): variable-length batches, sliding windows, softcap.

The oracle here is `naive`: the spec's visibility rule and the capped softmax written as loops over
heads and query rows in float64, independent of gptkernels.ops.attention_ref (under test). Checked:
the references, the torch path's functions (run directly on the CPU), flash_attention(_varlen)
(the reference path on the CPU), the op registrations' Python functions, input checks, compile.
"""
import pytest
import torch

import gptkernels
from gptkernels import _backend
from gptkernels.ops import attention as A
from gptkernels.ops import attention_torch as AT

EXT = _backend.EXT_LOADED and hasattr(torch.ops.gptkernels, "flash_attn_fwd")
HAS_VARLEN_OPS = EXT and hasattr(torch.ops.gptkernels, "flash_attn_varlen_fwd")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def naive(q, k, v, causal, scale, window=(-1, -1), softcap=0.0):
    """One sequence: q (Sq, Hq, D), k/v (Sk, Hkv, D) -> (out (Sq, Hq, D), lse (Hq, Sq)) in float64."""
    q, k, v = q.double(), k.double(), v.double()
    Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[0], k.shape[1]
    wl, wr = window
    if causal:
        wr = 0
    rows_out, rows_lse = [], []
    for h in range(Hq):
        kh, vh = k[:, h // (Hq // Hkv)], v[:, h // (Hq // Hkv)]
        outs, lses = [], []
        for i in range(Sq):
            seen = [j for j in range(Sk) if (wl < 0 or j >= i + Sk - Sq - wl) and (wr < 0 or j <= i + Sk - Sq + wr)]
            if not seen:
                outs.append(q.new_zeros(D))
                lses.append(q.new_tensor(float("-inf")))
                continue
            s = (kh[seen] @ q[i, h]) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            lses.append(torch.logsumexp(s, 0))
            outs.append(torch.softmax(s, 0) @ vh[seen])
        rows_out.append(torch.stack(outs) if outs else q.new_zeros(0, D))
        rows_lse.append(torch.stack(lses) if lses else q.new_zeros(0))
    return torch.stack(rows_out, 1), torch.stack(rows_lse, 0)


def naive_varlen(q, k, v, cu_q, cu_k, causal, scale, window=(-1, -1), softcap=0.0):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    parts = [naive(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], causal, scale, window, softcap)
             for b in range(len(cq) - 1)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], 1)


def packed(lens_q, lens_k, hq=4, hkv=2, d=8, dtype=torch.float32, device="cpu"):
    """Packed q/k/v (leaf tensors requiring grad) and int32 cu_seqlens."""
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32,  # noqa: E731
                                   device=device)
    mk = lambda n, h: torch.randn(n, h, d, dtype=dtype, device=device).requires_grad_()  # noqa: E731
    return mk(sum(lens_q), hq), mk(sum(lens_k), hkv), mk(sum(lens_k), hkv), cu(lens_q), cu(lens_k)


def grads_of(fn, tensors, dout, dlse_w=0.7):
    """(out, lse, *grads) of fn(*tensors) under loss = <out, dout> + dlse_w * sum(finite lse)."""
    ts = [t.detach().clone().requires_grad_() for t in tensors]
    out, lse = fn(*ts)
    seen = torch.isfinite(lse)
    ((out.double() * dout.double()).sum() + dlse_w * lse.double().masked_fill(~seen, 0.0).sum()).backward()
    return [out.detach(), lse.detach()] + [t.grad for t in ts]


def assert_all_close(got, want, tol=2e-5):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=tol, rtol=tol)


# the length mixes: lengths 1 and 17, an empty sequence, a sequence with queries but no keys
LENS = [([3, 1, 17, 0, 5], [3, 1, 17, 0, 5]), ([2, 1, 17, 4, 0], [5, 1, 20, 0, 3])]
VARIANTS = [dict(), dict(causal=True), dict(window=(3, 2)), dict(causal=True, window=(4, -1)),
            dict(softcap=2.0), dict(causal=True, window=(2, 0), softcap=1.5)]


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
def test_varlen_matches_naive_and_per_sequence_dense(lens, kw, hq, hkv):
    """flash_attention_varlen (reference path on the CPU), attention_varlen_loop (the torch path's
    loop over SDPA / chunked math) and a loop of dense flash_attention calls all equal naive: out,
    lse and the gradients (also through lse)."""
    torch.manual_seed(0)
    q, k, v, cu_q, cu_k = packed(*lens, hq=hq, hkv=hkv)
    mq, mk = max(lens[0]), max(lens[1])
    scale = 0.4
    dout = torch.randn(q.shape)

    def dense_loop(q, k, v):
        outs, lses = [], []
        for (q0, q1), (k0, k1) in zip(zip(cu_q.tolist(), cu_q.tolist()[1:]), zip(cu_k.tolist(), cu_k.tolist()[1:])):
            o, l = gptkernels.flash_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], scale=scale,
                                              layout="bshd", **kw)
            outs.append(o[0])
            lses.append(l[0])
        return torch.cat(outs), torch.cat(lses, 1)

    fns = {
        "api": lambda q, k, v: gptkernels.flash_attention_varlen(q, k, v, cu_q, cu_k, mq, mk, scale=scale, **kw),
        "loop": lambda q, k, v: AT.attention_varlen_loop(q, k, v, cu_q, cu_k, kw.get("causal", False), scale,
                                                         kw.get("window", (-1, -1)), kw.get("softcap", 0.0)),
        "dense": dense_loop,
    }
    want = grads_of(lambda q, k, v: naive_varlen(q, k, v, cu_q, cu_k, kw.get("causal", False), scale,
                                                 kw.get("window", (-1, -1)), kw.get("softcap", 0.0)),
                    (q.double(), k.double(), v.double()), dout)
    for name, fn in fns.items():
        got = grads_of(fn, (q, k, v), dout)
        assert got[0].shape == q.shape and got[1].shape == (hq, q.shape[0]), name
        assert got[0].is_contiguous() and got[1].dtype == torch.float32, name
        assert torch.equal(torch.isfinite(got[1]), torch.isfinite(want[1])), name
        assert_all_close(got, want)
    # a query row that sees no key: zeros out, -inf lse
    assert (want[0][~torch.isfinite(want[1]).T] == 0).all()


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("sq,sk", [(6, 6), (3, 9), (9, 4), (1, 7)])
@pytest.mark.parametrize("kw", VARIANTS[2:] + [dict(window=(0, 0)), dict(window=(-1, 1))])
def test_dense_window_softcap_match_naive(layout, sq, sk, kw):
    """attention_ref and attention_torch (run directly: SDPA with the window mask, the chunked softcap
    computation) equal naive with the bottom-right aligned window, GQA, both layouts."""
    torch.manual_seed(1)
    B, hq, hkv, D = 2, 4, 2, 8
    shape = lambda h, s: (B, h, s, D) if layout == "bhsd" else (B, s, h, D)  # noqa: E731
    q, k, v = torch.randn(shape(hq, sq)), torch.randn(shape(hkv, sk)), torch.randn(shape(hkv, sk))
    dout = torch.randn(q.shape)
    causal, window, softcap = kw.get("causal", False), kw.get("window", (-1, -1)), kw.get("softcap", 0.0)

    def naive_dense(q, k, v):
        qs, ks, vs = (A.to_bhsd(t, layout).transpose(1, 2) for t in (q, k, v))  # (B, S, H, D)
        parts = [naive(qs[b], ks[b], vs[b], causal, 0.3, window, softcap) for b in range(B)]
        out = torch.stack([p[0] for p in parts])  # (B, Sq, H, D)
        return (out if layout == "bshd" else out.transpose(1, 2)), torch.stack([p[1] for p in parts])

    want = grads_of(naive_dense, (q.double(), k.double(), v.double()), dout)
    for fn in (A.attention_ref, A.attention_torch):
        got = grads_of(lambda q, k, v: fn(q, k, v, causal, 0.3, layout, window=window, softcap=softcap), (q, k, v),
                       dout)
        assert_all_close(got, want)


@pytest.mark.parametrize("kw", VARIANTS)
def test_bwd_refs_match_autograd(kw):
    """attention_bwd_ref / attention_varlen_bwd_ref (the written-out backward, with the tanh
    derivative) equal autograd through naive, with a gradient into lse."""
    torch.manual_seed(2)
    causal, window, softcap = kw.get("causal", False), kw.get("window", (-1, -1)), kw.get("softcap", 0.0)
    q, k, v, cu_q, cu_k = packed(*LENS[1])
    dout = torch.randn(q.shape)
    want = grads_of(lambda q, k, v: naive_varlen(q, k, v, cu_q, cu_k, causal, 0.4, window, softcap),
                    (q.double(), k.double(), v.double()), dout)
    out, lse = A.attention_varlen_ref(q.detach(), k.detach(), v.detach(), cu_q, cu_k, causal, 0.4, window, softcap)
    dlse = torch.full_like(lse, 0.7)
    got = A.attention_varlen_bwd_ref(dout, q.detach(), k.detach(), v.detach(), out, lse, dlse, cu_q, cu_k, causal,
                                     0.4, window, softcap)
    assert_all_close(got, want[2:])
    # dense: the third sequence (17 queries, 20 keys) as batch 1 in "bshd"
    a, b, c, d = 3, 20, 6, 26
    want_d = grads_of(lambda q, k, v: naive(q, k, v, causal, 0.4, window, softcap),
                      (q[a:b].double(), k[c:d].double(), v[c:d].double()), dout[a:b])
    qd, kd, vd = (t.detach()[None, s] for t, s in ((q, slice(a, b)), (k, slice(c, d)), (v, slice(c, d))))
    out, lse = A.attention_ref(qd, kd, vd, causal, 0.4, "bshd", window=window, softcap=softcap)
    got = A.attention_bwd_ref(dout[None, a:b], qd, kd, vd, out, lse, torch.full_like(lse, 0.7), causal, 0.4, "bshd",
                              window=window, softcap=softcap)
    assert_all_close([g[0] for g in got], want_d[2:])


def test_window_edge_cases():
    """(-1, 0) is causal; a window wider than the sequence is no window; causal + (w, -1) = (w, 0)."""
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    for fn in (gptkernels.flash_attention, A.attention_torch):
        causal = fn(q, k, v, True)
        for got, want in ((fn(q, k, v, window=(-1, 0)), causal), (fn(q, k, v, window=(100, 0)), causal),
                          (fn(q, k, v, window=(100, 100)), fn(q, k, v)), (fn(q, k, v, True, window=(100, -1)), causal),
                          (fn(q, k, v, True, window=(2, -1)), fn(q, k, v, window=(2, 0)))):
            assert_all_close(got, want, tol=1e-6)
    cu = torch.tensor([0, 7], dtype=torch.int32)
    out, lse = gptkernels.flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu,
                                                 torch.tensor([0, 9], dtype=torch.int32), 7, 9, window=(-1, 0))
    ref = gptkernels.flash_attention(q[:1], k[:1], v[:1], True)
    assert_all_close((out.transpose(0, 1)[None], lse[None]), ref, tol=1e-6)


def test_varlen_strided_views_of_packed_qkv():
    """q/k/v as views of one packed (total, 3, H, D) tensor give the contiguous inputs' results."""
    torch.manual_seed(4)
    qkv = torch.randn(12, 3, 2, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    got = gptkernels.flash_attention_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 7, 7, causal=True)
    want = gptkernels.flash_attention_varlen(*(qkv[:, i].contiguous() for i in range(3)), cu, cu, 7, 7, causal=True)
    assert_all_close(got, want, tol=0)


def _bad_calls():
    q, k, v = torch.randn(10, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cq, ck = torch.tensor([0, 3, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    V = lambda *a, **kw: (lambda: gptkernels.flash_attention_varlen(*a, **kw))  # noqa: E731
    dq, dk = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    D = lambda **kw: (lambda: gptkernels.flash_attention(dq, dk, dk, **kw))  # noqa: E731
    return [
        (V(q, k, v, i32(0, 5, 3, 10), i32(0, 5, 6, 12), 7, 7), "cu_seqlens_q: must be non-decreasing"),
        (V(q, k, v, cq, i32(0, 12), 7, 12), "cu_seqlens_k: expected 3 entries"),
        (V(q, k, v, cq.long(), ck, 7, 7), "cu_seqlens_q: expected dtype int32"),
        (V(q, k, v, cq.float(), ck, 7, 7), "cu_seqlens_q: expected dtype int32"),
        (V(q, k, v, i32(1, 3, 10), ck, 7, 7), "cu_seqlens_q: must start at 0"),
        (V(q, k, v, i32(0, 3, 9), ck, 7, 7), "cu_seqlens_q: last entry 9 does not match the 10 rows of q"),
        (V(q, k, v, cq, i32(0, 5, 11), 7, 7), "cu_seqlens_k: last entry 11 does not match the 12 rows of k"),
        (V(q, k, v, cq, ck, 6, 7), r"max_seqlen_q: 6 is smaller than the longest sequence \(7\)"),
        (V(q, k, v, cq, ck, 7, 6), r"max_seqlen_k: 6 is smaller than the longest sequence \(7\)"),
        (V(q, k, v, cq, ck, 7, -1), "max_seqlen_k: expected an int >= 0"),
        (V(q, k, v, cq[None], ck, 7, 7), "cu_seqlens_q: expected 1 dimensions"),
        (V(q, k, v, cq, ck, 7, 7, window=(-2, 0)), "window: each side must be -1"),
        (V(q, k, v, cq, ck, 7, 7, window=(3, -5)), "window: each side must be -1"),
        (V(q, k, v, cq, ck, 7, 7, window=3), "window: expected a pair of ints"),
        (V(q, k, v, cq, ck, 7, 7, window=(1.5, 0)), "window: expected a pair of ints"),
        (V(q, k, v, cq, ck, 7, 7, window=(1, 2, 3)), "window: expected a pair of ints"),
        (V(q, k, v, cq, ck, 7, 7, causal=True, window=(4, 2)), "with causal=True the right side must be -1 or 0"),
        (V(q, k, v, cq, ck, 7, 7, softcap=-1.0), "softcap: expected a finite number >= 0"),
        (V(q, k, v, cq, ck, 7, 7, softcap=float("inf")), "softcap: expected a finite number >= 0"),
        (V(q, k, v, cq, ck, 7, 7, softcap=float("nan")), "softcap: expected a finite number >= 0"),
        (V(q, k, v, cq, ck, 7, 7, softcap="big"), "softcap: expected a number"),
        (V(q[None], k, v, cq, ck, 7, 7), "q: expected 3 dimensions"),
        (V(q, k, v[:, :1], cq, ck, 7, 7), "v: expected the shape of k"),
        (V(q, k[:, :, :4], v[:, :, :4], cq, ck, 7, 7), "k: head dim 4 does not match q's head dim 8"),
        (V(q, torch.randn(12, 3, 8), torch.randn(12, 3, 8), cq, ck, 7, 7), "k: its 3 heads must divide q's 4"),
        (V(q, k.half(), v.half(), cq, ck, 7, 7), "k has dtype float16 but q has float32"),
        (D(window=(-3, -1)), "window: each side must be -1"),
        (D(causal=True, window=(2, 1)), "with causal=True the right side must be -1 or 0"),
        (D(softcap=-0.5), "softcap: expected a finite number >= 0"),
        (D(window=(True, 0)), "window: expected a pair of ints"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_input_names_the_argument(i):
    call, msg = _bad_calls()[i]
    with pytest.raises(ValueError, match=msg):
        call()


def test_check_inputs_false_skips_the_value_checks():
    q, k, v = torch.randn(10, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    cq, ck = torch.tensor([0, 3, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        gptkernels.flash_attention_varlen(q, k, v, cq, ck, 1, 7)
    out, _ = gptkernels.flash_attention_varlen(q, k, v, cq, ck, 1, 7, check_inputs=False)  # (the reference reads cu)
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="cu_seqlens_q: expected dtype int32"):  # shapes/dtypes still checked
        gptkernels.flash_attention_varlen(q, k, v, cq.long(), ck, 7, 7, check_inputs=False)


def test_compile_varlen_cpu():
    """torch.compile (fullgraph=False: the reference reads cu_seqlens on the host) gives eager's
    out, lse and gradients."""
    torch.manual_seed(5)
    q, k, v, cu_q, cu_k = packed([3, 0, 6], [4, 2, 6])

    def f(q, k, v):
        out, lse = gptkernels.flash_attention_varlen(q, k, v, cu_q, cu_k, 6, 6, causal=True, window=(3, 0),
                                                     softcap=2.0)
        return out, lse

    dout = torch.randn(q.shape)
    got = grads_of(torch.compile(f, fullgraph=False, backend="aot_eager"), (q, k, v), dout)
    assert_all_close(got, grads_of(f, (q, k, v), dout), tol=1e-6)


def test_lse_grad_functions_cpu():
    """_LseGrad / _VarlenLseGrad (the gradient into lse that torch's varlen_attn backward ignores),
    given the reference's lse, add exactly autograd's d lse / d(q, k)."""
    torch.manual_seed(6)
    q, k, v, cu_q, cu_k = packed(*LENS[0])
    w = torch.randn(4, q.shape[0])
    zero = torch.zeros(q.shape)
    want = grads_of(lambda q, k, v: (torch.zeros_like(q),
                                     A.attention_varlen_ref(q, k, v, cu_q, cu_k, True, 0.4, (3, 0))[1] * w),
                    (q, k, v), zero)
    lse = A.attention_varlen_ref(q, k, v, cu_q, cu_k, True, 0.4, (3, 0))[1].detach()
    got = grads_of(lambda q, k, v: (torch.zeros_like(q) + 0 * v.sum(),
                                    AT._VarlenLseGrad.apply(q, k, lse, cu_q, cu_k, 0.4, True, (3, 0)) * w),
                   (q, k, v), zero)
    assert_all_close(got[2:4], want[2:4])
    qd, kd = torch.randn(2, 4, 6, 8, requires_grad=True), torch.randn(2, 2, 6, 8, requires_grad=True)
    wd = torch.randn(2, 4, 6)
    lse_r = A.attention_ref(qd, kd, kd, False, 0.4, window=(1, 2))[1]
    (lse_r * wd).sum().backward()
    want = [qd.grad.clone(), kd.grad.clone()]
    qd.grad = kd.grad = None
    (AT._LseGrad.apply(qd, kd, lse_r.detach(), 0.4, False, (1, 2), 0.0) * wd).sum().backward()
    assert_all_close([qd.grad, kd.grad], want)


# ---- the op registrations' Python functions (exercised through the ops once the C++ side has them) ---

class _Ctx:
    def save_for_backward(self, *ts):
        self.saved_tensors = ts


def test_registered_functions_cpu(monkeypatch):
    """The fake / CPU / autograd functions registered for flash_attn_{fwd,bwd,decode} (with the new
    trailing window_left, window_right, softcap, and without them) and flash_attn_varlen_*, called
    as Python functions: shapes and dtypes, CPU = reference, autograd = autograd of the reference."""
    torch.manual_seed(7)
    q, k, v, cu_q, cu_k = packed(*LENS[1])
    qd, kd, vd = (t.detach() for t in (q, k, v))
    args = (cu_q, cu_k, 17, 20, True, 0.4, 3, 0, 1.5)
    out, lse = A._varlen_fwd_cpu(qd, kd, vd, *args, False)
    want = A.attention_varlen_ref(qd, kd, vd, cu_q, cu_k, True, 0.4, (3, 0), 1.5)
    assert_all_close((out, lse), want, tol=0)
    for fake in (A._varlen_fwd_fake(qd, kd, vd, *args, False), A._varlen_decode_fake(qd, kd, vd, *args)):
        assert [(t.shape, t.dtype) for t in fake] == [(out.shape, out.dtype), (lse.shape, torch.float32)]
    assert_all_close(A._varlen_decode_cpu(qd, kd, vd, *args), want, tol=0)
    dout, dlse = torch.randn(q.shape), torch.full_like(lse, 0.7)
    grads = A._varlen_bwd_cpu(dout, qd, kd, vd, out, lse, dlse, *args, False)
    assert [g.shape for g in A._varlen_bwd_fake(dout, qd, kd, vd, out, lse, dlse, *args, False)] == \
        [g.shape for g in grads]
    auto = grads_of(lambda q, k, v: A.attention_varlen_ref(q, k, v, cu_q, cu_k, True, 0.4, (3, 0), 1.5), (q, k, v),
                    dout)
    assert_all_close(grads, auto[2:])
    ctx = _Ctx()  # the registered autograd (no varlen backward op here: the reference backward)
    monkeypatch.setattr(A, "_HAVE_VARLEN_BWD", False)
    A._varlen_setup(ctx, (qd, kd, vd, *args, False), (out, lse))
    back = A._varlen_backward(ctx, dout, dlse)
    assert len(back) == 13 and all(b is None for b in back[3:])
    assert_all_close(back[:3], auto[2:])

    # dense, the extended signature (11 / 14 arguments) and the old one (8 / 11)
    qb, kb, vb = (t[None, s] for t, s in ((qd, slice(3, 20)), (kd, slice(6, 26)), (vd, slice(6, 26))))
    o, l = A._fwd_cpu(qb, kb, vb, True, 0.4, "bshd", None, False, 3, 0, 1.5)
    assert_all_close((o, l), A.attention_ref(qb, kb, vb, True, 0.4, "bshd", window=(3, 0), softcap=1.5), tol=0)
    assert [t.shape for t in A._fwd_fake(qb, kb, vb, True, 0.4, "bshd", None, False, 3, 0, 1.5)] == [o.shape, l.shape]
    assert [t.shape for t in A._decode_fake(qb, kb, vb, True, 0.4, "bshd", None)] == [o.shape, l.shape]
    do = torch.randn(o.shape)
    monkeypatch.setattr(A, "_HAVE_BWD", False)
    for extra in ((3, 0, 1.5), ()):
        o, l = A._fwd_cpu(qb, kb, vb, True, 0.4, "bshd", None, False, *extra)
        ctx = _Ctx()
        A._setup(ctx, (qb, kb, vb, True, 0.4, "bshd", None, False, *extra), (o, l))
        back = A._backward(ctx, do, torch.full_like(l, 0.7))
        assert len(back) == 8 + len(extra)
        want = A._bwd_cpu(do, qb, kb, vb, o, l, torch.full_like(l, 0.7), True, 0.4, "bshd", False, *extra)
        assert_all_close(back[:3], want, tol=0)
        assert [g.shape for g in A._bwd_fake(do, qb, kb, vb, o, l, None, True, 0.4, "bshd", False, *extra)] == \
            [g.shape for g in want]


def test_variants_route_to_the_torch_path_until_the_kernels_name_them(monkeypatch):
    """_unsupported: a variant missing from LIMITS["variants"] is the reason a GPU call runs torch's
    path; variants_used folds causal into the window (plain causal is no variant)."""
    assert A.variants_used(-1, -1, 0.0) == () and A.variants_used(-1, 0, 0.0) == ()
    assert A.variants_used(5, 0, 0.0) == ("window",) and A.variants_used(-1, 3, 2.0) == ("window", "softcap")
    monkeypatch.setattr(A, "_VARIANT_ARGS", {"flash_attn_fwd": True, "flash_attn_decode": False})
    assert A._variant_args("flash_attn_fwd", -1, 0, 0.0) == (-1, 0, 0.0)  # causal as window_right = 0
    assert A._variant_args("flash_attn_decode", 4, 0, 1.0) == () and A._variant_args("flash_attn_bwd", 4, 0, 0) == ()
    for op in ("flash_attn_fwd", "flash_attn_bwd", "flash_attn_decode"):  # the built schemas, as they are
        assert A._takes_variant_args(op) == _schema_has(op, "window_left")
    if not EXT:
        pytest.skip("extension not built")
    monkeypatch.setattr(A, "_HAVE_FWD", True)
    q = torch.randn(1, 2, 3, 64, dtype=torch.bfloat16)
    base = dict(A.LIMITS, variants=[])
    monkeypatch.setattr(A, "LIMITS", base)
    assert A._unsupported(q, 64, 3, 3, 0.125, None, True) is None
    why = A._unsupported(q, 64, 3, 3, 0.125, None, True, ("varlen", "softcap"))
    assert "varlen, softcap" in why and _backend.decide(True, why, mode="auto", ext_loaded=True) == "torch"
    monkeypatch.setattr(A, "LIMITS", dict(base, variants=["window", "softcap", "varlen"]))
    assert A._unsupported(q, 64, 3, 3, 0.125, None, True, ("varlen", "window", "softcap")) is None
    assert A.FLASH_ATTENTION_VARLEN["torch"] is A._varlen_torch
    assert A.FLASH_ATTENTION_VARLEN["kernel"] is A._varlen_kernel


def _schema_has(op, arg):
    return EXT and hasattr(torch.ops.gptkernels, op) and arg in str(getattr(torch.ops.gptkernels, op).default._schema)


@pytest.mark.skipif(not HAS_VARLEN_OPS, reason="no flash_attn_varlen_* ops in this build of the extension")
@pytest.mark.parametrize("kw", [dict(causal=False, window=(-1, -1), softcap=0.0),
                                dict(causal=True, window=(3, 0), softcap=1.5)])
def test_opcheck_varlen_cpu(kw):
    q, k, v, cu_q, cu_k = packed(*LENS[1])
    a = (cu_q, cu_k, 17, 20, kw["causal"], 0.4, kw["window"][0], kw["window"][1], kw["softcap"])
    torch.library.opcheck(torch.ops.gptkernels.flash_attn_varlen_fwd, (q, k, v, *a, False))
    qd, kd, vd = (t.detach() for t in (q, k, v))
    if hasattr(torch.ops.gptkernels, "flash_attn_varlen_decode"):
        torch.library.opcheck(torch.ops.gptkernels.flash_attn_varlen_decode, (qd, kd, vd, *a))
    if hasattr(torch.ops.gptkernels, "flash_attn_varlen_bwd"):
        out, lse = A.attention_varlen_ref(qd, kd, vd, cu_q, cu_k, kw["causal"], 0.4, kw["window"], kw["softcap"])
        for dlse in (None, torch.randn_like(lse)):
            torch.library.opcheck(torch.ops.gptkernels.flash_attn_varlen_bwd,
                                  (torch.randn_like(out), qd, kd, vd, out, lse, dlse, *a, False))


@pytest.mark.skipif(not _schema_has("flash_attn_fwd", "window_left"),
                    reason="flash_attn_fwd has no window/softcap arguments in this build of the extension")
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_opcheck_dense_variants_cpu(layout):
    shape = lambda h, s: (2, h, s, 8) if layout == "bhsd" else (2, s, h, 8)  # noqa: E731
    q, k, v = (torch.randn(shape(h, s), requires_grad=True) for h, s in ((4, 5), (2, 7), (2, 7)))
    a = (True, 0.35, layout, None)
    torch.library.opcheck(torch.ops.gptkernels.flash_attn_fwd, (q, k, v, *a, False, 2, 0, 1.5))
    qd, kd, vd = (t.detach() for t in (q, k, v))
    if _schema_has("flash_attn_decode", "window_left"):
        torch.library.opcheck(torch.ops.gptkernels.flash_attn_decode, (qd, kd, vd, *a, 2, 0, 1.5))
    if _schema_has("flash_attn_bwd", "window_left"):
        out, lse = A.attention_ref(qd, kd, vd, True, 0.35, layout, window=(2, 0), softcap=1.5)
        out = out.contiguous()
        torch.library.opcheck(torch.ops.gptkernels.flash_attn_bwd,
                              (torch.randn_like(out), qd, kd, vd, out, lse, torch.randn_like(lse), True, 0.35, layout,
                               False, 2, 0, 1.5))


# ---- CUDA (the torch path: varlen_attn, SDPA with masks, the chunked softcap; the kernels once named) ---

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("kw", VARIANTS)
def test_varlen_cuda(dtype, same, kw):
    """flash_attention_varlen on a GPU against the fp32 reference of the same inputs: out and lse
    within the dtype's rounding, gradients (also through lse) likewise."""
    torch.manual_seed(8)
    lens = LENS[0] if same else LENS[1]
    q, k, v, cu_q, cu_k = packed(*lens, hq=4, hkv=2, d=64, dtype=dtype, device="cuda")
    if same:
        cu_k = cu_q
    dout = torch.randn(q.shape, device="cuda", dtype=dtype)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    fn = lambda q, k, v: gptkernels.flash_attention_varlen(q, k, v, cu_q, cu_k, 17, 20, **kw)  # noqa: E731
    got = grads_of(fn, (q, k, v), dout)
    want = grads_of(lambda q, k, v: A.attention_varlen_ref(q.float(), k.float(), v.float(), cu_q, cu_k,
                                                           kw.get("causal", False), 1 / 8, kw.get("window", (-1, -1)),
                                                           kw.get("softcap", 0.0)), (q, k, v), dout)
    assert torch.equal(torch.isfinite(got[1]), torch.isfinite(want[1]))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)


@needs_cuda
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("sq,sk", [(128, 128), (64, 200), (200, 64)])
@pytest.mark.parametrize("kw", VARIANTS[2:])
def test_dense_variants_cuda(layout, sq, sk, kw):
    """flash_attention with a window / softcap on a GPU (varlen_attn's sliding window for Sq == Sk,
    SDPA with the mask otherwise, the chunked softcap) against the fp32 reference."""
    torch.manual_seed(9)
    shape = lambda h, s: (2, h, s, 64) if layout == "bhsd" else (2, s, h, 64)  # noqa: E731
    q, k, v = (torch.randn(shape(h, s), device="cuda", dtype=torch.bfloat16) for h, s in ((4, sq), (2, sk), (2, sk)))
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16)
    got = grads_of(lambda q, k, v: gptkernels.flash_attention(q, k, v, layout=layout, **kw), (q, k, v), dout)
    want = grads_of(lambda q, k, v: A.attention_ref(q.float(), k.float(), v.float(), kw.get("causal", False), 1 / 8,
                                                    layout, window=kw.get("window", (-1, -1)),
                                                    softcap=kw.get("softcap", 0.0)), (q, k, v), dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("kw", [dict(window=(2, 1)), dict(causal=True, window=(3, 0)), dict(softcap=1.5, causal=True)])
def test_kv_lens_with_variants_match_naive(kw):
    """kv_lens (a cache filled to different lengths, garbage past the fill) with a window or softcap:
    the alignment uses kv_lens[b] in place of Sk, for the reference and the torch path."""
    torch.manual_seed(10)
    lens = [9, 4, 0]
    q, k, v = torch.randn(3, 3, 4, 8), torch.randn(3, 9, 2, 8), torch.randn(3, 9, 2, 8)
    for b, n in enumerate(lens):
        k[b, n:], v[b, n:] = 1e4, float("nan")
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    causal, window, softcap = kw.get("causal", False), kw.get("window", (-1, -1)), kw.get("softcap", 0.0)
    parts = [naive(q[b], k[b, :n], v[b, :n], causal, 0.3, window, softcap) for b, n in enumerate(lens)]
    want = (torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    for fn in (A.attention_ref, A.attention_torch):
        got = fn(q, k, v, causal, 0.3, "bshd", kv_lens, window=window, softcap=softcap)
        assert_all_close(got, want)


def test_compile_fullgraph_dense_variants_cpu():
    """flash_attention with a window and softcap traces in one graph (the checks are plain Python)."""
    def f(q, k, v):
        out, lse = gptkernels.flash_attention(q, k, v, causal=True, layout="bshd", window=(2, 0), softcap=3.0)
        return out.sum() + lse.sum()

    q, k, v = (torch.randn(2, 5, h, 8, requires_grad=True) for h in (4, 2, 2))
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    cf(q, k, v).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v).backward()
    assert_all_close(got, [t.grad for t in (q, k, v)], tol=1e-6)


def test_reference_propagates_nan():
    """A NaN score gives a NaN row (out and lse), never the -inf of a row that sees no key: the
    self-test tells a kernel that reads a cache past kv_lens by that NaN."""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    k[0, :, 1] = float("nan")
    out, lse = A.attention_ref(q, k, v)
    assert lse.isnan().all() and out.isnan().all()
