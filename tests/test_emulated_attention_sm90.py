"""Emulated Hopper attention forward (csrc/attention/sm90/: TMA, mbarrier ring, wgmma, warp
specialisation) with the CUDA tests' criterion (error <= 2 x PyTorch's low-precision error), on the
awkward shapes of the sm_80 kernel's grid plus lengths a few keys / rows from every 128-wide tile
edge of the sm90 kernel: bf16 / fp16, head dims 64 and 128 (and padded ones), causal and full,
Sq != Sk, GQA / MQA, kv_lens (NaN past them), both layouts, several ring wraps, and the thread
schedules of the harness (forward, reverse, shuffled, greedy).

The emulator (tests/emulator/) runs the kernel's PTX as the PTX ISA describes it and reports misuse
(a wait that can never complete, TMA writing shared memory an in-flight wgmma reads, wgmma reading
ordinary stores without fence.proxy.async, malformed descriptors, ...): a pass shows the logic of the
kernel -- layouts, descriptors, swizzle, barriers, pipeline phases -- not its behaviour on hardware.

    python -m pytest -q tests/test_emulated_attention_sm90.py
    python tests/test_emulated_attention_sm90.py [-k SUBSTRING]
"""
from __future__ import annotations

import ctypes
import math
import sys

import torch

from emulator import harness
from emulator.harness import DTYPE_CODE, DTYPES, Case, assert_path, bhsd_strides, bind, check, poison, ptr

F = "run_attention_sm90"
FAMILY = "attention_sm90"


def _case(name, thread_order=0, block_order=0, **kw):
    kw.setdefault("B", 1)
    kw.setdefault("Hkv", kw.get("Hq", 1))
    return Case(f"attn-sm90-{name}", FAMILY, F, kw, thread_order=thread_order, block_order=block_order)


CASES = [
    _case("bf16-d64-1x1", dtype="bf16", Hq=1, Sq=1, Sk=1, D=64, causal=False),
    _case("fp16-d128-1x1-causal", dtype="fp16", Hq=2, Sq=1, Sk=1, D=128, causal=True),
    _case("bf16-d64-127x129", dtype="bf16", Hq=2, Sq=127, Sk=129, D=64, causal=False),
    _case("fp16-d128-129x255-causal-gqa2", dtype="fp16", Hq=2, Hkv=1, Sq=129, Sk=255, D=128, causal=True),
    _case("bf16-d128-130x130-causal-bshd", dtype="bf16", Hq=2, Sq=130, Sk=130, D=128, causal=True, layout="bshd"),
    _case("fp16-d64-17x300-causal", dtype="fp16", Hq=2, Hkv=1, Sq=17, Sk=300, D=64, causal=True),
    # Sq > Sk, causal: whole query blocks see no key (zero rows, lse -inf) and partly empty ones
    _case("bf16-d64-300x17-causal", dtype="bf16", Hq=1, Sq=300, Sk=17, D=64, causal=True),
    _case("bf16-d64-256x384-causal", dtype="bf16", Hq=1, Sq=256, Sk=384, D=64, causal=True),
    _case("fp16-d128-2x513-causal-mqa", dtype="fp16", Hq=4, Hkv=1, Sq=2, Sk=513, D=128, causal=True),
    # ring wraps several times (9 key blocks): phases flip in both K and V rings
    _case("bf16-d64-64x1030", dtype="bf16", Hq=1, Sq=64, Sk=1030, D=64, causal=False),
    _case("fp16-d128-385x126-causal-gqa2", dtype="fp16", Hq=2, Hkv=1, Sq=385, Sk=126, D=128, causal=True),
    # kv_lens with NaN past them: inside a tile, at both edges of one, 0 and Sk
    _case("bf16-d64-kvlens-130x260-causal-bshd", dtype="bf16", B=5, Hq=2, Hkv=1, Sq=130, Sk=260, D=64, causal=True,
          layout="bshd", kv_lens=[260, 1, 0, 128, 129]),
    _case("fp16-d128-kvlens-70x300", dtype="fp16", B=3, Hq=2, Sq=70, Sk=300, D=128, causal=False,
          kv_lens=[127, 255, 0]),
    # head dims that are not 64 / 128: TMA zero-fills the columns past d, the store clips them
    _case("bf16-d40-65x129-causal", dtype="bf16", Hq=2, Hkv=1, Sq=65, Sk=129, D=40, causal=True),
    _case("fp16-d96-77x130-bshd", dtype="fp16", Hq=2, Sq=77, Sk=130, D=96, causal=False, layout="bshd"),
    _case("bf16-d8-33x70-causal", dtype="bf16", Hq=1, Sq=33, Sk=70, D=8, causal=True),
    # q, k, v as strided views of one fused projection (bshd, row stride (Hq + 2 Hkv) * D)
    _case("bf16-d64-fused-qkv-100x100-causal", dtype="bf16", Hq=4, Hkv=2, Sq=100, Sk=100, D=64, causal=True,
          layout="bshd", fused_qkv=True),
    # thread schedules: greedy (one warp runs ahead to its next wait), reverse, shuffled
    _case("bf16-d64-129x255-causal-gqa2-greedy", dtype="bf16", Hq=2, Hkv=1, Sq=129, Sk=255, D=64, causal=True,
          thread_order=3),
    _case("fp16-d128-130x260-greedy-high", dtype="fp16", Hq=1, Sq=130, Sk=260, D=128, causal=False, thread_order=4),
    _case("bf16-d128-b2-130x130-causal-reverse", dtype="bf16", B=2, Hq=2, Sq=130, Sk=130, D=128, causal=True,
          thread_order=1, block_order=1),
    _case("fp16-d64-kvlens-40x300-causal-shuffled", dtype="fp16", B=2, Hq=2, Hkv=1, Sq=40, Sk=300, D=64,
          causal=True, layout="bshd", kv_lens=[300, 131], thread_order=2, block_order=2),
    _case("bf16-d64-64x1030-causal-greedy", dtype="bf16", Hq=1, Sq=64, Sk=1030, D=64, causal=True, thread_order=3),
    # what the sm90 kernel refuses (the caller then runs the sm_80 kernel): strides TMA cannot take
    _case("refuses-unaligned-row-stride", dtype="bf16", Hq=1, Sq=8, Sk=8, D=64, causal=False, k_row_pad=4,
          expect_refusal=True),
]


