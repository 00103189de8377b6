"""Emulated Hopper attention backward (csrc/attention/sm90/flash_bwd_sm90_kernel.cuh: TMA ring of Q / dO /
lse / delta, wgmma with transposed shared-memory operands, warp specialisation) between the sm_80 path's
preprocess and convert kernels, as flash_bwd runs it. Gradients are checked against attention_bwd_ref
(gptkernels/ops/attention.py, in fp32) with the CUDA tests' criterion (error <= 2 x the error of PyTorch's
low-precision autograd), on lengths a few rows / keys from the 64- and 128-wide tile edges: bf16 / fp16,
head dims 64 and 128 (and a padded one), causal and full, Sq != Sk both ways, GQA / MQA with and without
head_splits, dlse, both layouts, thread schedules of the harness; deterministic mode (dq_splits slices)
bit for bit equal under several thread and block orders.

What a pass shows and does not: see tests/test_emulated_attention_sm90.py (the kernel's logic under
the emulator's model of the PTX ISA, not its behaviour on hardware; not run on a GPU).

    python -m pytest -q tests/test_emulated_attention_sm90_bwd.py
    python tests/test_emulated_attention_sm90_bwd.py [-k SUBSTRING]
"""
from __future__ import annotations

import ctypes
import math
import sys

import torch

from emulator import harness
from emulator.harness import DTYPE_CODE, DTYPES, Case, assert_path, bhsd_strides, bind, check, poison, ptr

F = "run_attention_sm90_bwd"
FAMILY = "attention_sm90"
ROW_PAD = 128  # flash.h kBwdRowPad


def _case(name, thread_order=0, block_order=0, **kw):
    kw.setdefault("B", 1)
    kw.setdefault("Hkv", kw.get("Hq", 1))
    return Case(f"attn-sm90-bwd-{name}", FAMILY, F, kw, thread_order=thread_order, block_order=block_order)


# adversarial schedules for the deterministic cases: (thread order, block order), see harness.Case
SCHEDULES = [(1, 1), (2, 2), (3, 1), (4, 2)]

CASES = [
    _case("bf16-d64-1x1", dtype="bf16", Hq=1, Sq=1, Sk=1, D=64, causal=False),
    _case("fp16-d128-1x1-causal", dtype="fp16", Hq=2, Sq=1, Sk=1, D=128, causal=True),
    # kBlockM = 128 at d = 64 (127 / 129 rows), kBlockN = 128 keys
    _case("bf16-d64-127x129", dtype="bf16", Hq=2, Sq=127, Sk=129, D=64, causal=False),
    # kBlockM = 64 at d = 128 (63 / 65 rows), the diagonal crossing query blocks
    _case("fp16-d128-65x63-causal", dtype="fp16", Hq=1, Sq=65, Sk=63, D=128, causal=True),
    _case("bf16-d128-129x255-causal-gqa2", dtype="bf16", Hq=2, Hkv=1, Sq=129, Sk=255, D=128, causal=True),
    _case("fp16-d64-130x130-causal-bshd-dlse", dtype="fp16", Hq=2, Sq=130, Sk=130, D=64, causal=True, layout="bshd",
          with_dlse=True),
    # Sq > Sk causal: the first query rows see no key (lse -inf: P = 0), Sq < Sk: whole key blocks per query
    _case("bf16-d64-300x17-causal", dtype="bf16", Hq=1, Sq=300, Sk=17, D=64, causal=True),
    _case("fp16-d128-17x300-causal-gqa2-hs2", dtype="fp16", Hq=2, Hkv=1, Sq=17, Sk=300, D=128, causal=True,
          head_splits=2),
    _case("bf16-d64-65x129-causal-mqa4-hs2-bshd", dtype="bf16", Hq=4, Hkv=1, Sq=65, Sk=129, D=64, causal=True,
          layout="bshd", head_splits=2),
    # the ring wraps many times (3 query blocks x 2 heads per key block), non-causal
    _case("fp16-d64-300x130-gqa2", dtype="fp16", Hq=2, Hkv=1, Sq=300, Sk=130, D=64, causal=False),
    # head dims that are not 64 / 128: TMA zero-fills the columns past d, stores and atomics skip them
    _case("bf16-d40-33x70-causal", dtype="bf16", Hq=2, Hkv=1, Sq=33, Sk=70, D=40, causal=True),
    _case("fp16-d96-70x40-dlse", dtype="fp16", Hq=1, Sq=70, Sk=40, D=96, causal=False, with_dlse=True),
    # thread schedules: greedy (one warp runs ahead to its next wait), reverse, shuffled
    _case("bf16-d64-129x255-causal-gqa2-greedy", dtype="bf16", Hq=2, Hkv=1, Sq=129, Sk=255, D=64, causal=True,
          thread_order=3),
    _case("fp16-d128-66x130-greedy-high", dtype="fp16", Hq=1, Sq=66, Sk=130, D=128, causal=False, thread_order=4),
    _case("bf16-d128-b2-63x129-causal-bshd-shuffled", dtype="bf16", B=2, Hq=2, Sq=63, Sk=129, D=128, causal=True,
          layout="bshd", thread_order=2, block_order=2),
    # deterministic: dq_splits slices, several key blocks per CTA (K/V reloaded), bitwise equal under schedules
    _case("fp16-d128-40x300-causal-deterministic-dqsplits2", dtype="fp16", Hq=2, Sq=40, Sk=300, D=128,
          causal=True, deterministic=True, dq_splits=2, schedules=SCHEDULES),
    _case("bf16-d64-129x260-gqa2-hs2-deterministic-dqsplits3", dtype="bf16", Hq=4, Hkv=2, Sq=129, Sk=260, D=64,
          causal=False, deterministic=True, dq_splits=3, head_splits=2, schedules=SCHEDULES),
    # what the sm90 backward refuses (the caller then runs the sm_80 kernel): strides TMA cannot take
    _case("refuses-unaligned-row-stride", dtype="bf16", Hq=1, Sq=8, Sk=8, D=64, causal=False, k_row_pad=4,
          expect_refusal=True),
]


