"""The emulator's sm_90 instructions (tests/emulator/cuda_emu_sm90.cpp), tested with the kernels of
tests/emulator/selftest/emu_selftest_sm90.cu:

- layouts: every (row, col) of the wgmma accumulator and register-A fragments (all N from 8 to 256),
  the descriptor -> shared address maps (every layout type, K- and MN-major, several tile sizes and
  offsets) and the TMA swizzle, against tests/emulator/sm90_model.py (written from CUTLASS/CuTe);
- wgmma SS and RS, bf16 and fp16, N 8 / 16 / 24 / 64 / 128 / 256, swizzle none / 32B / 64B / 128B,
  transposed operands through descriptors, C input, imm-scale-a -1, two commit groups, against a
  float64 matrix product; TMA loads and stores of 2- to 5-d boxes (out-of-bounds zero and NaN fill,
  clipped stores, the swizzled shared-memory image); a warp-specialised pipeline (producer / consumer
  warpgroups, mbarrier phases, setmaxnreg, elect.sync, named barriers, stmatrix, TMA store) under every
  thread schedule and both asynchrony modes; cuTensorMapEncodeTiled's argument checks;
- deliberate misuses the emulator must report (deadlocked mbarrier phases, TMA into a stage being
  read, wgmma reading ordinary stores without fence.proxy.async, accumulators touched in flight,
  malformed descriptors, setmaxnreg out of range, arrive-count underflow, bad TMA operands, ...).

    python -m pytest -q tests/emulator/test_emulator_sm90.py
    python tests/emulator/test_emulator_sm90.py [-k SUBSTRING]   (plain runner, prints a summary)
"""
from __future__ import annotations

import ctypes
import sys

import torch

if __name__ == "__main__":  # run as a script: the emulator package lives in tests/
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from emulator import harness  # noqa: E402
from emulator import sm90_model as M  # noqa: E402
from emulator.harness import Case, bind, check, ptr  # noqa: E402

S = "selftest"
vp, ci = ctypes.c_void_p, ctypes.c_int

# gemm instantiations of st_sm90_gemm: variant -> (N, bf16, scale_a, trans_a, trans_b, rs)
GEMM = {0: (64, True, 1, 0, 0, False), 1: (256, False, 1, 0, 1, False), 2: (24, True, 1, 0, 1, False),
        3: (8, False, -1, 1, 0, False), 4: (128, True, 1, 1, 1, False), 5: (128, True, 1, 0, 1, True),
        6: (16, False, 1, 0, 0, True), 7: (64, False, -1, 0, 1, True), 8: (24, False, 1, 0, 0, False)}

# misuse_kernel bugs -> what the emulator must report
MISUSE = {
    1: "fault:deadlock.*mbarrier at .*waits for the phase of parity 0.*tx-count 16400 bytes, 16384 bytes of TMA "
       "loads in flight",
    2: "fault:mbarrier arrive-count underflow",
    3: "fault:TMA load into shared memory .* that the wgmma issued at .* reads",
    4: "fault:wgmma.mma_async reads shared memory .* that the TMA load issued at .* has not written yet",
    5: "fault:wgmma.mma_async without a wgmma.fence",
    6: "fault:accumulator register 5 of thread .* was written while this wgmma was in flight",
    8: "fault:descriptor B .* is outside the allocation",
    9: "fault:descriptor A .* misaligned for the 128B swizzle",
    10: "fault:descriptor A .* reserved bits set",
    11: "fault:must be the same across the warpgroup",
    12: "fault:deadlock.*mbarrier at .*1 of 2 arrivals pending",
    13: "fault:holds no mbarrier",
    14: "fault:a 3d copy with a tensor map of rank 2",
    15: "fault:not 128-byte aligned",
    16: "fault:tensor map that cuTensorMapEncodeTiled did not encode",
    17: r"fault:setmaxnreg.dec.* 20: the register count must be in \[24, 256\]",
    18: "fault:setmaxnreg.inc.* 100: .*multiple of 8",
    19: "fault:bar.sync 1, 48: the thread count must be a positive multiple of 32",
    20: r"fault:shared memory .* \(operand B\) read by this wgmma changed before the wgmma.wait_group",
}
MISUSE_NAMES = {1: "deadlock-tx-never-arrives", 2: "arrive-underflow", 3: "tma-into-stage-being-read",
                4: "wgmma-before-tma-wait", 5: "wgmma-without-fence", 6: "accumulator-written-in-flight",
                8: "desc-outside-allocation", 9: "desc-misaligned-swizzle", 10: "desc-reserved-bits",
                11: "desc-differs-in-warpgroup", 12: "deadlock-missing-arrival", 13: "mbarrier-not-initialised",
                14: "tma-rank-mismatch", 15: "tma-misaligned-smem", 16: "tma-unencoded-map",
                17: "setmaxnreg-below-24", 18: "setmaxnreg-not-multiple-of-8", 19: "named-barrier-count",
                20: "operand-overwritten-in-flight"}