def _inputs(dt, B, Hq, Hkv, Sq, Sk, D, layout, fused_qkv, k_row_pad):
    import test_attention as ta

    torch.manual_seed(B * 1000 + Sq * 7 + Sk + D)
    if fused_qkv:
        assert layout == "bshd" and Sq == Sk
        qkv = torch.randn(B, Sq, Hq + 2 * Hkv, D, dtype=dt)
        return qkv.split([Hq, Hkv, Hkv], dim=2)
    q, k, v = ta.rand_qkv(B, Hq, Hkv, Sq, Sk, D, dt, "cpu", layout)
    if k_row_pad:  # k with rows k_row_pad elements longer than D: a row stride TMA refuses
        assert layout == "bhsd"
        k = torch.randn(B, Hkv, Sk, D + k_row_pad, dtype=dt)[..., :D]
    return q, k, v


def run_attention_sm90(lib, dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout="bhsd", kv_lens=None, fused_qkv=False,
                       k_row_pad=0, expect_refusal=False):
    import test_attention as ta  # the CUDA tests' criterion: error <= 2 x PyTorch's low-precision error

    dt = DTYPES[dtype]
    q, k, v = _inputs(dt, B, Hq, Hkv, Sq, Sk, D, layout, fused_qkv, k_row_pad)
    kl = None
    if kv_lens is not None:
        kl = torch.tensor(kv_lens, dtype=torch.int32)
        for b, n in enumerate(kv_lens):  # a cache past its fill holds garbage that must never count
            if layout == "bshd":
                k[b, n:], v[b, n:] = float("nan"), float("nan")
            else:
                k[b, :, n:], v[b, :, n:] = float("nan"), float("nan")
    scale = 1.0 / math.sqrt(D)
    out = poison(torch.empty(q.shape, dtype=dt))
    lse = poison(torch.empty(B, Hq, Sq))
    vp = ctypes.c_void_p
    ptrs = (vp * 4)(*[t.data_ptr() for t in (q, k, v, out)])
    strides = (ctypes.c_int64 * 12)(*sum((bhsd_strides(t, layout) for t in (q, k, v, out)), []))
    dims = (ctypes.c_int * 8)(B, Hq, Hkv, Sq, Sk, D, int(causal), DTYPE_CODE[dt])
    args = (ptrs, strides, ptr(lse), ptr(kl), dims, ctypes.c_float(scale))
    fargs = [ctypes.c_void_p, ctypes.c_void_p, vp, vp, ctypes.c_void_p, ctypes.c_float]
    reason = bind(lib, "emu_flash_fwd_sm90_unsupported", ctypes.c_char_p, *fargs)(*args)
    err = bind(lib, "emu_flash_fwd_sm90", ctypes.c_int, *fargs)(*args)
    if expect_refusal:
        assert reason is not None and b"TMA" in reason, reason
        assert err == 801, f"expected cudaErrorNotSupported (801), got {err}"  # nothing launched
        assert not harness.launches(lib), harness.launches(lib)
        return
    assert reason is None, reason
    check(lib, err, "run_flash_fwd_sm90")
    kr = k if kl is None else k.nan_to_num(0.0)  # (the reference masks keys past kv_lens)
    vr = v if kl is None else v.nan_to_num(0.0)
    ta.assert_fwd_matches_ref(out, lse, q, kr, vr, causal, scale, layout, kl, dt)
    assert_path(lib, r"flash_fwd_sm90_kernel", True)


emu_results, test_emulated = harness.pytest_tests(__file__, CASES)

if __name__ == "__main__":
    sys.exit(harness.main(__file__, CASES, sys.argv))