def _inputs(dt, B, Hq, Hkv, Sq, Sk, D, layout, k_row_pad):
    import test_attention as ta

    torch.manual_seed(B * 1000 + Sq * 7 + Sk + D)
    q, k, v = ta.rand_qkv(B, Hq, Hkv, Sq, Sk, D, dt, "cpu", layout)
    if k_row_pad:  # k with rows k_row_pad elements longer than D: a row stride TMA refuses
        assert layout == "bhsd"
        k = torch.randn(B, Hkv, Sk, D + k_row_pad, dtype=dt)[..., :D]
    return q, k, v


def run_attention_sm90_bwd(lib, dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout="bhsd", with_dlse=False,
                           deterministic=False, dq_splits=1, head_splits=1, schedules=(), k_row_pad=0,
                           expect_refusal=False):
    import test_attention as ta  # the CUDA tests' criterion: error <= 2 x PyTorch's low-precision error
    from gptkernels.ops import attention as A

    dt = DTYPES[dtype]
    q, k, v = _inputs(dt, B, Hq, Hkv, Sq, Sk, D, layout, k_row_pad)
    scale = 1.0 / math.sqrt(D)
    out, lse = A.attention_ref(q, k, v, causal, scale, layout, upcast=True)  # what the forward saved
    dout = torch.randn(q.shape, dtype=dt)
    dlse = torch.randn(B, Hq, Sq) if with_dlse else None
    dq, dk, dv = (poison(torch.empty_like(t)) for t in (q, k, v))
    sq_pad = (Sq + ROW_PAD - 1) // ROW_PAD * ROW_PAD
    lse_log2 = poison(torch.empty(B * Hq * sq_pad))
    delta = poison(torch.empty(B * Hq * sq_pad))
    dq_accum = torch.zeros(dq_splits * B * Hq * Sq * D)
    dkv = [poison(torch.empty(head_splits * B * Hkv * Sk * D)) if head_splits > 1 else None for _ in range(2)]
    vp = ctypes.c_void_p
    ws = (vp * 5)(*[ptr(t).value for t in (lse_log2, delta, dq_accum, *dkv)])
    tensors = (q, k, v, out, dout, dq, dk, dv)
    bptrs = (vp * 8)(*[t.data_ptr() for t in tensors])
    bstrides = (ctypes.c_int64 * 24)(*sum((bhsd_strides(t, layout) for t in tensors), []))
    bdims = (ctypes.c_int * 11)(B, Hq, Hkv, Sq, Sk, D, int(causal), DTYPE_CODE[dt], int(deterministic), head_splits,
                                dq_splits)
    args = (bptrs, bstrides, ptr(lse), ptr(dlse), bdims, ctypes.c_float(scale), ws)
    fargs = [vp, vp, vp, vp, vp, ctypes.c_float, vp]
    reason = bind(lib, "emu_flash_bwd_sm90_unsupported", ctypes.c_char_p, *fargs)(*args)
    run = bind(lib, "emu_flash_bwd_sm90", ctypes.c_int, *fargs)
    if expect_refusal:
        assert reason is not None and b"TMA" in reason, reason
        assert run(*args) == 801, "expected cudaErrorNotSupported (801)"
        assert not [ln for ln in harness.launches(lib) if "flash_bwd_sm90_kernel" in ln], harness.launches(lib)
        return
    assert reason is None, reason
    check(lib, run(*args), "flash_bwd (sm90)")
    assert_path(lib, r"flash_bwd_sm90_kernel", True)
    if schedules:  # a deterministic backward gives the same bits under any block / thread order
        assert deterministic
        first = [t.clone() for t in (dq, dk, dv)]
        n_sms = lib.gptk_emu_num_sms()
        for thread_order, block_order in schedules:
            for t in (dq, dk, dv):
                poison(t)
            dq_accum.zero_()
            lib.gptk_emu_configure(n_sms, 0, thread_order, block_order, 4321 + thread_order, 0xff)
            check(lib, run(*args), "flash_bwd (sm90)")
            for name, a, b in zip(("dq", "dk", "dv"), first, (dq, dk, dv)):
                assert torch.equal(a, b), f"{name}: deterministic backward differs under schedule {thread_order, block_order}"
    g_ref = A.attention_bwd_ref(dout.float(), q.float(), k.float(), v.float(), out.float(), lse, dlse, causal, scale,
                                layout)
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _, g_base = ta.grads_of(lambda: A.attention_ref(qb, kb, vb, causal, scale, layout, upcast=False), (qb, kb, vb),
                            dout, dlse)
    for name, got, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv), g_ref, g_base):
        ta.assert_2x(name, got, r, b, dt)


emu_results, test_emulated = harness.pytest_tests(__file__, CASES)

if __name__ == "__main__":
    sys.exit(harness.main(__file__, CASES, sys.argv))
