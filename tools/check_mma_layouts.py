#!/usr/bin/env python3
"""Check the attention kernels' shared-memory and fragment index math without a GPU.

A numpy model of the PTX semantics the kernels rely on (swizzled tiles, ldmatrix.x4 with and
without .trans, mma.m16n8k16 fragment layouts, the accumulator -> A-operand reuse of P) runs the
address formulas transcribed from csrc/attention/mma.cuh and compares every warp-tile product
with a plain matrix product. Each function here names the C++ function it mirrors; keep the two in
step when either changes. Run: python tools/check_mma_layouts.py (exit 1 on a mismatch).

PTX facts modelled (PTX ISA: ldmatrix; "Matrix Fragments for mma.m16n8k16 with floating point type"):
- ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i (8 x 16 bytes), which lands in
  register i. Without .trans lane t receives row t/4, elements 2(t%4), 2(t%4)+1; with .trans it
  receives elements (row 2(t%4), col t/4) and (row 2(t%4)+1, col t/4).
- mma A regs: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
  B regs: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; C: c0,c1 = C[g][2t..], c2,c3 = C[g+8][2t..]
  with g = lane/4, t = lane%4.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_instantiations import head_dims  # noqa: E402  (the head dims of csrc/attention/attention_limits.h)

# ---- shared tiles (mma.cuh: swz, load_tile_async) ---------------------------------------------


def swz(cols, row, chunk):
    return row * (cols * 2) + ((chunk ^ (row & 7)) << 4)


class Tile:
    """A swizzled tile of 16-bit elements at byte address `base` of a shared memory model."""

    def __init__(self, smem, base, rows, cols):
        self.smem, self.base, self.rows, self.cols = smem, base, rows, cols

    def store(self, m):  # what load_tile_async / store_acc_to_smem do: element (r, c) -> swizzled address
        for r in range(self.rows):
            for c in range(self.cols):
                self.smem[(self.base + swz(self.cols, r, c // 8) + (c % 8) * 2) // 2] = m[r, c]


def ldsm_x4(smem, addrs, trans):
    """addrs[lane] = byte address of row lane%8 of matrix lane//8. Returns regs[lane][i] = (lo, hi)."""
    mats = []
    for i in range(4):
        m = np.empty((8, 8))
        for r in range(8):
            a = addrs[8 * i + r]
            assert a % 16 == 0, "ldmatrix row address not 16-byte aligned"
            m[r] = smem[a // 2: a // 2 + 8]
        mats.append(m)
    regs = []
    for t in range(32):
        if trans:
            regs.append([(mats[i][2 * (t % 4), t // 4], mats[i][2 * (t % 4) + 1, t // 4]) for i in range(4)])
        else:
            regs.append([(mats[i][t // 4, 2 * (t % 4)], mats[i][t // 4, 2 * (t % 4) + 1]) for i in range(4)])
    return regs


def mma(acc, a, b0, b1):
    """acc[lane] = [c0..c3] += A (from a[lane][0..3]) x B (from b0[lane], b1[lane])."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 2 * t: 2 * t + 2] = a[lane][0]
        A[g + 8, 2 * t: 2 * t + 2] = a[lane][1]
        A[g, 2 * t + 8: 2 * t + 10] = a[lane][2]
        A[g + 8, 2 * t + 8: 2 * t + 10] = a[lane][3]
        B[2 * t: 2 * t + 2, g] = b0[lane]
        B[2 * t + 8: 2 * t + 10, g] = b1[lane]
    C = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        acc[lane][0] += C[g, 2 * t]
        acc[lane][1] += C[g, 2 * t + 1]
        acc[lane][2] += C[g + 8, 2 * t]
        acc[lane][3] += C[g + 8, 2 * t + 1]


# ---- operand pointers (mma.cuh: thread_off_x/y, operand_a/b) ----------------------------------

def thread_off_x(cols, lane):
    return (lane & 15) * cols * 2 + (((lane >> 4) ^ (lane & 7)) << 4)


def thread_off_y(cols, lane):
    r = (lane & 7) + ((lane >> 4) << 3)
    return r * cols * 2 + ((((lane >> 3) & 1) ^ (lane & 7)) << 4)


def operand_a(tile, a_row0, lane, trans):
    if trans:
        return (tile.base + thread_off_y(tile.cols, lane)) ^ ((a_row0 >> 3) << 4)
    return tile.base + thread_off_x(tile.cols, lane) + a_row0 * tile.cols * 2


def operand_b(tile, b_col0, lane, trans):
    if trans:
        return (tile.base + thread_off_x(tile.cols, lane)) ^ ((b_col0 >> 3) << 4)
    return tile.base + thread_off_y(tile.cols, lane) + b_col0 * tile.cols * 2


def warp_gemm_ss(MT, NT, K, ta, a_row0, tb, b_col0, a_trans, b_trans):
    """mma.cuh warp_gemm_ss: returns acc[mt][nt][lane][4]."""
    acc = [[[[0.0] * 4 for _ in range(32)] for _ in range(NT)] for _ in range(MT)]
    pa = [operand_a(ta, a_row0, lane, a_trans) for lane in range(32)]
    pb = [operand_b(tb, b_col0, lane, b_trans) for lane in range(32)]
    for ks in range(K // 16):
        a = []
        for mt in range(MT):
            if a_trans:
                addrs = [(pa[l] ^ ((2 * mt) << 4)) + ks * 16 * ta.cols * 2 for l in range(32)]
            else:
                addrs = [(pa[l] ^ ((2 * ks) << 4)) + mt * 16 * ta.cols * 2 for l in range(32)]
            a.append(ldsm_x4(ta.smem, addrs, a_trans))
        for np_ in range(NT // 2):
            if b_trans:
                addrs = [(pb[l] ^ ((2 * np_) << 4)) + ks * 16 * tb.cols * 2 for l in range(32)]
            else:
                addrs = [(pb[l] ^ ((2 * ks) << 4)) + np_ * 16 * tb.cols * 2 for l in range(32)]
            b = ldsm_x4(tb.smem, addrs, b_trans)
            for mt in range(MT):
                mma(acc[mt][2 * np_], a[mt], [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
                mma(acc[mt][2 * np_ + 1], a[mt], [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
    return acc


def acc_to_matrix(acc, MT, NT):
    """C fragments -> the (MT*16) x (NT*8) warp tile."""
    C = np.zeros((MT * 16, NT * 8))
    for mt in range(MT):
        for nt in range(NT):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                r, c = mt * 16 + g, nt * 8 + 2 * t
                C[r, c], C[r, c + 1], C[r + 8, c], C[r + 8, c + 1] = acc[mt][nt][lane]
    return C


def check(name, got, want):
    ok = np.allclose(got, want)
    print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return ok


def main():
    rng = np.random.default_rng(0)
    smem = np.zeros(1 << 17)
    ok = True
    for D in head_dims():
        # forward: S = Q K^T (A = Q [m][d], B^T = K [n][d]); warp rows at 32 (MT = 2)
        Q = rng.integers(-4, 5, (128, D)).astype(float)
        Kt = rng.integers(-4, 5, (64, D)).astype(float)
        tq, tk = Tile(smem, 0, 128, D), Tile(smem, 1 << 15, 64, D)
        tq.store(Q)
        tk.store(Kt)
        for warp_row0 in (0, 32, 96):
            acc = warp_gemm_ss(2, 8, D, tq, warp_row0, tk, 0, False, False)
            ok &= check(f"D{D} S = Q K^T rows {warp_row0}", acc_to_matrix(acc, 2, 8),
                        Q[warp_row0:warp_row0 + 32] @ Kt.T)
        # forward: O += P V with P taken from S's accumulators (flash_fwd_kernel.cuh), V [key][d]
        V = rng.integers(-4, 5, (64, D)).astype(float)
        tv = Tile(smem, 1 << 16, 64, D)
        tv.store(V)
        S = acc_to_matrix(warp_gemm_ss(2, 8, D, tq, 32, tk, 0, False, False), 2, 8)
        acc_s = warp_gemm_ss(2, 8, D, tq, 32, tk, 0, False, False)
        acc_o = [[[[0.0] * 4 for _ in range(32)] for _ in range(D // 8)] for _ in range(2)]
        pv = [operand_b(tv, 0, lane, True) for lane in range(32)]
        for ks in range(64 // 16):
            a = [[(tuple(acc_s[mt][2 * ks][l][0:2]), tuple(acc_s[mt][2 * ks][l][2:4]),
                   tuple(acc_s[mt][2 * ks + 1][l][0:2]), tuple(acc_s[mt][2 * ks + 1][l][2:4])) for l in range(32)]
                 for mt in range(2)]
            for dp in range(D // 16):
                addrs = [(pv[l] ^ ((2 * dp) << 4)) + ks * 16 * D * 2 for l in range(32)]
                b = ldsm_x4(smem, addrs, True)
                for mt in range(2):
                    mma(acc_o[mt][2 * dp], a[mt], [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
                    mma(acc_o[mt][2 * dp + 1], a[mt], [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
        ok &= check(f"D{D} O = P V (P from accumulators, V via ldmatrix.trans)", acc_to_matrix(acc_o, 2, D // 8),
                    S @ V)
        # backward patterns: dV = P^T dO (A^T from P [m][n] tile, B from dO [m][d] tile: both .trans)
        for (BM, BN) in ((64, 128), (128, 128), (64, 64)):
            P = rng.integers(-3, 4, (BM, BN)).astype(float)
            dO = rng.integers(-3, 4, (BM, D)).astype(float)
            tp, tdo = Tile(smem, 0, BM, BN), Tile(smem, 1 << 15, BM, D)
            tp.store(P)
            tdo.store(dO)
            for (MT, NT, n_row0, d_col0) in ((2, D // 16, 32, D // 2), (2, D // 16, 96 % BN, 0), (1, 4, 16, 32)):
                if n_row0 + MT * 16 > BN or d_col0 + NT * 8 > D:
                    continue
                acc = warp_gemm_ss(MT, NT, BM, tp, n_row0, tdo, d_col0, True, True)
                ok &= check(f"D{D} {BM}x{BN} dV = P^T dO rows {n_row0} cols {d_col0}",
                            acc_to_matrix(acc, MT, NT), (P.T @ dO)[n_row0:n_row0 + MT * 16, d_col0:d_col0 + NT * 8])
            # dQ = dS K: A = dS [m][n] (non-trans), B = K [n][d] (trans)
            Kb = rng.integers(-3, 4, (BN, D)).astype(float)
            tkb = Tile(smem, 1 << 16, BN, D)
            tkb.store(Kb)
            for (MT, NT, m_row0, d_col0) in ((1, D // 16, 16, D // 2), (2, D // 16, 32, 0)):
                if m_row0 + MT * 16 > BM:
                    continue
                acc = warp_gemm_ss(MT, NT, BN, tp, m_row0, tkb, d_col0, False, True)
                ok &= check(f"D{D} {BM}x{BN} dQ = dS K rows {m_row0} cols {d_col0}", acc_to_matrix(acc, MT, NT),
                            (P @ Kb)[m_row0:m_row0 + MT * 16, d_col0:d_col0 + NT * 8])
            # S = Q K^T and dP = dO V^T with a warp grid (rows, cols) inside the block
            Qb = rng.integers(-3, 4, (BM, D)).astype(float)
            tq2 = Tile(smem, 0, BM, D)
            tq2.store(Qb)
            for (MT, NT, m_row0, n_col0) in ((2, 4, 32, 96 % BN), (4, 4, 64 % BM, 32)):
                if m_row0 + MT * 16 > BM or n_col0 + NT * 8 > BN:
                    continue
                acc = warp_gemm_ss(MT, NT, D, tq2, m_row0, tkb, n_col0, False, False)
                ok &= check(f"D{D} {BM}x{BN} S = Q K^T warp ({m_row0}, {n_col0})", acc_to_matrix(acc, MT, NT),
                            (Qb @ Kb.T)[m_row0:m_row0 + MT * 16, n_col0:n_col0 + NT * 8])
    # store_acc_to_smem writes C fragments where the tile loader's swizzle expects them
    C = rng.integers(-9, 9, (32, 64)).astype(float)
    t = Tile(smem, 0, 64, 64)
    for r in range(32):  # mirror store_acc_to_smem(row0=32, col0=0): element (32 + r, c) at swz + (c & 7) * 2
        for c in range(64):
            smem[(t.base + swz(64, 32 + r, c >> 3) + (c & 7) * 2) // 2] = C[r, c]
    back = np.array([[smem[(swz(64, 32 + r, c // 8) + (c % 8) * 2) // 2] for c in range(64)] for r in range(32)])
    ok &= check("store_acc_to_smem / tile swizzle round trip", back, C)
    print("all layouts check out" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
