"""Emulated kernel tests: our CUDA kernel files, compiled unchanged with g++ against a CPU emulator
of the CUDA programming model (tools/cuda_emu), run on host memory under AddressSanitizer + UBSan
and compared with the PyTorch references (gptkernels/ops/*.py), on small awkward shapes.

What a pass shows: the kernels' logic is right under a sequentially-consistent emulation in which
the threads of a block run as fibers in a fixed order (forward, reverse or shuffled) between
barriers: indexing and bounds (ASan: no out-of-bounds access to any tensor or shared array;
UBSan: no signed overflow, misaligned vector access or bad float->int conversion), reductions,
barrier placement, warp-collective masks, the vectorised and scalar paths (each case checks which
one ran), grid-stride loops for several SM counts, empty inputs. What it does not show: behaviour
of the hardware (weak memory ordering, lock-step warps, timing, the exact error of approximate
instructions or tensor-core accumulation). The CUDA tests on a GPU remain the proof.

How it runs: the cases execute in a worker process (this file, run as a script with --worker) that
has the ASan runtime preloaded; pytest collects one test per case and reads the worker's results.
An ASan/UBSan report aborts the worker: that case fails with the report, and a new worker runs the
rest. Builds are cached under build/emu/ (tools/cuda_emu/build.py). A missing compiler or
sanitizer runtime skips these tests; a kernel file that does not compile fails them.

Without make:   python -m pytest -q tests/test_emulated_kernels.py
                python tests/test_emulated_kernels.py [-k SUBSTRING]   (plain runner, prints a summary)
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _load_build():
    import importlib.util

    name = "gptk_cuda_emu_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "cuda_emu" / "build.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


emu_build = _load_build()

from helpers import assert_close, elementwise_tol, poison, reduction_tol  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CASE_TIMEOUT_S = 120


# ---- cases ------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    family: str
    fn: str                       # name of a run_* function below
    kw: dict = field(default_factory=dict)
    sms: int = 4                  # emulated SM count (grid sizes of persistent / grid-stride kernels)
    thread_order: int = 0         # 0/1/2 forward/reverse/shuffled sweeps (warps advance together);
    #                               3/4 greedy lowest/highest thread first (one warp runs ahead to the next
    #                               block barrier: exposes a missing __syncthreads between warps)
    block_order: int = 0
    max_blocks_per_sm: int = 0    # occupancy the emulated cudaOccupancy* reports at most (0: threads/smem only)
    expect: str = "pass"          # "pass", "fault:<regex>" (emulator fault), "crash:<regex>" (sanitizer abort)


def _activation_cases():
    cases = []
    shapes = [(1, 1), (3, 7), (37, 1000), (5, 1023), (3, 1024), (1, 4096), (2, 8), (70, 64)]
    acts = ["gelu_tanh", "gelu", "relu"]
    k = 0
    for dt in DTYPES:
        for rows, cols in shapes:
            act = acts[k % 3]
            k += 1
            cases.append(Case(f"bias_act-{dt}-{act}-{rows}x{cols}", "activation", "run_bias_act",
                              dict(dtype=dt, act=act, rows=rows, cols=cols)))
        for act in acts:  # every activation on a vectorised and a scalar shape
            cases.append(Case(f"bias_act-{dt}-{act}-33x256", "activation", "run_bias_act",
                              dict(dtype=dt, act=act, rows=33, cols=256)))
        # misaligned pointers (storage offset of one element): the scalar path on a vector-friendly shape
        cases.append(Case(f"bias_act-{dt}-gelu_tanh-9x1024-misaligned", "activation", "run_bias_act",
                          dict(dtype=dt, act="gelu_tanh", rows=9, cols=1024, offset=1)))
    # empty inputs
    cases.append(Case("bias_act-fp32-0x7", "activation", "run_bias_act", dict(dtype="fp32", act="gelu", rows=0, cols=7)))
    cases.append(Case("bias_act-bf16-5x0", "activation", "run_bias_act", dict(dtype="bf16", act="gelu", rows=5, cols=0)))
    # launch-shape variations: one SM (long grid-stride loops, one band), many SMs (many bands),
    # reversed/shuffled thread and block order (a missing barrier or an order assumption shows)
    cases.append(Case("bias_act-bf16-gelu_tanh-300x72-sms1", "activation", "run_bias_act",
                      dict(dtype="bf16", act="gelu_tanh", rows=300, cols=72), sms=1))
    cases.append(Case("bias_act-fp32-gelu-300x72-occupancy1", "activation", "run_bias_act",
                      dict(dtype="fp32", act="gelu", rows=300, cols=72), sms=2, max_blocks_per_sm=1))
    cases.append(Case("bias_act-fp16-gelu-300x72-sms132", "activation", "run_bias_act",
                      dict(dtype="fp16", act="gelu", rows=300, cols=72), sms=132))
    cases.append(Case("bias_act-fp32-relu-130x40-reverse", "activation", "run_bias_act",
                      dict(dtype="fp32", act="relu", rows=130, cols=40), thread_order=1, block_order=1))
    cases.append(Case("bias_act-bf16-gelu_tanh-130x40-shuffled", "activation", "run_bias_act",
                      dict(dtype="bf16", act="gelu_tanh", rows=130, cols=40), thread_order=2, block_order=2))
    cases.append(Case("bias_act-fp16-gelu-130x520-greedy", "activation", "run_bias_act",
                      dict(dtype="fp16", act="gelu", rows=130, cols=520), thread_order=3))
    cases.append(Case("bias_act-fp32-gelu_tanh-130x37-greedy-reverse", "activation", "run_bias_act",
                      dict(dtype="fp32", act="gelu_tanh", rows=130, cols=37), thread_order=4, block_order=1))
    return cases


def _layernorm_cases():
    cases = []
    variants = [("wb", False, True, True), ("add-wb", True, True, True), ("none", False, False, False),
                ("w", False, True, False), ("add-none", True, False, False)]
    k = 0
    for dt in DTYPES:
        for cols in [1, 7, 8, 1000, 1023, 1024, 1025, 2056, 4096]:
            rows = [1, 3, 37][k % 3]
            name, res, w, b = variants[k % len(variants)]
            k += 1
            cases.append(Case(f"layer_norm-{dt}-{name}-{rows}x{cols}", "layernorm", "run_layer_norm",
                              dict(dtype=dt, rows=rows, cols=cols, residual=res, weight=w, bias=b)))
        cases.append(Case(f"layer_norm-{dt}-add-wb-9x1024-misaligned", "layernorm", "run_layer_norm",
                          dict(dtype=dt, rows=9, cols=1024, residual=True, offset=1)))
        cases.append(Case(f"layer_norm-{dt}-wb-2x16384", "layernorm", "run_layer_norm",
                          dict(dtype=dt, rows=2, cols=16384)))
    cases += [
        Case("layer_norm-fp32-wb-2x12288", "layernorm", "run_layer_norm", dict(dtype="fp32", rows=2, cols=12288)),
        Case("layer_norm-fp32-wb-37x1000-offset1e4", "layernorm", "run_layer_norm",
             dict(dtype="fp32", rows=37, cols=1000, mean_offset=1e4)),
        Case("layer_norm-bf16-wb-0x64", "layernorm", "run_layer_norm", dict(dtype="bf16", rows=0, cols=64)),
        Case("layer_norm-bf16-add-wb-300x64-sms1", "layernorm", "run_layer_norm",
             dict(dtype="bf16", rows=300, cols=64, residual=True), sms=1),
        Case("layer_norm-bf16-add-wb-300x200-occupancy1", "layernorm", "run_layer_norm",
             dict(dtype="bf16", rows=300, cols=200, residual=True), sms=2, max_blocks_per_sm=1),
        Case("layer_norm-fp16-wb-300x1000-sms132", "layernorm", "run_layer_norm",
             dict(dtype="fp16", rows=300, cols=1000), sms=132),
        Case("layer_norm-fp32-wb-70x2056-reverse", "layernorm", "run_layer_norm",
             dict(dtype="fp32", rows=70, cols=2056), thread_order=1, block_order=1),
        Case("layer_norm-bf16-add-w-70x2056-shuffled", "layernorm", "run_layer_norm",
             dict(dtype="bf16", rows=70, cols=2056, residual=True, bias=False), thread_order=2, block_order=2),
        Case("layer_norm-fp16-add-wb-70x4096-greedy", "layernorm", "run_layer_norm",
             dict(dtype="fp16", rows=70, cols=4096, residual=True), thread_order=3),
        Case("layer_norm-bf16-wb-37x264-greedy-reverse", "layernorm", "run_layer_norm",
             dict(dtype="bf16", rows=37, cols=264), thread_order=4, block_order=1),
    ]
    return cases


def _cross_entropy_cases():
    cases = []
    C = "cross_entropy"
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


def _selftest_cases():
    S = "selftest"
    return [
        Case("emu-warp-intrinsics", S, "run_st_warp_ops"),
        Case("emu-conversions-vs-torch", S, "run_st_conversions"),
        Case("emu-mma-bf16-ldmatrix", S, "run_st_mma", dict(bf16=True, variant=0, a_rows=16)),
        Case("emu-mma-bf16-ldmatrix-trans-operands", S, "run_st_mma", dict(bf16=True, variant=1, a_rows=16)),
        Case("emu-mma-fp16-cp-async-zero-fill", S, "run_st_mma", dict(bf16=False, variant=0, a_rows=13)),
        Case("emu-mma-fp16-ldmatrix-trans-operands", S, "run_st_mma", dict(bf16=False, variant=1, a_rows=16)),
        Case("emu-cp-async-deferred-until-wait", S, "run_st_cp_async"),
        Case("emu-dynamic-smem-needs-attribute", S, "run_st_dyn_smem"),
        Case("emu-bad-launch-config-rejected", S, "run_st_call", dict(fn="st_bad_config")),
        Case("emu-barrier-present-neighbour-ok", S, "run_st_neighbour", dict(with_barrier=True)),
        Case("emu-detects-missing-barrier", S, "run_st_neighbour", dict(with_barrier=False)),
        Case("emu-detects-missing-barrier-reverse", S, "run_st_neighbour", dict(with_barrier=False), thread_order=1),
        # deliberate bugs the emulator must report
        Case("emu-detects-shfl-after-exit", S, "run_st_call", dict(fn="st_exit_then_shfl"), expect="fault:exit"),
        Case("emu-detects-full-mask-on-partial-warp", S, "run_st_call", dict(fn="st_full_mask_partial_warp"),
             expect="fault:do not exist"),
        Case("emu-detects-divergent-barrier", S, "run_st_call", dict(fn="st_divergent_barrier"),
             expect="fault:divergent __syncthreads"),
        Case("emu-detects-deadlock", S, "run_st_call", dict(fn="st_deadlock"), expect="fault:deadlock.*__syncthreads"),
        Case("emu-detects-launch-bounds", S, "run_st_call", dict(fn="st_launch_bounds", threads=128),
             expect="fault:__launch_bounds__"),
        Case("emu-detects-cp-async-misaligned", S, "run_st_cp_async_misaligned", expect="fault:not 16-byte aligned"),
        Case("emu-detects-shared-out-of-bounds", S, "run_st_call", dict(fn="st_shared_oob"),
             expect="crash:(out of bounds for type 'float \\[64\\]'|heap-buffer-overflow).*emu_selftest.cu"),
        Case("emu-detects-global-out-of-bounds", S, "run_st_global_oob",
             expect="crash:heap-buffer-overflow.*emu_selftest.cu"),
        Case("emu-detects-32bit-index-overflow", S, "run_st_index_overflow", expect="crash:signed integer overflow"),
    ]


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
    ] + _attention_tile_cases() + _attention_gqa_bwd_cases() + _attention_split_kv_cases()


def _attention_tile_cases():
    """Lengths a few keys / rows from every tile edge: forward tiles 128 x 64 (d=128) and 128 x 128
    (d=64), backward tiles 64 x 128 (d=128) and 128 x 128 (d=64)."""
    A, f = "attention", "run_attention"
    cases = []
    for D, dt, sq, sk, causal in [(128, "bf16", 191, 191, True), (128, "fp16", 129, 127, False),
                                  (128, "bf16", 63, 65, True), (128, "bf16", 64, 129, True),
                                  (64, "bf16", 129, 127, True), (64, "fp16", 127, 129, False),
                                  (64, "bf16", 65, 191, True), (64, "bf16", 191, 63, True)]:
        cases.append(Case(f"attn-fwd-{dt}-d{D}-{sq}x{sk}{'-causal' if causal else ''}-tile-edges", A, f,
                          dict(dtype=dt, B=1, Hq=1, Hkv=1, Sq=sq, Sk=sk, D=D, causal=causal)))
    for D, dt, sq, sk, causal in [(128, "bf16", 129, 191, True), (128, "fp16", 65, 127, False),
                                  (64, "bf16", 191, 129, True), (64, "fp16", 127, 65, False)]:
        cases.append(Case(f"attn-bwd-{dt}-d{D}-{sq}x{sk}{'-causal' if causal else ''}-tile-edges", A, f,
                          dict(dtype=dt, B=1, Hq=1, Hkv=1, Sq=sq, Sk=sk, D=D, causal=causal, bwd=True)))
    return cases


def _attention_gqa_bwd_cases():
    """GQA backward with the query heads of a group split over CTAs (head_splits), partial dK/dV
    reduced in slice order; deterministic runs bitwise equal under other block and thread orders."""
    A, f = "attention", "run_attention"
    return [
        Case("attn-bwd-bf16-d64-gqa2-hs2-129x129-causal", A, f,
             dict(dtype="bf16", B=1, Hq=2, Hkv=1, Sq=129, Sk=129, D=64, causal=True, bwd=True, head_splits=2)),
        Case("attn-bwd-fp16-d128-gqa4-hs2-65x130-causal-greedy", A, f,
             dict(dtype="fp16", B=1, Hq=4, Hkv=1, Sq=65, Sk=130, D=128, causal=True, bwd=True, head_splits=2),
             thread_order=3),
        Case("attn-bwd-bf16-d64-gqa8-hs8-40x130-causal-deterministic", A, f,
             dict(dtype="bf16", B=1, Hq=8, Hkv=1, Sq=40, Sk=130, D=64, causal=True, bwd=True, head_splits=8,
                  deterministic=True, schedules=[(1, 1), (4, 2)])),
        Case("attn-bwd-bf16-d128-gqa4-hs4-70x150-deterministic-sms2", A, f,
             dict(dtype="bf16", B=1, Hq=4, Hkv=1, Sq=70, Sk=150, D=128, causal=False, bwd=True, head_splits=4,
                  deterministic=True, schedules=[(2, 1), (3, 2)]), sms=2),
        # several dq slices (one per CTA of a (batch, K/V head)), summed in slice order
        Case("attn-bwd-fp16-d64-40x300-causal-deterministic-dqsplits3-sms132", A, f,
             dict(dtype="fp16", B=1, Hq=2, Hkv=2, Sq=40, Sk=300, D=64, causal=True, bwd=True, deterministic=True,
                  expect_dq_splits=3, schedules=[(1, 1), (2, 2)]), sms=132),
        # the launcher's own choice of head_splits with 132 SMs (a group of 8 on one K/V head)
        Case("attn-bwd-bf16-d64-gqa8-auto-33x33-causal-sms132", A, f,
             dict(dtype="bf16", B=1, Hq=8, Hkv=1, Sq=33, Sk=33, D=64, causal=True, bwd=True, expect_head_splits=8),
             sms=132),
    ]


def _attention_split_kv_cases():
    """The split-KV forward (flash_attn_decode): caches filled far below their capacity (the split
    ranges come from kv_lens inside the kernels), mixed kv_lens in a batch, Sq = 2..64 (the CUDA-core
    kernel up to 16 rows per K/V head, the tensor-core forward split over the keys above)."""
    A, f = "attention", "run_attention"
    return [
        Case("attn-decode-bf16-d128-gqa4-kvlen1-of-4096-sms132", A, f,
             dict(dtype="bf16", B=2, Hq=8, Hkv=2, Sq=1, Sk=4096, D=128, causal=True, layout="bshd",
                  kv_lens=[1, 3], decode=True, expect_splits=(2, 64)), sms=132),
        Case("attn-decode-fp16-d64-mixed-kvlens-sq2-sms132", A, f,
             dict(dtype="fp16", B=4, Hq=4, Hkv=1, Sq=2, Sk=700, D=64, causal=True, layout="bshd",
                  kv_lens=[0, 1, 33, 700], decode=True, expect_splits=(2, 64)), sms=132),
        Case("attn-decode-bf16-d64-sq16-rows16-shuffled", A, f,
             dict(dtype="bf16", B=1, Hq=2, Hkv=2, Sq=16, Sk=300, D=64, causal=True, kv_lens=[290], decode=True),
             sms=16, thread_order=2, block_order=2),
        # more than 16 rows per K/V head: the tensor-core forward with its key blocks split
        Case("attn-splitkv-bf16-d128-sq17-kvlen-150-of-1000-sms132", A, f,
             dict(dtype="bf16", B=1, Hq=2, Hkv=2, Sq=17, Sk=1000, D=128, causal=True, layout="bshd",
                  kv_lens=[150], decode=True, expect_splits=(2, 64)), sms=132),
        Case("attn-splitkv-fp16-d64-sq64-mixed-kvlens-sms132", A, f,
             dict(dtype="fp16", B=3, Hq=2, Hkv=1, Sq=64, Sk=400, D=64, causal=True, layout="bshd",
                  kv_lens=[400, 40, 64], decode=True, expect_splits=(2, 64)), sms=132),
        Case("attn-splitkv-bf16-d64-gqa4-sq5-noncausal-greedy-sms132", A, f,
             dict(dtype="bf16", B=1, Hq=8, Hkv=2, Sq=5, Sk=333, D=64, causal=False, decode=True,
                  expect_splits=(2, 64)), sms=132, thread_order=4),
        Case("attn-splitkv-bf16-d128-sq33-unsplit-sms1", A, f,
             dict(dtype="bf16", B=1, Hq=2, Hkv=1, Sq=33, Sk=100, D=128, causal=True, decode=True,
                  expect_splits=(1, 1)), sms=1),
    ]


CASES = (_activation_cases() + _layernorm_cases() + _cross_entropy_cases() + _attention_cases()
         + _selftest_cases())
CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "case ids must be unique"


# ---- helpers (worker side) ------------------------------------------------------------------------------

class EmuFault(AssertionError):
    pass


def ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() > 0 else 0)


def bind(lib, name, restype, *argtypes):
    f = getattr(lib, name)
    f.restype, f.argtypes = restype, list(argtypes)
    return f


def check(lib, err, what):
    fault = lib.gptk_emu_fault().decode()
    if err != 0 or fault:
        raise EmuFault(f"{what} returned cudaError {err}" + (f"; emulator fault: {fault}" if fault else ""))


def launches(lib):
    return [ln for ln in lib.gptk_emu_log().decode().splitlines() if ln.strip()]


def vec_of(line: str):
    """True/False when a kernel line's name says vectorised/scalar (VEC = N template argument, or
    'vec'/'scalar' in the kernel's name); None when it does not say."""
    m = re.search(r"\bVEC = (\d+)", line) or re.search(r"\bkVec = (true|false)", line)
    if m:
        return m.group(1) not in ("1", "false")
    name = line.split("(")[0]
    if "scalar" in name:
        return False
    if "vec" in name:
        return True
    return None


