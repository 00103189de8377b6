"""Emulated flash attention kernels (csrc/attention/: forward, backward incl. deterministic dq and
dlse, split-KV decode, GQA, bshd, padded head dims, KV cache) with the CUDA tests' criterion (error
<= 2 x PyTorch's low-precision error).

Cases run in a worker process by the shared harness (tests/emulator/harness.py: what a pass shows
and what it does not, how it runs); the kernels are compiled unchanged with g++ against the CPU
emulator in tests/emulator/.

    python -m pytest -q tests/test_emulated_attention.py
    python tests/test_emulated_attention.py [-k SUBSTRING]   (plain runner, prints a summary)
"""
from __future__ import annotations

import ctypes
import math
import sys

import pytest
import torch

from emulator import harness
from emulator.harness import DTYPE_CODE, DTYPES, Case, assert_path, bind, check, huge_view, poison, ptr


# ---- cases ------------------------------------------------------------------------------------------

def _attention_cases():
    A = "attention"
    f = "run_attention"
    return [
        Case("attn-fwd-bf16-d64-gqa2-17x113-causal", A, f, dict(dtype="bf16", B=1, Hq=2, Hkv=1, Sq=17, Sk=113, D=64,
                                                                   causal=True)),
        Case("attn-fwd-fp16-d128-113x17-bshd", A, f, dict(dtype="fp16", B=1, Hq=2, Hkv=2, Sq=113, Sk=17, D=128,
                                                           causal=False, layout="bshd")),
        Case("attn-fwd-bf16-d40-65x129-causal", A, f, dict(dtype="bf16", B=1, Hq=2, Hkv=1, Sq=65, Sk=129, D=40,
                                                            causal=True)),
        Case("attn-fwd-bf16-d64-gqa2-17x113-causal-greedy", A, f, dict(dtype="bf16", B=1, Hq=2, Hkv=1, Sq=17, Sk=113, D=64,
                                                                   causal=True), thread_order=3),
        Case("attn-fwd-fp16-d96-1x1", A, f, dict(dtype="fp16", B=1, Hq=1, Hkv=1, Sq=1, Sk=1, D=96, causal=True)),
        Case("attn-fwd-bf16-d64-b2-130x130-causal-reverse", A, f,
             dict(dtype="bf16", B=2, Hq=2, Hkv=2, Sq=130, Sk=130, D=64, causal=True), thread_order=1, block_order=1),
        Case("attn-fwd-bf16-d64-kvcache-2x200-causal", A, f,
             dict(dtype="bf16", B=3, Hq=4, Hkv=1, Sq=2, Sk=200, D=64, causal=True, layout="bshd",
                  kv_lens=[200, 1, 0])),
        Case("attn-decode-bf16-d64-kvcache-2x200-causal", A, f,
             dict(dtype="bf16", B=3, Hq=4, Hkv=1, Sq=2, Sk=200, D=64, causal=True, layout="bshd",
                  kv_lens=[200, 1, 0], decode=True)),
        Case("attn-decode-fp16-d128-1x300-sms132", A, f,
             dict(dtype="fp16", B=2, Hq=8, Hkv=2, Sq=1, Sk=300, D=128, causal=False, layout="bshd",
                  kv_lens=[300, 77], decode=True), sms=132),
        Case("attn-bwd-bf16-d64-gqa2-17x113-causal-greedy", A, f,
             dict(dtype="bf16", B=1, Hq=2, Hkv=1, Sq=17, Sk=113, D=64, causal=True, bwd=True), thread_order=3),
        Case("attn-bwd-fp16-d128-65x129-bshd-deterministic", A, f,
             dict(dtype="fp16", B=1, Hq=2, Hkv=2, Sq=65, Sk=129, D=128, causal=False, layout="bshd", bwd=True,
                  deterministic=True)),
        Case("attn-bwd-bf16-d64-113x17-causal-dlse-greedy-reverse", A, f,
             dict(dtype="bf16", B=1, Hq=2, Hkv=2, Sq=113, Sk=17, D=64, causal=True, bwd=True, with_dlse=True),
             thread_order=4),
        Case("attn-fwd-bwd-bf16-d64-kv-batch-stride-2^31", A, f,
             dict(dtype="bf16", B=2, Hq=2, Hkv=1, Sq=20, Sk=40, D=64, causal=True, bwd=True,
                  huge_kv_batch_stride=2**31 + 64)),
        # one CTA walks several key blocks (deterministic dq with 1 SM: a single dq slice)
        Case("attn-bwd-bf16-d64-40x260-deterministic-sms1-greedy", A, f,
             dict(dtype="bf16", B=1, Hq=2, Hkv=1, Sq=40, Sk=260, D=64, causal=False, bwd=True, deterministic=True),
             sms=1, thread_order=3),
        Case("attn-bwd-bf16-d40-33x70-causal-shuffled", A, f,
             dict(dtype="bf16", B=1, Hq=2, Hkv=1, Sq=33, Sk=70, D=40, causal=True, bwd=True),
             thread_order=2, block_order=2),
    ]


CASES = _attention_cases()


# ---- attention ---------------------------------------------------------------------------------------------------

def _bhsd_strides(t, layout):
    """(batch, head, row) element strides of t viewed in (B, H, S, D) order, 0 for size-1 dims (as the
    binding passes them)."""
    tb = t if layout == "bhsd" else t.transpose(1, 2)
    return [tb.stride(i) if tb.size(i) != 1 else 0 for i in range(3)]


