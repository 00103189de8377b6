"""Emulated attention variants (issue 16) on the sm80 kernels: sliding window, softcap and varlen
(packed sequences), in the forward, the backward (incl. deterministic dq, GQA head slices, dlse) and
the split-KV forward (CUDA-core decode kernel and tensor-core split path), alone and combined.

The expected values come from `ref_attention` below: an explicit-mask fp32 formulation of the
contract (per sequence with Sq_b queries and Sk_b keys, offset = Sk_b - Sq_b, key j visible to query
i iff j < Sk_b and (wl < 0 or j >= i + offset - wl) and (wr < 0 or j <= i + offset + wr); causal is
wr = 0; scores s = scale * q.k, capped to cap * tanh(s / cap) when softcap > 0; a row that sees no
key gives out = 0 and lse = -inf). Gradients are autograd's through it. The criterion is the CUDA
tests' (error <= 2 x the same math in the low-precision dtype + a floor).

Cases run in a worker process by the shared harness (tests/emulator/harness.py); the kernels are
compiled unchanged with g++ against the CPU emulator.

    python -m pytest -q tests/test_emulated_attention_variants.py
    python tests/test_emulated_attention_variants.py [-k SUBSTRING]
"""
from __future__ import annotations

import ctypes
import json
import math
import sys

import torch

from emulator import harness
from emulator.harness import DTYPE_CODE, DTYPES, Case, assert_path, bind, check, poison, ptr

A, F = "attention", "run_variant"


# ---- reference ----------------------------------------------------------------------------------