def assert_path(lib, pattern: str, want_vec: bool):
    """Every launch of a kernel whose name matches `pattern` took the vectorised path iff want_vec
    (when the kernel's name tells), and at least one such kernel was launched."""
    lines = [ln for ln in launches(lib) if re.search(pattern, ln.split(" grid ")[0])]
    assert lines, f"no launch of a kernel matching {pattern!r}; launches:\n" + "\n".join(launches(lib))
    for ln in lines:
        v = vec_of(ln)
        if v is not None:
            assert v == want_vec, f"expected the {'vectorised' if want_vec else 'scalar'} path, ran: {ln}"


def buffer(shape, dtype, offset=0, gen=None, fill="randn", scale=1.0):
    """A tensor of `shape` that is the tail of an exactly-sized allocation (so ASan sees an overrun
    of its end), starting `offset` elements in (offset 1 misaligns it)."""
    n = math.prod(shape)
    buf = torch.empty(n + offset, dtype=dtype)
    t = buf[offset:].view(shape)
    if fill == "randn":
        t.copy_(torch.randn(shape, generator=gen) * scale)
    elif fill == "nan":
        poison(t)
    return t


def assert_bounded(actual, expected, bound, name):
    """|actual - expected| <= bound elementwise (bound: a tensor), NaN in actual fails."""
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    bad = ~(err <= bound.double())
    if bool(bad.any()):
        i = int(torch.nonzero(bad.flatten())[0])
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
        raise AssertionError(f"{name}: {int(bad.sum())} / {a.numel()} elements out of bounds; first at {idx}: "
                             f"got {a.flatten()[i].item()!r}, expected {e.flatten()[i].item()!r} "
                             f"(allowed +-{bound.double().flatten()[i].item():.3g})")