def run_attention(lib, dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout="bhsd", kv_lens=None, decode=False, bwd=False,
                  deterministic=False, with_dlse=False, huge_kv_batch_stride=0):
    import test_attention as ta  # the CUDA tests' criterion: error <= 2 x PyTorch's low-precision error
    from gptkernels.ops import attention as A

    dt = DTYPES[dtype]
    torch.manual_seed(B * 1000 + Sq * 7 + Sk)
    q, k, v = ta.rand_qkv(B, Hq, Hkv, Sq, Sk, D, dt, "cpu", layout)
    keep = []
    if huge_kv_batch_stride:  # K/V batches more than 2^31 elements apart (bhsd): 64-bit batch offsets
        assert layout == "bhsd"
        for name in ("k", "v"):
            made = huge_view((B, Hkv, Sk, D), (huge_kv_batch_stride, Sk * D, D, 1), dt)
            if made is None:
                pytest.skip("cannot map the address space lazily here")
            t, mm = made
            t.copy_(k if name == "k" else v)
            keep.append(mm)
            if name == "k":
                k = t
            else:
                v = t
    kl = None
    if kv_lens is not None:
        kl = torch.tensor(kv_lens, dtype=torch.int32)
        for b, n in enumerate(kv_lens):  # a cache past its fill holds garbage that must never be read
            if layout == "bshd":
                k[b, n:], v[b, n:] = float("nan"), float("nan")
            else:
                k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    scale = 1.0 / math.sqrt(D)
    out = poison(torch.empty_like(q))
    lse = poison(torch.empty(B, Hq, Sq))
    vp = ctypes.c_void_p
    ptrs = (vp * 4)(*[t.data_ptr() for t in (q, k, v, out)])
    strides = (ctypes.c_int64 * 12)(*sum((_bhsd_strides(t, layout) for t in (q, k, v, out)), []))
    dims = (ctypes.c_int * 8)(B, Hq, Hkv, Sq, Sk, D, int(causal), DTYPE_CODE[dt])
    n_sms = lib.gptk_emu_num_sms()
    args = (ptrs, strides, ptr(lse), ptr(kl), dims, ctypes.c_float(scale))
    fargs = [ctypes.c_void_p, ctypes.c_void_p, vp, vp, ctypes.c_void_p, ctypes.c_float]
    if decode:
        splits = bind(lib, "emu_flash_decode_num_splits", ctypes.c_int, *fargs, ctypes.c_int)(*args, n_sms)
        nbytes = bind(lib, "emu_flash_decode_workspace", ctypes.c_int64, *fargs, ctypes.c_int)(*args, splits)
        ws = torch.empty(nbytes, dtype=torch.uint8)
        check(lib, bind(lib, "emu_flash_decode", ctypes.c_int, *fargs, vp, ctypes.c_int)(*args, ptr(ws), splits),
              "flash_decode")
    else:
        check(lib, bind(lib, "emu_flash_fwd", ctypes.c_int, *fargs)(*args), "flash_fwd")
    kr = k if kl is None else k.nan_to_num(0.0)  # (the reference masks keys past kv_lens)
    vr = v if kl is None else v.nan_to_num(0.0)
    ref, lse_ref = A.attention_ref(q, kr, vr, causal, scale, layout, kl, upcast=True)
    base, _ = A.attention_ref(q, kr, vr, causal, scale, layout, kl, upcast=False)
    ta.assert_2x("out", out, ref, base, dt)
    assert not lse.isnan().any(), "lse: NaN"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref)), "lse: -inf rows differ"
    fin = torch.isfinite(lse_ref)
    if fin.any():
        assert ta.max_err(lse[fin], lse_ref[fin]) <= 1e-3 * max(1.0, lse_ref[fin].abs().max().item()), "lse"
    if decode:
        assert_path(lib, r"flash_decode", True)
    else:
        assert_path(lib, r"flash_fwd_kernel", True)
    if not bwd:
        return
    dout = torch.randn(q.shape, dtype=dt)
    dlse = torch.randn(B, Hq, Sq) if with_dlse else None
    dq, dk, dv = (poison(torch.empty_like(t)) for t in (q, k, v))
    bptrs = (vp * 8)(*[t.data_ptr() for t in (q, k, v, out, dout, dq, dk, dv)])
    bstrides = (ctypes.c_int64 * 24)(*sum((_bhsd_strides(t, layout) for t in (q, k, v, out, dout, dq, dk, dv)), []))
    bdims = (ctypes.c_int * 9)(B, Hq, Hkv, Sq, Sk, D, int(causal), DTYPE_CODE[dt], int(deterministic))
    bargs = (bptrs, bstrides, ptr(lse), ptr(dlse), bdims, ctypes.c_float(scale))
    splits = bind(lib, "emu_flash_bwd_dq_splits", ctypes.c_int, *fargs, ctypes.c_int)(*bargs, n_sms)
    nbytes = bind(lib, "emu_flash_bwd_workspace", ctypes.c_int64, *fargs, ctypes.c_int)(*bargs, splits)
    ws = torch.empty(nbytes, dtype=torch.uint8)
    lib.gptk_emu_reset()
    check(lib, bind(lib, "emu_flash_bwd", ctypes.c_int, *fargs, vp, ctypes.c_int)(*bargs, ptr(ws), splits), "flash_bwd")
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    _, g_ref = ta.grads_of(lambda: A.attention_ref(q32, k32, v32, causal, scale, layout, upcast=True),
                           (q32, k32, v32), dout, dlse)
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _, g_base = ta.grads_of(lambda: A.attention_ref(qb, kb, vb, causal, scale, layout, upcast=False), (qb, kb, vb),
                            dout, dlse)
    for name, got, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv), g_ref, g_base):
        ta.assert_2x(name, got, r, b, dt)
    assert_path(lib, r"flash_bwd_kernel", True)


emu_results, test_emulated = harness.pytest_tests(__file__, CASES)

if __name__ == "__main__":
    sys.exit(harness.main(__file__, CASES, sys.argv))