# st_sm90_encode: invalid argument -> the reason the emulated driver must give (0, 15: valid maps)
ENCODE = {1: "tensorRank 0", 2: "tensorRank 6", 3: "globalAddress .* not 16-byte aligned",
          4: r"globalStrides\[0\] = 120", 5: r"boxDim\[1\] = 257", 6: "not a multiple of 16",
          7: "exceeds the 128-byte swizzle span", 8: "exceeds the 32-byte swizzle span", 9: r"globalDim\[1\] = 0",
          10: r"globalDim\[0\] = 4294967297", 11: r"elementStrides\[1\] = 9", 12: "NaN out-of-bounds fill",
          13: r"globalStrides\[0\] = 1099511627776", 14: "not 64-byte aligned"}


def _cases():
    cases = [
        Case("sm90-layout-fragments-vs-cute", S, "run_layout_fragments"),
        Case("sm90-layout-descriptors-vs-cute", S, "run_layout_descriptors"),
        Case("sm90-layout-tma-swizzle-vs-cute", S, "run_layout_tma"),
    ]
    spans = {0: (128, 64, 32, 16), 1: (128, 16), 2: (32, 128), 3: (16, 128), 4: (64, 128), 5: (128, 32),
             6: (64, 16), 7: (128,), 8: (128, 64)}
    for v, (n, bf16, sa, ta, tb, rs) in GEMM.items():
        for span in spans[v]:
            name = (f"sm90-wgmma-{'rs' if rs else 'ss'}-{'bf16' if bf16 else 'fp16'}-n{n}-"
                    f"{'none' if span == 16 else f'sw{span}'}{'-transa' if ta else ''}{'-transb' if tb else ''}"
                    f"{'-nega' if sa < 0 else ''}")
            cases.append(Case(name, S, "run_gemm", dict(variant=v, span=span)))
    cases += [
        Case("sm90-wgmma-ss-bf16-n64-sw128-c-input-two-groups", S, "run_gemm",
             dict(variant=0, span=128, split=1, with_c=True)),
        Case("sm90-wgmma-ss-bf16-n64-sw128-c-input", S, "run_gemm", dict(variant=0, span=128, with_c=True)),
        Case("sm90-wgmma-ss-bf16-n64-sw128-two-groups", S, "run_gemm", dict(variant=0, span=128, split=1)),
        Case("sm90-wgmma-rs-bf16-n128-sw128-transb-c-input-two-groups", S, "run_gemm",
             dict(variant=5, span=128, split=1, with_c=True)),
        Case("sm90-wgmma-ss-fp16-n256-sw128-transb-at-issue", S, "run_gemm", dict(variant=1, span=128, split=1),
             wgmma_at_issue=True, tma_at_issue=True),
        Case("sm90-wgmma-generic-operands-with-fence", S, "run_generic_operands", dict(with_fence=1)),
        Case("sm90-wgmma-immediate-scale-d", S, "run_generic_operands", dict(with_fence=2)),
        Case("sm90-tma-2d-bf16-sw128", S, "run_tma_copy",
             dict(dtype="bf16", swizzle=3, dims=[64, 40], box=[64, 16], cin=[0, 8], cout=[0, 20])),
        Case("sm90-tma-2d-fp16-sw64-oob-zero-and-clipped-store", S, "run_tma_copy",
             dict(dtype="fp16", swizzle=2, dims=[40, 12], box=[32, 8], cin=[-3, -2], cout=[24, 7])),
        Case("sm90-tma-3d-fp32-none-oob-nan", S, "run_tma_copy",
             dict(dtype="fp32", swizzle=0, oob=1, dims=[12, 5, 3], box=[8, 4, 2], cin=[8, 3, 2], cout=[0, 1, 1])),
        Case("sm90-tma-4d-bf16-sw32-padded-strides", S, "run_tma_copy",
             dict(dtype="bf16", swizzle=1, dims=[24, 3, 4, 2], box=[16, 2, 3, 2], cin=[8, 1, 2, 0], cout=[0, 0, 0, 0],
                  pad=8)),
        Case("sm90-tma-5d-fp16-none", S, "run_tma_copy",
             dict(dtype="fp16", swizzle=0, dims=[16, 3, 2, 3, 2], box=[8, 2, 2, 2, 2], cin=[4, 2, 1, 2, 1],
                  cout=[8, 0, 0, 0, 0])),
        Case("sm90-tma-store-generic-with-fence", S, "run_tma_store_generic", dict(with_fence=1)),
        Case("sm90-elect-sync", S, "run_elect"),
        Case("sm90-stmatrix", S, "run_stmatrix"),
        Case("sm90-driver-entry-points", S, "run_entry_points"),
        Case("sm90-encode-tensor-map-valid", S, "run_encode", dict(which=0)),
        Case("sm90-encode-tensor-map-valid-rank5", S, "run_encode", dict(which=15)),
        Case("sm90-misuse-control-passes", S, "run_misuse", dict(bug=0)),
        Case("sm90-accumulator-read-in-flight-is-nan", S, "run_misuse", dict(bug=7)),
    ]
    for which, why in ENCODE.items():
        cases.append(Case(f"sm90-encode-rejects-{which}", S, "run_encode", dict(which=which, reason=why)))
    names = ["forward", "reverse", "shuffled", "greedy", "greedy-reverse"]
    for order, nm in enumerate(names):
        cases.append(Case(f"sm90-pipeline-{nm}", S, "run_pipeline", dict(kblocks=5), thread_order=order))
    cases += [
        Case("sm90-pipeline-async-at-issue", S, "run_pipeline", dict(kblocks=4), wgmma_at_issue=True,
             tma_at_issue=True),
        Case("sm90-pipeline-greedy-tma-at-issue", S, "run_pipeline", dict(kblocks=4), thread_order=3,
             tma_at_issue=True),
    ]
    # deliberate misuses
    for bug, expect in MISUSE.items():
        cases.append(Case(f"sm90-detects-{MISUSE_NAMES[bug]}", S, "run_misuse", dict(bug=bug), expect=expect))
    cases += [
        Case("sm90-detects-wgmma-reading-stores-without-proxy-fence", S, "run_generic_operands", dict(with_fence=0),
             expect="fault:wgmma.mma_async reads shared memory .* written by ordinary stores with no "
                    "fence.proxy.async"),
        Case("sm90-detects-tma-store-of-stores-without-proxy-fence", S, "run_tma_store_generic", dict(with_fence=0),
             expect="fault:TMA store reads shared memory .* written by ordinary stores with no fence.proxy.async"),
        Case("sm90-detects-tma-store-source-overwritten-in-flight", S, "run_tma_store_generic",
             dict(with_fence=1, overwrite=1), expect="fault:overwritten before cp.async.bulk.wait_group"),
        Case("sm90-detects-tma-store-at-negative-coordinate", S, "run_tma_copy",
             dict(dtype="bf16", swizzle=3, dims=[64, 40], box=[64, 16], cin=[0, 8], cout=[0, -1]),
             expect="fault:TMA store with a negative coordinate"),
        Case("sm90-detects-warp-arriving-twice-at-named-barrier", S, "run_named_twice",
             expect="fault:warp 0 arrives again at named barrier 1"),
        Case("sm90-detects-deadlock-greedy", S, "run_misuse", dict(bug=1), thread_order=3, expect=MISUSE[1]),
        Case("sm90-detects-sm90-instruction-on-sm80-device", S, "run_misuse", dict(bug=0), compute_capability=80,
             expect="fault:an sm_90 instruction .* on the emulated sm_80 device"),
        Case("sm90-detects-setmaxnreg-beyond-register-pool", S, "run_setmaxnreg_pool",
             expect="fault:deadlock.*setmaxnreg.inc.sync.aligned.u32 240 .*waits for registers"),
    ]
    return cases