def aligned16(*ts):
    return all(t.data_ptr() % 16 == 0 for t in ts if t is not None and t.numel() > 0)


# ---- activation ----------------------------------------------------------------------------------------------

ACT_CODE = {"relu": 0, "gelu_tanh": 1, "gelu": 2}


def run_bias_act(lib, dtype, act, rows, cols, offset=0):
    from gptkernels.ops import activation as ref

    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(rows * 10007 + cols)
    x = buffer((rows, cols), dt, offset, g, scale=2.0)
    b = buffer((cols,), dt, offset, g)
    dy = buffer((rows, cols), dt, offset, g)
    y = buffer((rows, cols), dt, offset, fill="nan")
    dx = buffer((rows, cols), dt, offset, fill="nan")
    db = buffer((cols,), dt, offset, fill="nan")
    fwd = bind(lib, "emu_bias_act_forward", ctypes.c_int, *[ctypes.c_void_p] * 3, ctypes.c_int64, ctypes.c_int64,
               ctypes.c_int, ctypes.c_int)
    wsz = bind(lib, "emu_bias_act_backward_workspace", ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)
    bwd = bind(lib, "emu_bias_act_backward", ctypes.c_int, *[ctypes.c_void_p] * 5, ctypes.c_int64, ctypes.c_int64,
               ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
    check(lib, fwd(ptr(x), ptr(b), ptr(y), rows, cols, DTYPE_CODE[dt], ACT_CODE[act]), "bias_act_forward")
    ws = torch.empty(wsz(rows, cols), dtype=torch.uint8)  # exactly what the launcher asked for
    check(lib, bwd(ptr(dy), ptr(x), ptr(b), ptr(dx), ptr(db), rows, cols, DTYPE_CODE[dt], ACT_CODE[act], ptr(ws)),
          "bias_act_backward")
    atol, rtol = elementwise_tol(dt)
    if dt == torch.float32:
        # fp32 outputs against the reference formulas evaluated in float64 (torch's CPU fp32 erf and
        # tanh differ from libm's erff/tanhf by more than the fp32 tolerance), allowing each element
        # the fp32 rounding of the formula's largest intermediate term: 1 + tanh(z) and 1 - tanh(z)^2
        # cancel near tanh(z) = -1, so |error| ~ eps * |term| there, not eps * |result|.
        u = x.double() + b.double()
        y_ref = ref.act_ref(u, act).float()
        g = dy.double() * ref.act_grad_ref(u, act)
        dx_ref, db_ref = g.float(), g.sum(0).float()
        eps8 = 8 * 2.0**-24
        if act == "gelu_tanh":
            term = 0.5 * u.abs() * 0.7978845608028654 * (1 + 3 * 0.044715 * u * u)
        elif act == "gelu":
            term = u.abs() * 0.3989422804014327
        else:
            term = torch.zeros_like(u)
        if rows * cols:
            assert_bounded(y, y_ref, atol + rtol * y_ref.abs() + eps8 * (1 + u.abs()), "y")
            assert_bounded(dx, dx_ref, atol + rtol * dx_ref.abs() + eps8 * dy.double().abs() * (1 + term), "dx")
    else:
        y_ref = ref.bias_act_fwd_ref(x, b, act)
        if cols:
            dx_ref, db_ref = ref.bias_act_bwd_ref(dy, x, b, act)
        else:  # (bias_act_bwd_ref cannot reshape an empty [rows, 0] gradient)
            dx_ref, db_ref = dy.clone(), b.clone()
        if rows * cols:
            assert_close(y, y_ref, atol, rtol, "y")
            assert_close(dx, dx_ref, atol, rtol, "dx")
    scale = dx_ref.float().abs().sum(0).max().item() + 1e-6 if rows * cols else 1.0
    if cols:
        assert_close(db, db_ref, reduction_tol(dt, rows) * scale, reduction_tol(dt, rows), "dbias")
    if rows * cols:
        n = 16 // x.element_size()
        assert_path(lib, r"bias_act_forward", cols % n == 0 and aligned16(x, b, y))
        assert_path(lib, r"bias_act_backward", cols % n == 0 and aligned16(dy, x, b, dx))


# ---- layernorm ------------------------------------------------------------------------------------------------

def run_layer_norm(lib, dtype, rows, cols, residual=False, weight=True, bias=True, offset=0, eps=1e-5,
                   mean_offset=0.0):
    import test_layernorm as tl  # the bounds the CUDA tests use (float64 reference, dtype-derived)

    dt = DTYPES[dtype]
    code = DTYPE_CODE[dt]
    g = torch.Generator().manual_seed(rows * 7919 + cols)
    x = buffer((rows, cols), dt, offset, g, scale=2.0)
    if mean_offset:
        x += mean_offset
    r = buffer((rows, cols), dt, offset, g) if residual else None
    w = buffer((cols,), dt, offset, g) if weight else None
    b = buffer((cols,), dt, offset, g) if bias else None
    y = buffer((rows, cols), dt, offset, fill="nan")
    s = buffer((rows, cols), dt, offset, fill="nan") if residual else None
    mean = buffer((rows,), torch.float32, fill="nan")
    rstd = buffer((rows,), torch.float32, fill="nan")
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    fwd = bind(lib, "emu_layer_norm_forward", ctypes.c_int, *[vp] * 8, i64, i64, ctypes.c_float, ctypes.c_int)
    wsz = bind(lib, "emu_layer_norm_backward_workspace", i64, i64, i64, ctypes.c_int, ctypes.c_int)
    bwd = bind(lib, "emu_layer_norm_backward", ctypes.c_int, *[vp] * 9, i64, i64, ctypes.c_int, vp)
    check(lib, fwd(ptr(x), ptr(r), ptr(w), ptr(b), ptr(y), ptr(s), ptr(mean), ptr(rstd), rows, cols, eps, code),
          "layer_norm_forward")
    xin = x
    if residual:
        assert torch.equal(s, r + x), "s must be residual + x rounded once to the storage type"
        xin = s
    dy = buffer((rows, cols), dt, offset, g)
    ds = buffer((rows, cols), dt, offset, g) if residual else None
    dx = buffer((rows, cols), dt, offset, fill="nan")
    dw = buffer((cols,), dt, offset, fill="nan") if weight else torch.empty(0, dtype=dt)
    db = buffer((cols,), dt, offset, fill="nan") if bias else torch.empty(0, dtype=dt)
    ws = torch.empty(wsz(rows, cols, code, int(weight or bias)), dtype=torch.uint8)  # exactly what it asks for
    check(lib, bwd(ptr(dy), ptr(xin), ptr(w), ptr(mean), ptr(rstd), ptr(ds), ptr(dx), ptr(dw if weight else None),
                   ptr(db if bias else None), rows, cols, code, ptr(ws)), "layer_norm_backward")
    if rows == 0:
        assert not launches(lib), "no kernel should run for zero rows"
        for t in (dw, db):
            assert bool((t == 0).all()), "the parameter gradients of an empty batch are zero"
        return
    tl._check_forward(xin, w, b, y, mean, rstd, eps)
    tl._check_backward(dy, xin, w, mean, rstd, dx, dw, db, ds, has_bias=bias)
    vec_ok = cols % 8 == 0
    assert_path(lib, r"layer_norm_forward", vec_ok and aligned16(x, r, w, b, y, s))
    assert_path(lib, r"layer_norm_backward", vec_ok and aligned16(dy, xin, w, ds, dx))


# ---- cross-entropy ------------------------------------------------------------------------------------------------

CE_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


def huge_view(shape, strides, dtype):
    """A tensor of `shape` and element `strides` in a lazily committed anonymous mapping (offsets may
    exceed 2^31 elements: only the touched pages cost memory). Returns (tensor, mapping) or None."""
    import mmap

    nbytes = (sum((n - 1) * st for n, st in zip(shape, strides)) + 1) * torch.tensor([], dtype=dtype).element_size()
    try:
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
    except (OSError, ValueError, OverflowError):
        return None
    flat = torch.frombuffer(mm, dtype=torch.uint8).view(dtype)
    return flat.as_strided(shape, strides), mm


def huge_rows(rows, cols, ld, dtype):
    return huge_view((rows, cols), (ld, 1), dtype)


def run_cross_entropy(lib, dtype, rows, vocab, reduction="mean", target64=True, ignore_index=-100, ld_pad=0,
                      offset=0, inplace=False, grad=True, bad_targets=False, all_ignored=False, huge_ld=0,
                      masked_logits=False):
    import test_cross_entropy as tce  # grad_tol: the tolerance the CUDA tests use
    import importlib

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


# ---- attention ---------------------------------------------------------------------------------------------------

def _bhsd_strides(t, layout):
    """(batch, head, row) element strides of t viewed in (B, H, S, D) order, 0 for size-1 dims (as the
    binding passes them)."""
    tb = t if layout == "bhsd" else t.transpose(1, 2)
    return [tb.stride(i) if tb.size(i) != 1 else 0 for i in range(3)]


def run_attention(lib, dtype, B, Hq, Hkv, Sq, Sk, D, causal, layout="bhsd", kv_lens=None, decode=False, bwd=False,
                  deterministic=False, with_dlse=False, huge_kv_batch_stride=0, head_splits=0, schedules=(),
                  expect_splits=None, expect_head_splits=None, expect_dq_splits=None):
    """expect_splits: (lo, hi) bounds on the split-KV launcher's number of splits; schedules: extra
    (thread_order, block_order) runs of a deterministic backward, which must match bit for bit."""
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
        if expect_splits is not None:
            assert expect_splits[0] <= splits <= expect_splits[1], f"num_splits {splits} not in {expect_splits}"
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
    if decode and Sq * (Hq // Hkv) <= 16:
        assert_path(lib, r"flash_decode_kernel", True)
    else:
        assert_path(lib, r"flash_fwd_kernel", True)
    if not bwd:
        return
    dout = torch.randn(q.shape, dtype=dt)
    dlse = torch.randn(B, Hq, Sq) if with_dlse else None
    dq, dk, dv = (poison(torch.empty_like(t)) for t in (q, k, v))
    bptrs = (vp * 8)(*[t.data_ptr() for t in (q, k, v, out, dout, dq, dk, dv)])
    bstrides = (ctypes.c_int64 * 24)(*sum((_bhsd_strides(t, layout) for t in (q, k, v, out, dout, dq, dk, dv)), []))
    bdims = (ctypes.c_int * 10)(B, Hq, Hkv, Sq, Sk, D, int(causal), DTYPE_CODE[dt], int(deterministic), 1)
    bargs = (bptrs, bstrides, ptr(lse), ptr(dlse), bdims, ctypes.c_float(scale))
    # query-head slices per GQA group: forced by the case, else the launcher's choice for n_sms
    bdims[9] = head_splits or bind(lib, "emu_flash_bwd_head_splits", ctypes.c_int, *fargs, ctypes.c_int)(*bargs, n_sms)
    if expect_head_splits is not None:
        assert bdims[9] == expect_head_splits, f"head_splits {bdims[9]}, expected {expect_head_splits}"
    splits = bind(lib, "emu_flash_bwd_dq_splits", ctypes.c_int, *fargs, ctypes.c_int)(*bargs, n_sms)
    if expect_dq_splits is not None:
        assert splits == expect_dq_splits, f"dq_splits {splits}, expected {expect_dq_splits}"
    nbytes = bind(lib, "emu_flash_bwd_workspace", ctypes.c_int64, *fargs, ctypes.c_int)(*bargs, splits)
    ws = torch.empty(nbytes, dtype=torch.uint8)
    lib.gptk_emu_reset()
    check(lib, bind(lib, "emu_flash_bwd", ctypes.c_int, *fargs, vp, ctypes.c_int)(*bargs, ptr(ws), splits), "flash_bwd")
    if schedules:  # a deterministic backward gives the same bits under any block / thread order
        assert deterministic
        first = [t.clone() for t in (dq, dk, dv)]
        for thread_order, block_order in schedules:
            for t in (dq, dk, dv):
                poison(t)
            lib.gptk_emu_configure(n_sms, 0, thread_order, block_order, 4321, 0xff)
            check(lib, bind(lib, "emu_flash_bwd", ctypes.c_int, *fargs, vp, ctypes.c_int)(*bargs, ptr(ws), splits),
                  "flash_bwd")
            for name, a, b in zip(("dq", "dk", "dv"), first, (dq, dk, dv)):
                assert torch.equal(a, b), f"{name}: deterministic backward differs under schedule {thread_order, block_order}"
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    _, g_ref = ta.grads_of(lambda: A.attention_ref(q32, k32, v32, causal, scale, layout, upcast=True),
                           (q32, k32, v32), dout, dlse)
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _, g_base = ta.grads_of(lambda: A.attention_ref(qb, kb, vb, causal, scale, layout, upcast=False), (qb, kb, vb),
                            dout, dlse)
    for name, got, r, b in zip(("dq", "dk", "dv"), (dq, dk, dv), g_ref, g_base):
        ta.assert_2x(name, got, r, b, dt)
    assert_path(lib, r"flash_bwd_kernel", True)


# ---- the emulator's own tests (tools/cuda_emu/selftest/emu_selftest.cu) --------------------------------------

def run_st_call(lib, fn, threads=None):
    out = torch.zeros(256, dtype=torch.int32)
    args = [ptr(out)] + ([threads] if threads is not None else [])
    f = bind(lib, fn, ctypes.c_int, ctypes.c_void_p, *([ctypes.c_int] if threads is not None else []))
    check(lib, f(*args), fn)


def run_st_warp_ops(lib, threads=64):
    out = torch.full((threads * 8,), -7, dtype=torch.int32)
    check(lib, bind(lib, "st_warp_ops", ctypes.c_int, ctypes.c_void_p, ctypes.c_int)(ptr(out), threads), "warp_ops")
    got = out.view(threads, 8).tolist()
    for tid in range(threads):
        lane, w = tid % 32, tid // 32

        def v(l):
            return l * 3 + w * 100

        seg = lane & ~15
        ballot = sum(1 << i for i in range(32) if i % 3 == 0)
        ballot -= (1 << 32) if ballot >= (1 << 31) else 0  # as int32
        want = [v(5), v(lane ^ 3), v(lane - 2) if lane >= 2 else v(lane),
                v(lane + 7) if lane + 7 < seg + 16 else v(lane),
                ballot, 1, 496, v(seg + 1)]
        assert got[tid] == want, f"thread {tid}: got {got[tid]}, want {want}"


def run_st_conversions(lib):
    """fp16/bf16 conversions: every 16-bit pattern to fp32, and fp32 -> fp16/bf16 (round to nearest
    even) on edge values and random bit patterns, bit for bit against torch."""
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    for name, dt in (("half", torch.float16), ("bf16", torch.bfloat16)):
        bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        out = torch.empty(65536, dtype=torch.float32)
        bind(lib, f"st_{name}_to_float", None, vp, vp, i64)(ptr(bits), ptr(out), 65536)
        want = bits.view(dt).float()
        same = (out.view(torch.int32) == want.view(torch.int32)) | (out.isnan() & want.isnan())
        assert bool(same.all()), f"{name} -> float differs at {int((~same).nonzero()[0])}"
        g = torch.Generator().manual_seed(5)
        rnd = torch.randint(-2**31, 2**31 - 1, (200000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
        edges = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.99, 65520.0, 65536.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26,
                              2.0**-14, 2.0**-14 - 2.0**-25, 3.4e38, float("inf"), float("-inf"), 1 + 2.0**-11,
                              1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 1e-40, -1e-45], dtype=torch.float32)
        f = torch.cat([edges, rnd, rnd * 2.0**-100, rnd * 2.0**100])
        f = f[f.isfinite() | f.isinf()]
        h = torch.empty(f.numel(), dtype=torch.int16)
        bind(lib, f"st_float_to_{name}", None, vp, vp, i64)(ptr(f), ptr(h), f.numel())
        want = f.to(dt)
        same = (h == want.view(torch.int16)) | (h.view(dt).isnan() & want.isnan())
        if not bool(same.all()):
            i = int((~same).nonzero()[0])
            raise AssertionError(f"float -> {name}: {f[i].item()!r} gave {int(h[i]) & 0xffff:#06x}, "
                                 f"torch {int(want.view(torch.int16)[i]) & 0xffff:#06x}")


def run_st_mma(lib, bf16, variant, a_rows):
    """One warp: cp.async (with zero-fill) -> ldmatrix (.trans) -> mma.sync m16n8k16, against a float64
    matrix product (the emulation adds the products in double and rounds once)."""
    dt = torch.bfloat16 if bf16 else torch.float16
    g = torch.Generator().manual_seed(11 + variant)
    A = torch.randn(16, 16, generator=g).to(dt)
    B = torch.randn(16, 8, generator=g).to(dt)
    C = torch.randn(16, 8, generator=g)
    a_src = (A.t() if variant == 1 else A).contiguous()
    b_src = (B.t() if variant == 1 else B).contiguous()
    D = torch.full((16, 8), float("nan"))
    fn = bind(lib, "st_mma", ctypes.c_int, *[ctypes.c_void_p] * 4, ctypes.c_int, ctypes.c_int, ctypes.c_int)
    check(lib, fn(ptr(a_src), ptr(b_src), ptr(C), ptr(D), int(bf16), variant, a_rows), "mma")
    Am = A.double().clone()
    Am[a_rows:] = 0
    want = Am @ B.double() + C.double()
    torch.testing.assert_close(D.double(), want, atol=1e-6, rtol=2.0**-23)


def run_st_cp_async(lib):
    src = torch.tensor([1.5, -2.0, 3.25, 4.0])
    out = torch.zeros(12)
    check(lib, bind(lib, "st_cp_async", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(ptr(src), ptr(out)), "cp_async")
    assert bool(out[:4].isnan().all()), f"shared memory read before cp.async.wait_group must not hold the data: {out[:4]}"
    assert out[4:8].tolist() == src.tolist(), out[4:8]
    assert out[8:].tolist() == [0.0] * 4, "src-size 0 zero-fills"


def run_st_cp_async_misaligned(lib):
    src = torch.zeros(16)
    check(lib, bind(lib, "st_cp_async_misaligned", ctypes.c_int, ctypes.c_void_p)(ptr(src)), "cp_async_misaligned")


def run_st_dyn_smem(lib):
    out = torch.zeros(1)
    fn = bind(lib, "st_dyn_smem", ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    n = 16384  # 64 KiB: above the 48 KiB default
    err = fn(ptr(out), n, 0)
    assert err == 1, f"64 KiB of dynamic shared memory without cudaFuncSetAttribute must fail (cudaErrorInvalidValue), got {err}"
    check(lib, fn(ptr(out), n, 1), "dyn_smem with the attribute")
    assert out.item() == sum(i % 3 for i in range(n))


def run_st_neighbour(lib, with_barrier):
    n = 128
    out = torch.zeros(n)
    fn = bind(lib, "st_neighbour", ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    check(lib, fn(ptr(out), n, int(with_barrier)), "neighbour")
    want = torch.tensor([float((t + 1) % n) for t in range(n)])
    if with_barrier:
        assert torch.equal(out, want)
    else:
        assert bool(out.isnan().any()), "without the barrier, some thread must read its neighbour's slot unwritten"


def run_st_global_oob(lib):
    n = 100
    inp = torch.zeros(n)
    out = torch.zeros(n)
    fn = bind(lib, "st_global_oob", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
    check(lib, fn(ptr(inp), ptr(out), n), "global_oob")


def run_st_index_overflow(lib):
    inp = torch.zeros(4, dtype=torch.int32)
    out = torch.zeros(4, dtype=torch.int32)
    fn = bind(lib, "st_index_overflow", ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    check(lib, fn(ptr(inp), ptr(out), 3, 2**30), "index_overflow")


# ---- the worker ------------------------------------------------------------------------------------------------

def worker_main(libs: dict, ids: list[str]) -> int:
    """Runs the cases; prints one '@@START id' line before and one '@@RESULT json' line after each."""
    import faulthandler

    torch.set_num_threads(1)
    handles = {}
    for fam, path in libs.items():
        lib = ctypes.CDLL(path)
        bind(lib, "gptk_emu_fault", ctypes.c_char_p)
        bind(lib, "gptk_emu_log", ctypes.c_char_p)
        bind(lib, "gptk_emu_configure", ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
             ctypes.c_uint, ctypes.c_int)
        handles[fam] = lib
    for cid in ids:
        case = CASES_BY_ID[cid]
        print(f"@@START {cid}", flush=True)
        faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True)
        t0 = time.time()
        lib = handles[case.family]
        lib.gptk_emu_reset()
        lib.gptk_emu_configure(case.sms, case.max_blocks_per_sm, case.thread_order, case.block_order, 1234, 0xff)
        torch.manual_seed(0)
        status, msg = "pass", ""
        try:
            globals()[case.fn](lib, **case.kw)
        except EmuFault as e:
            status, msg = "fault", str(e)
        except pytest.skip.Exception as e:
            status, msg = "skip", str(e)
        except AssertionError as e:
            status, msg = "fail", str(e)
        except Exception as e:  # noqa: BLE001
            status, msg = "error", f"{type(e).__name__}: {e}"
        faulthandler.cancel_dump_traceback_later()
        log = lib.gptk_emu_log().decode()
        print("@@RESULT " + json.dumps(dict(id=cid, status=status, msg=msg, log=log[-4000:],
                                            seconds=round(time.time() - t0, 3))), flush=True)
    return 0


# ---- the driver (pytest side) -------------------------------------------------------------------------------------

def judge(case: Case, status: str, msg: str) -> tuple[bool, str]:
    """(ok, explanation) of a case's outcome against its expectation."""
    if case.expect == "pass":
        return status == "pass", msg
    kind, _, pattern = case.expect.partition(":")
    if status != kind:
        return False, f"expected a {kind} matching {pattern!r}, got {status}: {msg}"
    if not re.search(pattern, msg, re.S):
        return False, f"the {kind} does not match {pattern!r}: {msg[-3000:]}"
    return True, ""


def sanitizer_report(err: str) -> str:
    """The sanitizer's report (or a timeout's traceback) from a dead worker's stderr."""
    for key in ("ERROR: AddressSanitizer", "runtime error:", "AddressSanitizer", "Timeout (", "Traceback"):
        i = err.find(key)
        if i >= 0:
            return err[max(0, err.rfind("\n", 0, i) + 1):][:8000]
    return err[-8000:]


def run_cases(ids: list[str], timeout_s: float = 1800) -> dict:
    """Builds what the cases need and runs them in worker processes. Returns {id: result dict}, or
    raises emu_build.BuildError."""
    families = sorted({CASES_BY_ID[i].family for i in ids})
    built = emu_build.build(families)
    libs = {f: str(b.lib) for f, b in built.items()}
    results = {}
    for i in ids:
        if CASES_BY_ID[i].family not in libs:
            results[i] = dict(id=i, status="skip", msg=f"the {CASES_BY_ID[i].family} kernels are not in this tree")
    todo = [i for i in ids if i not in results]
    env = emu_build.asan_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    deadline = time.time() + timeout_s
    crashes = 0
    while todo:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(libs), json.dumps(todo)]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60, deadline - time.time()))
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = "worker timed out", -1
        started = None
        for line in out.splitlines():
            if line.startswith("@@START "):
                started = line[8:].strip()
            elif line.startswith("@@RESULT "):
                r = json.loads(line[9:])
                results[r["id"]] = r
                started = None
        todo = [i for i in todo if i not in results]
        if not todo:
            break
        # the worker died inside case `started` (sanitizer report, timeout) or before any case
        if started is None:  # (the environment was probed by the build: this is our failure)
            raise emu_build.BuildError("worker", f"the emulator worker failed (rc {rc}):\n{err[-6000:]}")
        results[started] = dict(id=started, status="crash", msg=f"worker died (rc {rc}):\n{sanitizer_report(err)}",
                                log="")
        todo = [i for i in todo if i != started]
        crashes += 1
        if time.time() > deadline:
            for i in todo:
                results[i] = dict(id=i, status="error", msg="not run: out of time", log="")
            break
    return results


@pytest.fixture(scope="module")
def emu_results(request):
    mine = [item.callspec.params["case_id"] for item in request.session.items
            if item.module is sys.modules[__name__] and hasattr(item, "callspec") and "case_id" in item.callspec.params]
    try:
        return run_cases(mine)
    except emu_build.BuildError as e:
        if e.kind == "environment":
            pytest.skip(f"emulated kernel tests need g++ with ASan/UBSan: {e}")
        pytest.fail(f"emulated build failed: {e}", pytrace=False)


@pytest.mark.parametrize("case_id", list(CASES_BY_ID))
def test_emulated(case_id, emu_results):
    r = emu_results[case_id]
    if r["status"] == "skip":
        pytest.skip(r["msg"])
    ok, why = judge(CASES_BY_ID[case_id], r["status"], r["msg"])
    if not ok:
        pytest.fail(f"{r['status']}: {why}\nlaunches:\n{r.get('log', '')}", pytrace=False)


def main(argv):
    if len(argv) >= 4 and argv[1] == "--worker":
        return worker_main(json.loads(argv[2]), json.loads(argv[3]))
    pat = argv[argv.index("-k") + 1] if "-k" in argv else ""
    ids = [c.id for c in CASES if pat in c.id]
    t0 = time.time()
    try:
        results = run_cases(ids)
    except emu_build.BuildError as e:
        print(f"build failed ({e.kind}): {e}")
        return 2
    bad = 0
    for i in ids:
        r = results[i]
        ok, why = judge(CASES_BY_ID[i], r["status"], r["msg"]) if r["status"] != "skip" else (True, "skipped")
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {i} ({r.get('seconds', '-')}s){'' if ok else ': ' + why[:3000]}")
    print(f"{len(ids) - bad}/{len(ids)} ok in {time.time() - t0:.1f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