def ref_attention(q, k, v, scale, window=(-1, -1), softcap=0.0, kv_len=None, upcast=True):
    """One sequence: q (Hq, Sq, D), k/v (Hkv, Sk, D) -> out (Hq, Sq, D), lse (Hq, Sq) (fp32 math when
    upcast, else in q's dtype). Differentiable (rows without keys give constant zeros / -inf)."""
    dt = torch.float32 if upcast else q.dtype
    hq, sq, _ = q.shape
    hkv, sk, _ = k.shape
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    k = k.repeat_interleave(hq // hkv, 0)
    v = v.repeat_interleave(hq // hkv, 0)
    s = (q @ k.transpose(1, 2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    n = sk if kv_len is None else kv_len
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    off = n - sq
    wl, wr = window
    vis = j < n
    if wl >= 0:
        vis = vis & (j >= i + off - wl)
    if wr >= 0:
        vis = vis & (j <= i + off + wr)
    any_row = vis.any(-1)  # (Sq,)
    s = s.masked_fill(~vis, float("-inf"))
    s = torch.where(any_row[None, :, None], s, torch.zeros((), dtype=dt))
    lse = torch.logsumexp(s.float(), -1).to(dt)
    p = torch.exp(s - lse[..., None]) * any_row[None, :, None]
    out = (p @ v).to(q.dtype if not upcast else torch.float32)
    lse = torch.where(any_row[None, :], lse, torch.full((), float("-inf"), dtype=dt)).float()
    return out, lse


def ref_batch(q, k, v, scale, window, softcap, seqs, upcast):
    """seqs: per sequence (q rows, k rows, kv_len or None) as slices into q (Hq, total_q, D) and k/v
    (Hkv, total_k, D); returns out (Hq, total_q, D) and lse (Hq, total_q) (rows outside every sequence:
    0 / -inf, never compared)."""
    outs, lses = [], []
    for qs, ks, kl in seqs:
        o, l = ref_attention(q[:, qs], k[:, ks], v[:, ks], scale, window, softcap, kl, upcast)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 1), torch.cat(lses, 1)


# ---- cases --------------------------------------------------------------------------------------

def C(id, sms=4, thread_order=0, block_order=0, cc=90, **kw):
    return Case(id, A, F, kw, sms=sms, thread_order=thread_order, block_order=block_order, compute_capability=cc)


def _window_cases():
    """Windows at and around every tile edge (forward tiles 128 x 128 at d=64 and 128 x 64 at d=128;
    backward 128 x 128 and 64 x 128), left-only, right-only, with causal, wider than the sequence."""
    cases = []
    for D, dt, sq, sk, w, causal in [
        (64, "bf16", 300, 300, (0, 0), False), (64, "bf16", 300, 300, (1, 1), False),
        (64, "bf16", 400, 400, (127, -1), False), (64, "fp16", 400, 400, (128, -1), False),
        (64, "bf16", 400, 400, (129, -1), False), (64, "bf16", 260, 400, (-1, 127), False),
        (64, "bf16", 260, 400, (-1, 129), False), (64, "bf16", 300, 300, (128, -1), True),
        (128, "bf16", 200, 260, (63, 0), False), (128, "fp16", 200, 260, (64, 64), False),
        (128, "bf16", 200, 260, (65, 1), False), (128, "bf16", 150, 40, (5, -1), True),
        (64, "bf16", 100, 90, (1000, 1000), False), (64, "bf16", 100, 90, (2, 3000), False),
    ]:
        tag = f"w{w[0]}_{w[1]}{'-causal' if causal else ''}"
        cases.append(C(f"fwd-{dt}-d{D}-{sq}x{sk}-{tag}", dtype=dt, B=1, Hq=2, Hkv=1, Sq=sq, Sk=sk, D=D,
                       causal=causal, window=w))
    for D, dt, sq, sk, w, causal, extra in [
        (64, "bf16", 300, 300, (0, 0), False, {}), (64, "bf16", 300, 300, (129, -1), True, {}),
        (64, "fp16", 200, 330, (127, 1), False, {}), (64, "bf16", 330, 200, (-1, 128), False, {}),
        (128, "bf16", 200, 260, (63, 65), False, {}), (128, "fp16", 130, 130, (64, -1), True, {"with_dlse": True}),
        (128, "bf16", 70, 260, (1, 0), False, {}),
    ]:
        tag = f"w{w[0]}_{w[1]}{'-causal' if causal else ''}"
        cases.append(C(f"bwd-{dt}-d{D}-{sq}x{sk}-{tag}", dtype=dt, B=1, Hq=2, Hkv=1, Sq=sq, Sk=sk, D=D,
                       causal=causal, window=w, bwd=True, **extra))
    cases += [
        C("bwd-bf16-d64-gqa4-hs2-200x300-w70_3-deterministic", dtype="bf16", B=1, Hq=4, Hkv=1, Sq=200, Sk=300,
          D=64, causal=False, window=(70, 3), bwd=True, head_splits=2, deterministic=True,
          schedules=[(1, 1), (4, 2)]),
        C("fwd-bwd-bf16-d64-b2-bshd-140x140-w20-causal-shuffled", dtype="bf16", B=2, Hq=2, Hkv=2, Sq=140, Sk=140,
          D=64, causal=True, window=(20, -1), bwd=True, layout="bshd", thread_order=2, block_order=2),
        # the split-KV forward: CUDA-core kernel (<= 16 rows per K/V head) and tensor-core splits (a
        # window bounded on both sides caps the splits at what its wl + wr + Sq keys fill)
        C("decode-bf16-d64-gqa4-1x700-w100-causal-kvlens-sms132", dtype="bf16", B=3, Hq=8, Hkv=2, Sq=1, Sk=700,
          D=64, causal=True, window=(100, -1), kv_lens=[700, 50, 0], decode=True, sms=132, expect_splits=(2, 2)),
        C("decode-fp16-d128-4x500-w17_2-sms132", dtype="fp16", B=2, Hq=4, Hkv=1, Sq=4, Sk=500, D=128,
          causal=False, window=(17, 2), kv_lens=[500, 260], decode=True, sms=132),
        C("decode-bf16-d64-2x300-w0_0-greedy", dtype="bf16", B=1, Hq=2, Hkv=2, Sq=2, Sk=300, D=64, causal=False,
          window=(0, 0), decode=True, thread_order=3),
        C("splitkv-bf16-d128-40x1000-w200-causal-kvlens-sms132", dtype="bf16", B=2, Hq=2, Hkv=2, Sq=40, Sk=1000,
          D=128, causal=True, window=(200, -1), kv_lens=[1000, 333], decode=True, sms=132, expect_splits=(2, 2)),
        C("splitkv-fp16-d64-64x600-w-1_5-sms132", dtype="fp16", B=1, Hq=2, Hkv=1, Sq=64, Sk=600, D=64,
          causal=False, window=(-1, 5), decode=True, sms=132, expect_splits=(2, 64)),
        C("fwd-bwd-bf16-d64-70x130-w10_3-sm80", dtype="bf16", B=1, Hq=2, Hkv=1, Sq=70, Sk=130, D=64,
          causal=False, window=(10, 3), bwd=True, cc=80),
    ]
    return cases


def _softcap_cases():
    """Scores of magnitude up to ~30-60 (q scaled up) so that the cap matters."""
    return [
        C("fwd-bf16-d64-130x200-softcap1", dtype="bf16", B=1, Hq=2, Hkv=1, Sq=130, Sk=200, D=64, causal=False,
          softcap=1.0, qmul=8.0),
        C("fwd-fp16-d128-100x150-softcap30-causal", dtype="fp16", B=1, Hq=2, Hkv=2, Sq=100, Sk=150, D=128,
          causal=True, softcap=30.0, qmul=8.0),
        C("bwd-bf16-d64-130x140-softcap1-causal", dtype="bf16", B=1, Hq=2, Hkv=1, Sq=130, Sk=140, D=64,
          causal=True, softcap=1.0, qmul=4.0, bwd=True),
        C("bwd-fp16-d128-70x200-softcap30-dlse-deterministic", dtype="fp16", B=1, Hq=2, Hkv=1, Sq=70, Sk=200,
          D=128, causal=False, softcap=30.0, qmul=8.0, bwd=True, with_dlse=True, deterministic=True,
          schedules=[(2, 2)]),
        C("decode-bf16-d128-1x400-softcap30-kvlens-sms132", dtype="bf16", B=2, Hq=4, Hkv=1, Sq=1, Sk=400, D=128,
          causal=True, softcap=30.0, qmul=8.0, kv_lens=[400, 3], decode=True, sms=132),
        C("splitkv-fp16-d64-20x500-softcap1-sms132", dtype="fp16", B=1, Hq=2, Hkv=2, Sq=20, Sk=500, D=64,
          causal=True, softcap=1.0, qmul=8.0, decode=True, sms=132, expect_splits=(2, 64)),
        C("fwd-bwd-bf16-d64-150x150-softcap5-w40_0", dtype="bf16", B=1, Hq=2, Hkv=1, Sq=150, Sk=150, D=64,
          causal=True, window=(40, -1), softcap=5.0, qmul=4.0, bwd=True),
    ]


# Varlen: sequence lengths (q, k) per sequence, incl. length 1 and 17, an empty sequence, a sequence
# with queries but no keys, Sq != Sk, a sequence over one tile.
SEQS_A = [(1, 1), (17, 17), (0, 0), (5, 0), (130, 140), (20, 3), (3, 40)]
SEQS_DEC = [(1, 1), (1, 300), (0, 0), (1, 0), (2, 17), (1, 129)]
SEQS_SPLIT = [(17, 17), (40, 600), (0, 5), (33, 0), (64, 250)]


def _varlen_cases():
    return [
        C("varlen-fwd-bf16-d64-gqa2", dtype="bf16", seqs=SEQS_A, Hq=4, Hkv=2, D=64, causal=False),
        C("varlen-fwd-fp16-d128-causal-shuffled", dtype="fp16", seqs=SEQS_A, Hq=2, Hkv=1, D=128, causal=True,
          thread_order=2, block_order=2),
        C("varlen-fwd-bwd-bf16-d64-causal-gqa2-hs2", dtype="bf16", seqs=SEQS_A, Hq=4, Hkv=2, D=64, causal=True,
          bwd=True, head_splits=2),
        C("varlen-fwd-bwd-fp16-d128-dlse", dtype="fp16", seqs=SEQS_A, Hq=2, Hkv=2, D=128, causal=False, bwd=True,
          with_dlse=True),
        C("varlen-bwd-bf16-d64-gqa4-hs4-deterministic-sms2", dtype="bf16", seqs=SEQS_A + [(10, 300)], Hq=4, Hkv=1,
          D=64, causal=True, bwd=True, head_splits=4, deterministic=True, schedules=[(1, 1), (3, 2)], sms=2),
        C("varlen-bwd-fp16-d64-deterministic-dqsplits-sms132", dtype="fp16", seqs=[(40, 300), (7, 260), (0, 9)],
          Hq=2, Hkv=2, D=64, causal=False, bwd=True, deterministic=True, schedules=[(1, 1), (2, 2)], sms=132),
        C("varlen-decode-bf16-d64-gqa8-sms132", dtype="bf16", seqs=SEQS_DEC, Hq=8, Hkv=1, D=64, causal=True,
          decode=True, sms=132, expect_splits=(2, 64)),
        C("varlen-decode-fp16-d128-gqa2-unsplit-sms1", dtype="fp16", seqs=SEQS_DEC, Hq=4, Hkv=2, D=128,
          causal=False, decode=True, sms=1),
        C("varlen-splitkv-bf16-d128-sms132", dtype="bf16", seqs=SEQS_SPLIT, Hq=2, Hkv=1, D=128, causal=True,
          decode=True, sms=132, expect_splits=(2, 64)),
        C("varlen-packed-qkv-view-bf16-d64", dtype="bf16", seqs=[(1, 1), (17, 17), (0, 0), (130, 130), (5, 5)], Hq=2, Hkv=2, D=64, causal=True,
          packed_qkv=True, bwd=True),
        # combinations
        C("varlen-fwd-bwd-bf16-d64-w9_2-softcap3-gqa2", dtype="bf16", seqs=SEQS_A, Hq=4, Hkv=2, D=64, causal=False,
          window=(9, 2), softcap=3.0, qmul=4.0, bwd=True),
        C("varlen-fwd-bwd-fp16-d128-w64-causal-softcap30-deterministic", dtype="fp16", seqs=SEQS_A + [(200, 200)],
          Hq=2, Hkv=1, D=128, causal=True, window=(64, -1), softcap=30.0, qmul=8.0, bwd=True, deterministic=True,
          schedules=[(4, 1)]),
        C("varlen-decode-bf16-d64-w5-softcap2-sms132", dtype="bf16", seqs=SEQS_DEC, Hq=4, Hkv=1, D=64, causal=True,
          window=(5, -1), softcap=2.0, qmul=4.0, decode=True, sms=132),
        C("varlen-splitkv-fp16-d64-w30_4-softcap10-sms132", dtype="fp16", seqs=SEQS_SPLIT, Hq=2, Hkv=2, D=64,
          causal=False, window=(30, 4), softcap=10.0, qmul=4.0, decode=True, sms=132),
        C("varlen-fwd-bwd-bf16-d64-sm80", dtype="bf16", seqs=SEQS_A, Hq=2, Hkv=1, D=64, causal=True, bwd=True,
          window=(16, -1), cc=80),
    ]


CASES = _window_cases() + _softcap_cases() + _varlen_cases()


# ---- running a case -----------------------------------------------------------------------------

VP = ctypes.c_void_p
FARGS = [VP, VP, VP, VP, VP, ctypes.c_float]


def _set_variants(lib, window, softcap, cu_q=None, cu_k=None, total_q=0, total_k=0):
    bind(lib, "emu_attn_set_variants", None, ctypes.c_int, ctypes.c_int, ctypes.c_float, VP, VP, ctypes.c_int,
         ctypes.c_int)(window[0], window[1], softcap, ptr(cu_q) if cu_q is not None else None,
                       ptr(cu_k) if cu_k is not None else None, total_q, total_k)


def _strides(t, varlen, layout):
    """(batch, head, row) element strides: (B, H, S, D) views, or (total, H, D) varlen tensors."""
    if varlen:
        return [0, t.stride(1) if t.size(1) != 1 else 0, t.stride(0) if t.size(0) != 1 else 0]
    tb = t if layout == "bhsd" else t.transpose(1, 2)
    return [tb.stride(i) if tb.size(i) != 1 else 0 for i in range(3)]


def _assert_lse(lse, lse_ref):
    assert not lse.isnan().any(), "lse: NaN"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), "lse: -inf rows differ"
    fin = torch.isfinite(lse_ref)
    if fin.any():
        err = (lse[fin] - lse_ref[fin]).abs().max().item()
        assert err <= 1e-3 * max(1.0, lse_ref[fin].abs().max().item()), f"lse: error {err}"


def run_variant(lib, dtype, Hq, Hkv, D, causal, B=1, Sq=0, Sk=0, seqs=None, window=(-1, -1), softcap=0.0, qmul=1.0,
                layout="bhsd", kv_lens=None, decode=False, bwd=False, deterministic=False, with_dlse=False,
                head_splits=0, schedules=(), expect_splits=None, packed_qkv=False):
    try:
        _run_variant(lib, dtype, Hq, Hkv, D, causal, B, Sq, Sk, seqs, window, softcap, qmul, layout, kv_lens, decode,
                     bwd, deterministic, with_dlse, head_splits, schedules, expect_splits, packed_qkv)
    finally:
        _set_variants(lib, (-1, -1), 0.0)


def _run_variant(lib, dtype, Hq, Hkv, D, causal, B, Sq, Sk, seqs, window, softcap, qmul, layout, kv_lens, decode,
                 bwd, deterministic, with_dlse, head_splits, schedules, expect_splits, packed_qkv):
    import test_attention as ta  # the CUDA tests' criterion (assert_2x)

    dt = DTYPES[dtype]
    varlen = seqs is not None
    torch.manual_seed(Hq * 100 + D + (len(seqs) if varlen else Sq * 7 + Sk))
    scale = 1.0 / math.sqrt(D)
    # effective window as the contract states it (causal = right side 0)
    wl, wr = window
    if causal:
        wr = 0
    if varlen:
        B = len(seqs)
        lq = [a for a, _ in seqs]
        lk = [b for _, b in seqs]
        cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
        cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
        tq, tk = int(cu_q[-1]), int(cu_k[-1])
        Sq, Sk = max(lq), max(lk)
        if packed_qkv:  # q, k, v as views of one (total, 3, H, D) tensor (row stride 3*H*D)
            assert tq == tk and Hq == Hkv
            qkv = torch.randn(tq, 3, Hq, D).to(dt)
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            q.mul_(qmul)
        else:
            q = (torch.randn(tq, Hq, D) * qmul).to(dt)
            k = torch.randn(tk, Hkv, D).to(dt)
            v = torch.randn(tk, Hkv, D).to(dt)
        out = poison(torch.empty(tq, Hq, D, dtype=dt))
        lse = poison(torch.empty(Hq, tq))
        ref_seqs = [(slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1])), None)
                    for b in range(B)]
        qh, kh, vh = (t.transpose(0, 1) for t in (q, k, v))  # (H, total, D)
        kl = None
        _set_variants(lib, window, softcap, cu_q, cu_k, tq, tk)
    else:
        q, k, v = ta.rand_qkv(B, Hq, Hkv, Sq, Sk, D, dt, "cpu", layout)
        q = (q.float() * qmul).to(dt)
        out = poison(torch.empty_like(q))
        lse = poison(torch.empty(B, Hq, Sq))
        kl = None
        if kv_lens is not None:
            kl = torch.tensor(kv_lens, dtype=torch.int32)
            for b, n in enumerate(kv_lens):  # a cache past its fill is never read
                if layout == "bshd":
                    k[b, n:], v[b, n:] = float("nan"), float("nan")
                else:
                    k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
        _set_variants(lib, window, softcap)
        # per batch row b: one "sequence" of the flattened (H, B*S, D) views
        bh = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
        qh, kh, vh = (bh(t).transpose(0, 1).reshape(t.shape[1 if layout == "bhsd" else 2], -1, D)
                      for t in (q, k.nan_to_num(0.0), v.nan_to_num(0.0)))
        ref_seqs = [(slice(b * Sq, (b + 1) * Sq), slice(b * Sk, (b + 1) * Sk), None if kl is None else kv_lens[b])
                    for b in range(B)]

    ts = (q, k, v, out)
    ptrs = (VP * 4)(*[t.data_ptr() for t in ts])
    strides = (ctypes.c_int64 * 12)(*sum((_strides(t, varlen, layout) for t in ts), []))
    dims = (ctypes.c_int * 8)(B, Hq, Hkv, Sq, Sk, D, int(causal), DTYPE_CODE[dt])
    n_sms = lib.gptk_emu_num_sms()
    args = (ptrs, strides, ptr(lse), ptr(kl), dims, ctypes.c_float(scale))
    if decode:
        splits = bind(lib, "emu_flash_decode_num_splits", ctypes.c_int, *FARGS, ctypes.c_int)(*args, n_sms)
        if expect_splits is not None:
            assert expect_splits[0] <= splits <= expect_splits[1], f"num_splits {splits} not in {expect_splits}"
        nbytes = bind(lib, "emu_flash_decode_workspace", ctypes.c_int64, *FARGS, ctypes.c_int)(*args, splits)
        ws = torch.empty(nbytes, dtype=torch.uint8)
        check(lib, bind(lib, "emu_flash_decode", ctypes.c_int, *FARGS, VP, ctypes.c_int)(*args, ptr(ws), splits),
              "flash_decode")
        assert_path(lib, r"flash_decode_kernel" if Sq * (Hq // Hkv) <= 16 else r"flash_fwd_kernel", True)
    else:
        check(lib, bind(lib, "emu_flash_fwd", ctypes.c_int, *FARGS)(*args), "flash_fwd")
        assert_path(lib, r"flash_fwd_kernel", True)
    if softcap > 0 and not (decode and Sq * (Hq // Hkv) <= 16):
        assert_path(lib, r"flash_fwd_kernel.*kSoftcap = true", True)  # the softcap instantiation ran

    # expected values, per sequence, on (H, rows, D) views
    ref, lse_ref = ref_batch(qh, kh, vh, scale, (wl, wr), softcap, ref_seqs, True)
    base, _ = ref_batch(qh, kh, vh, scale, (wl, wr), softcap, ref_seqs, False)
    if varlen:
        got, got_lse = out.transpose(0, 1), lse
    else:
        got = (out if layout == "bhsd" else out.transpose(1, 2)).transpose(0, 1).reshape(Hq, -1, D)
        got_lse = lse.transpose(0, 1).reshape(Hq, -1)
    ta.assert_2x("out", got, ref, base, dt)
    _assert_lse(got_lse, lse_ref)
    if not bwd:
        return

    dout = torch.randn(out.shape).to(dt)
    dlse = torch.randn(lse.shape) if with_dlse else None
    dq, dk, dv = (poison(torch.empty(t.shape, dtype=dt)) for t in (q, k, v))
    bts = (q, k, v, out, dout, dq, dk, dv)
    bptrs = (VP * 8)(*[t.data_ptr() for t in bts])
    bstrides = (ctypes.c_int64 * 24)(*sum((_strides(t, varlen, layout) for t in bts), []))
    bdims = (ctypes.c_int * 10)(B, Hq, Hkv, Sq, Sk, D, int(causal), DTYPE_CODE[dt], int(deterministic), 1)
    bargs = (bptrs, bstrides, ptr(lse), ptr(dlse), bdims, ctypes.c_float(scale))
    bdims[9] = head_splits or bind(lib, "emu_flash_bwd_head_splits", ctypes.c_int, *FARGS, ctypes.c_int)(*bargs, n_sms)
    splits = bind(lib, "emu_flash_bwd_dq_splits", ctypes.c_int, *FARGS, ctypes.c_int)(*bargs, n_sms)
    nbytes = bind(lib, "emu_flash_bwd_workspace", ctypes.c_int64, *FARGS, ctypes.c_int)(*bargs, splits)
    ws = torch.empty(nbytes, dtype=torch.uint8)
    lib.gptk_emu_reset()
    run_bwd = bind(lib, "emu_flash_bwd", ctypes.c_int, *FARGS, VP, ctypes.c_int)
    check(lib, run_bwd(*bargs, ptr(ws), splits), "flash_bwd")
    assert_path(lib, r"flash_bwd_kernel.*kSoftcap = " + ("true" if softcap > 0 else "false"), True)
    if schedules:  # a deterministic backward gives the same bits under any block / thread order
        assert deterministic
        first = [t.clone() for t in (dq, dk, dv)]
        for thread_order, block_order in schedules:
            for t in (dq, dk, dv):
                poison(t)
            lib.gptk_emu_configure(n_sms, 0, thread_order, block_order, 4321, 0xff)
            check(lib, run_bwd(*bargs, ptr(ws), splits), "flash_bwd")
            for name, a, b in zip(("dq", "dk", "dv"), first, (dq, dk, dv)):
                assert torch.equal(a, b), f"{name}: deterministic backward differs under schedule {thread_order, block_order}"

    # reference gradients: autograd through ref_batch, in fp32 and in the low precision
    if varlen:
        dout_h, dlse_h = dout.transpose(0, 1), dlse
        to_h = lambda t: t.transpose(0, 1)  # noqa: E731
        grads_got = [to_h(t) for t in (dq, dk, dv)]
    else:
        to_h = lambda t: (t if layout == "bhsd" else t.transpose(1, 2)).transpose(0, 1).reshape(t.shape[1 if layout == "bhsd" else 2], -1, D)  # noqa: E731
        dout_h = to_h(dout)
        dlse_h = None if dlse is None else dlse.transpose(0, 1).reshape(Hq, -1)
        grads_got = [to_h(t) for t in (dq, dk, dv)]
    kref = kh.detach()
    vref = vh.detach()

    def grads(upcast):
        qq, kk, vv = (t.detach().clone().to(torch.float32 if upcast else dt).requires_grad_() for t in (qh, kref, vref))
        o, l = ref_batch(qq, kk, vv, scale, (wl, wr), softcap, ref_seqs, upcast)
        loss = (o.float() * dout_h.float()).sum()
        if dlse_h is not None:
            loss = loss + torch.where(torch.isfinite(l), l * dlse_h, torch.zeros(())).sum()
        return torch.autograd.grad(loss, (qq, kk, vv), allow_unused=True)

    g_ref, g_base = grads(True), grads(False)
    for name, got_g, r, b in zip(("dq", "dk", "dv"), grads_got, g_ref, g_base):
        r = torch.zeros_like(got_g, dtype=torch.float32) if r is None else r
        b = torch.zeros_like(got_g) if b is None else b
        if not varlen and kv_lens is not None:
            pass
        ta.assert_2x(name, got_g, r, b, dt)


def run_limits(lib):
    """The emulated build's limits JSON lists exactly the variants this file tests."""
    f = bind(lib, "emu_attn_limits_json", ctypes.c_char_p)
    lim = json.loads(f().decode())
    assert lim["variants"] == ["window", "softcap", "varlen"], lim["variants"]


def run_bad_values(lib):
    """The launchers refuse bad variant values (problem_error: the binding's messages say the same)
    instead of launching: a window side < -1, causal with a right side > 0, a negative or non-finite
    softcap, varlen with only one of the cu_seqlens."""
    dt = torch.bfloat16
    q = torch.randn(1, 1, 8, 64).to(dt)
    out, lse = torch.empty_like(q), torch.empty(1, 1, 8)
    ptrs = (VP * 4)(*[t.data_ptr() for t in (q, q, q, out)])
    strides = (ctypes.c_int64 * 12)(*([512, 512, 64] * 4))
    fwd = bind(lib, "emu_flash_fwd", ctypes.c_int, *FARGS)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    for causal, window, softcap, cu_q in [(False, (-2, -1), 0.0, None), (False, (3, -5), 0.0, None),
                                          (True, (-1, 3), 0.0, None), (False, (-1, -1), -1.0, None),
                                          (False, (-1, -1), float("inf"), None), (False, (-1, -1), float("nan"), None),
                                          (False, (-1, -1), 0.0, cu)]:
        _set_variants(lib, window, softcap, cu_q, None, 8, 8)
        try:
            dims = (ctypes.c_int * 8)(1, 1, 1, 8, 8, 64, int(causal), DTYPE_CODE[dt])
            err = fwd(ptrs, strides, ptr(lse), None, dims, ctypes.c_float(0.125))
        finally:
            _set_variants(lib, (-1, -1), 0.0)
        assert err != 0, f"accepted causal={causal} window={window} softcap={softcap} cu_q={cu_q is not None}"
        assert not harness.launches(lib), "launched a kernel for a refused call"


CASES.append(Case("limits-json-variants", A, "run_limits", {}))
CASES.append(Case("bad-variant-values-refused", A, "run_bad_values", {}))

emu_results, test_emulated = harness.pytest_tests(__file__, CASES)

if __name__ == "__main__":
    sys.exit(harness.main(__file__, CASES, sys.argv))