CASES = _cases()


# ---- layouts --------------------------------------------------------------------------------------------------

def run_layout_fragments(lib):
    f = bind(lib, "gptk_emu_sm90_fragment", None, ci, ci, vp, vp)
    for which, ns in ((0, range(8, 257, 8)), (1, [16])):
        for n in ns:
            nv = n // 2 if which == 0 else 8
            row = (ctypes.c_int * (128 * nv))()
            col = (ctypes.c_int * (128 * nv))()
            f(which, n, row, col)
            got = list(zip(row, col))
            want = M.fragment_coords(M.clayout_64xn(n) if which == 0 else M.alayout_64x16(), nv)
            name = f"accumulator m64n{n}k16" if which == 0 else "register A m64k16"
            for i, (g, w) in enumerate(zip(got, want)):
                assert g == w, f"{name}: thread {i // nv} value {i % nv}: emulator {g}, CuTe {w}"
            cols = n if which == 0 else 16
            assert sorted(got) == sorted((r, c) for r in range(64) for c in range(cols)), \
                f"{name}: not a bijection onto the tile"


def run_layout_descriptors(lib):
    f = bind(lib, "gptk_emu_sm90_desc_addrs", None, ctypes.c_uint64, ci, ci, vp)
    checked = 0
    for layout in (M.INTERLEAVE, M.B32, M.B64, M.B128):
        span = 16 * M.WIDTH[layout]
        for mn_major in (False, True):
            for rows in (8, 24, 64, 128, 256):
                for start, lbo, sbo in ((0x2000, 0x400, 0x100), (0x8000 + (32 if span >= 64 else 0), 0x800, 0x400),
                                        (0x400, 16 * rows, 128), (0x10000 + 16 * (span // 32), 0x1230, 0x2340)):
                    if layout != M.INTERLEAVE and not mn_major and start % (8 * span) >= span:
                        continue
                    desc = M.make_desc(start, lbo, sbo, layout)
                    out = (ctypes.c_uint32 * (rows * 16))()
                    f(desc, int(mn_major), rows, out)
                    for mn in range(rows):
                        for k in range(16):
                            want = M.desc_address(desc, mn_major, rows, mn, k)
                            got = out[mn * 16 + k]
                            assert got == want, (f"descriptor 0x{desc:016x} ({['none', '128B', '64B', '32B'][layout]}, "
                                                 f"{'MN' if mn_major else 'K'}-major, {rows} rows): element "
                                                 f"({mn}, {k}) at 0x{got:x}, CuTe 0x{want:x}")
                            checked += 1
    assert checked > 100000, checked


def run_layout_tma(lib):
    f = bind(lib, "gptk_emu_sm90_tma_chunks", None, ci, ctypes.c_uint32, ci, vp)
    for swz in range(4):
        for base in (0, 1024, 8192, 0x20000):
            n = 256
            out = (ctypes.c_uint32 * n)()
            f(swz, base, n, out)
            for c in range(n):
                want = M.tma_chunk_address(swz, base, 16 * c)
                assert out[c] == want, f"TMA swizzle {swz} base 0x{base:x} chunk {c}: 0x{out[c]:x}, CuTe 0x{want:x}"
            assert sorted(out) == [base + 16 * c for c in range(n)], "the swizzle must permute the chunks"


# ---- wgmma ------------------------------------------------------------------------------------------------

def run_gemm(lib, variant, span, split=0, with_c=False):
    n, bf16, sa, ta, tb, rs = GEMM[variant]
    dt = torch.bfloat16 if bf16 else torch.float16
    g = torch.Generator().manual_seed(100 + variant * 7 + span)
    A = torch.randn(64, 64, generator=g).to(dt)   # [M][K]
    B = torch.randn(64, n, generator=g).to(dt)    # [K][N]
    C = torch.randn(64, n, generator=g) if with_c else None
    a_store = (A.t() if ta else A).contiguous()
    b_store = (B if tb else B.t()).contiguous()
    a_row = A.contiguous()
    D = torch.full((64, n), float("nan"))
    fn = bind(lib, "st_sm90_gemm", ci, ci, vp, vp, vp, vp, vp, ci, ci)
    check(lib, fn(variant, ptr(a_store), ptr(a_row), ptr(b_store), ptr(C), ptr(D), span, split), "wgmma gemm")
    want = sa * (A.double() @ B.double()) + (C.double() if C is not None else 0)
    scale = A.double().abs() @ B.double().abs() + (C.double().abs() if C is not None else 0)
    # four fp32 roundings (one per wgmma k-step)
    bad = ~((D.double() - want).abs() <= 4 * 2.0**-24 * scale + 1e-30)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {D.numel()} elements wrong; first ({i // n}, {i % n}): "
                             f"{D.flatten()[i].item()!r} vs {want.flatten()[i].item()!r}")


def run_generic_operands(lib, with_fence):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    B = torch.randn(64, 16, generator=g).to(torch.bfloat16)  # [N][K]
    D = torch.full((64, 64), float("nan"))
    fn = bind(lib, "st_sm90_generic_operands", ci, vp, vp, vp, ci)
    check(lib, fn(ptr(A), ptr(B), ptr(D), with_fence), "generic operands")
    want = A.double() @ B.double().t()
    if with_fence == 2:
        want = 2 * want
    torch.testing.assert_close(D.double(), want, atol=1e-6, rtol=2.0**-23)


def run_misuse(lib, bug):
    g = torch.Generator().manual_seed(5)
    A = torch.randn(64, 64, generator=g).to(torch.bfloat16)
    B = torch.randn(64, 64, generator=g).to(torch.bfloat16)  # [N][K]
    D = torch.full((64, 64), float("nan"))
    fn = bind(lib, "st_sm90_misuse", ci, vp, vp, vp, ci)
    check(lib, fn(ptr(A), ptr(B), ptr(D), bug), f"misuse {bug}")
    want = A[:, :16].double() @ B[:, :16].double().t()
    if bug == 7:
        assert D[0, 0].isnan(), f"an accumulator read before wgmma.wait_group must read the poison NaN, got {D[0, 0]}"
        D[0, 0] = want[0, 0]
    torch.testing.assert_close(D.double(), want, atol=1e-6, rtol=2.0**-23)


# ---- TMA ---------------------------------------------------------------------------------------------------

TMA_DTYPES = {"bf16": (torch.bfloat16, 9), "fp16": (torch.float16, 6), "fp32": (torch.float32, 7)}


def run_tma_copy(lib, dtype, swizzle, dims, box, cin, cout, oob=0, pad=0):
    dt, code = TMA_DTYPES[dtype]
    rank = len(dims)
    es = torch.tensor([], dtype=dt).element_size()
    pitch = dims[0] + pad  # elements per row (rows padded by `pad`)
    shape = list(reversed(dims[1:])) + [pitch]
    g = torch.Generator().manual_seed(rank)
    src = torch.randn(shape, generator=g).to(dt)
    out = torch.full(shape, -7.0).to(dt)
    strides = []
    acc = pitch * es
    for d in range(1, rank):
        strides.append(acc)
        acc *= dims[d]
    nbox = 1
    for b in box:
        nbox *= b
    raw = torch.zeros(nbox * es, dtype=torch.uint8)
    u64, u32, i32 = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int
    fn = bind(lib, "st_sm90_tma_copy", ci, ci, ci, ci, ci, vp, vp, vp, vp, vp, vp, vp, vp)
    err = fn(rank, code, swizzle, oob, (u64 * 5)(*dims), (u64 * 4)(*strides), (u32 * 5)(*box), ptr(src), ptr(out),
             (i32 * 5)(*cin), (i32 * 5)(*cout), ptr(raw))
    check(lib, err, "tma copy")
    # the box as TMA reads it: dimension 0 innermost, out-of-bounds elements filled
    fill = float("nan") if oob else 0.0
    boxv = torch.full(list(reversed(box)), fill).to(dt)
    import itertools
    for idx in itertools.product(*[range(b) for b in reversed(box)]):
        i = list(reversed(idx))  # i[0] innermost
        gco = [c + j for c, j in zip(cin, i)]
        if all(0 <= x < d for x, d in zip(gco, dims)):
            boxv[idx] = src[tuple(reversed(gco[1:])) + (gco[0],)]
    # shared-memory image: dense box bytes, 16-byte chunks placed by the swizzle (buffer at a 1024-aligned base)
    dense = boxv.contiguous().view(torch.uint8).flatten()
    img = torch.zeros_like(dense)
    for c in range(dense.numel() // 16):
        a = M.tma_chunk_address(swizzle, 0, 16 * c)
        img[a:a + 16] = dense[16 * c:16 * c + 16]
    a, b = raw.view(dt), img.view(dt)  # (NaN fill: any NaN)
    same = (a == b) | (a.isnan() & b.isnan())
    assert bool(same.all()), f"shared-memory image differs at element {int((~same).nonzero()[0])}"
    # the store: in-bounds elements of the box at cout, nothing else
    want = torch.full(shape, -7.0).to(dt)
    for idx in itertools.product(*[range(b) for b in reversed(box)]):
        i = list(reversed(idx))
        gco = [c + j for c, j in zip(cout, i)]
        if all(0 <= x < d for x, d in zip(gco, dims)):
            want[tuple(reversed(gco[1:])) + (gco[0],)] = boxv[idx]
    eq = (out == want) | (out.isnan() & want.isnan())
    assert bool(eq.all()), f"stored tensor differs at {tuple(int(x) for x in (~eq).nonzero()[0])}"


def run_tma_store_generic(lib, with_fence, overwrite=0):
    out = torch.full((16, 64), -1, dtype=torch.int16)
    fn = bind(lib, "st_sm90_tma_store_generic", ci, vp, ci, ci)
    check(lib, fn(ptr(out), with_fence, overwrite), "tma store of ordinary stores")
    assert torch.equal(out.flatten(), torch.arange(64 * 16, dtype=torch.int16)), "stored values"


# ---- pipeline, elect, stmatrix, named barriers ------------------------------------------------------------------

def run_pipeline(lib, kblocks):
    g = torch.Generator().manual_seed(kblocks)
    K = 64 * kblocks
    A = torch.randn(128, K, generator=g).to(torch.bfloat16)
    B = torch.randn(64, K, generator=g).to(torch.bfloat16)
    O = torch.full((128, 64), float("nan")).to(torch.bfloat16)
    fn = bind(lib, "st_sm90_pipeline", ci, vp, vp, vp, ci)
    check(lib, fn(ptr(A), ptr(B), ptr(O), kblocks), "pipeline")
    ref = A.double() @ B.double().t()
    scale = A.double().abs() @ B.double().abs().t()
    err = (O.double() - ref).abs()
    bound = 2.0**-8 * ref.abs() + 4 * kblocks * 2.0**-24 * scale + 1e-30
    assert bool((err <= bound).all()), f"pipeline output: max error {err.max().item()} (worst allowed {bound.min()})"
    launches = harness.launches(lib)
    assert any("pipeline_kernel" in ln for ln in launches), launches


def run_elect(lib):
    out = torch.full((16,), -1, dtype=torch.int32)
    check(lib, bind(lib, "st_sm90_elect", ci, vp, ci)(ptr(out), 96), "elect")
    assert out[:3].tolist() == [0, 0, 0], f"leaders {out[:3].tolist()} (the emulator elects the lowest lane)"
    assert out[8:11].tolist() == [1, 1, 1], f"one leader per warp, got {out[8:11].tolist()}"


def run_stmatrix(lib):
    out = torch.zeros(384, dtype=torch.int16)
    check(lib, bind(lib, "st_sm90_stmatrix", ci, vp)(ptr(out)), "stmatrix")
    s = out[:256].view(16, 16).tolist()
    for i in range(4):
        for r in range(8):
            for c in range(8):
                got = s[8 * (i % 2) + r][8 * (i // 2) + c]
                assert got == 1000 * i + 10 * r + c, f"x4 matrix {i} ({r}, {c}): {got}"
    s2 = out[256:].view(16, 8).tolist()
    for m in range(2):
        for r in range(8):
            for c in range(8):
                assert s2[8 * m + r][c] == 100 * m + 10 * r + c, f"x2.trans matrix {m} ({r}, {c}): {s2[8 * m + r][c]}"


def run_setmaxnreg_pool(lib):
    out = torch.zeros(384, dtype=torch.int32)
    check(lib, bind(lib, "st_sm90_setmaxnreg_pool", ci, vp)(ptr(out)), "setmaxnreg pool")


def run_named_twice(lib):
    out = torch.zeros(64, dtype=torch.int32)
    check(lib, bind(lib, "st_sm90_named_twice", ci, vp)(ptr(out)), "named barrier twice")


def run_entry_points(lib):
    r = bind(lib, "st_sm90_entry_points", ci)()
    assert r == 0, f"driver entry point check {r} failed"


def run_encode(lib, which, reason=None):
    import re

    base = torch.zeros(64 * 32 * 4 * 2 * 2 + 64, dtype=torch.bfloat16)
    r = bind(lib, "st_sm90_encode", ci, ci, vp)(which, ptr(base))
    why = bind(lib, "gptk_emu_api_log", ctypes.c_char_p)().decode()
    if reason is None:
        assert r == 0, f"a valid tensor map was rejected ({r}): {why}"
    else:
        assert r == 1, f"expected CUDA_ERROR_INVALID_VALUE, got {r}"
        assert re.search(reason, why), f"the reason {why!r} does not match {reason!r}"


emu_results, test_emulated = harness.pytest_tests(__file__, CASES)

if __name__ == "__main__":
    sys.exit(harness.main(__file__, CASES, sys.argv))
