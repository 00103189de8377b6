"""An independent model of the sm_90 layouts the emulator implements (tests/emulator/cuda_emu_sm90.cpp),
written from NVIDIA's own definitions in CUTLASS/CuTe (NVIDIA/cutlass at
7107b05535f8977f5ecb9d01ee203205b1fd9bc4) by evaluating CuTe's layout algebra literally, not by
transcribing the emulator's closed forms:

- a CuTe Layout (include/cute/layout.hpp): a (nested) shape and stride; an integer coordinate is split
  colexicographically over the shape (first mode fastest) and the index is the inner product with the
  strides;
- Swizzle<B,M,S> (include/cute/swizzle.hpp:54-79): offset ^ ((offset & yyy_msk) >> S), yyy_msk =
  (2^B - 1) << (M + S), applied to the byte address (include/cute/pointer_swizzle.hpp:86-88);
- the GMMA descriptor bit fields (include/cute/arch/mma_sm90_desc.hpp:108-125) and layout types
  (lines 48-53; Swizzle bits per layout type: include/cute/atom/mma_traits_sm90_gmma.hpp:145-150);
- the canonical layouts a descriptor describes, in units of uint128_t (make_gmma_desc,
  mma_traits_sm90_gmma.hpp:229-234 for MN-major, 263-268 for K-major);
- the accumulator layout CLayout_64xN (mma_traits_sm90_gmma.hpp:433-435) and the register-A layout
  ALayout_64x16 (lines 450-452), maps from (thread, value) to the column-major index of the tile;
- TMA boxes: dense in shared memory, dimension 0 innermost (cuda.h, cuTensorMapEncodeTiled), then
  Swizzle<B,4,3> with B = 1, 2, 3 for the 32B, 64B, 128B modes
  (include/cute/atom/copy_traits_sm90_tma_swizzle.hpp:44-56).
"""
from __future__ import annotations


# ---- CuTe layouts ---------------------------------------------------------------------------------------

def _flatten(x):
    if isinstance(x, tuple):
        out = []
        for y in x:
            out += _flatten(y)
        return out
    return [x]


def _size(shape) -> int:
    n = 1
    for s in _flatten(shape):
        n *= s
    return n


class Layout:
    """A CuTe layout shape:stride (nested tuples of ints)."""

    def __init__(self, shape, stride):
        assert len(_flatten(shape)) == len(_flatten(stride)), (shape, stride)
        self.shape, self.stride = shape, stride

    def mode(self, i: int) -> "Layout":
        return Layout(self.shape[i], self.stride[i])

    def __call__(self, *coord) -> int:
        """Coordinate: one integer (over the whole layout) or one integer per top-level mode."""
        if len(coord) == 1:
            return self._eval(self.shape, self.stride, coord[0])
        assert len(coord) == len(self.shape)
        return sum(self._eval(s, d, c) for s, d, c in zip(self.shape, self.stride, coord))

    @staticmethod
    def _eval(shape, stride, c: int) -> int:
        if not isinstance(shape, tuple):
            assert 0 <= c < shape, (c, shape)
            return c * stride
        idx = 0
        for s, d in zip(shape, stride):  # colexicographic: first mode fastest
            n = _size(s)
            idx += Layout._eval(s, d, c % n)
            c //= n
        assert c == 0
        return idx


class Swizzle:
    """cute::Swizzle<BBits, MBase, SShift> (swizzle.hpp:54-79), positive shift."""

    def __init__(self, b: int, m: int, s: int):
        assert s >= b >= 0 and m >= 0
        self.b, self.m, self.s = b, m, s
        self.bit_msk = (1 << b) - 1
        self.yyy_msk = self.bit_msk << (m + max(0, s))
        self.zzz_msk = self.bit_msk << (m - min(0, s))

    def __call__(self, offset: int) -> int:
        return offset ^ ((offset & self.yyy_msk) >> self.s)


# ---- GMMA matrix descriptors ------------------------------------------------------------------------------

INTERLEAVE, B128, B64, B32 = 0, 1, 2, 3           # mma_sm90_desc.hpp:48-53
SWIZZLE_BITS = {INTERLEAVE: 0, B32: 1, B64: 2, B128: 3}  # mma_traits_sm90_gmma.hpp:145-150
WIDTH = {INTERLEAVE: 1, B32: 2, B64: 4, B128: 8}  # W of make_gmma_desc, lines 222-225


def desc_fields(desc: int) -> dict:
    """mma_sm90_desc.hpp:108-125: 14-bit start address / LBO / SBO in 16-byte units at bits 0, 16, 32;
    3-bit base offset at bit 49; 2-bit layout type at bit 62."""
    return dict(start=(desc & 0x3FFF) << 4, lbo=((desc >> 16) & 0x3FFF) << 4, sbo=((desc >> 32) & 0x3FFF) << 4,
                base_offset=(desc >> 49) & 7, layout=(desc >> 62) & 3)


def make_desc(start: int, lbo: int, sbo: int, layout: int) -> int:
    return (start >> 4) & 0x3FFF | ((lbo >> 4) & 0x3FFF) << 16 | ((sbo >> 4) & 0x3FFF) << 32 | layout << 62


def canonical_u128(layout: int, mn_major: bool, rows: int, lbo16: int, sbo16: int) -> Layout:
    """The canonical layout in uint128_t units (make_gmma_desc comments, mma_traits_sm90_gmma.hpp:229-234
    MN-major, 263-268 K-major); lbo16 / sbo16: the descriptor fields (16-byte units).
    K-major coordinates: (MN row, K chunk of 8 elements); MN-major: (MN chunk of 8 elements, K row)."""
    w = WIDTH[layout]
    if not mn_major:
        n = rows // 8
        if layout == INTERLEAVE:
            return Layout(((8, n), 2), ((1, sbo16), lbo16))
        return Layout(((8, n), 2), ((w, sbo16), 1))
    chunks = -(-rows // 8)  # uint128_t along MN
    if layout == INTERLEAVE:
        return Layout(((1, chunks), (8, 2)), ((1, sbo16), (1, lbo16)))  # (the X stride of a size-1 mode: unused)
    return Layout(((w, -(-chunks // w)), (8, 2)), ((1, lbo16), (w, sbo16)))


def desc_address(desc: int, mn_major: bool, rows: int, mn: int, k: int) -> int:
    """Shared address of element (mn, k) (16-bit elements, k < 16) of the operand tile `desc` describes."""
    f = desc_fields(desc)
    lay = canonical_u128(f["layout"], mn_major, rows, f["lbo"] >> 4, f["sbo"] >> 4)
    if not mn_major:
        u = lay(mn, k // 8)
        e = k % 8
    else:
        u = lay(mn // 8, k)
        e = mn % 8
    return Swizzle(SWIZZLE_BITS[f["layout"]], 4, 3)(f["start"] + 16 * u + 2 * e)


# ---- register fragments --------------------------------------------------------------------------------------

def clayout_64xn(n: int) -> Layout:
    """CLayout_64xN, mma_traits_sm90_gmma.hpp:433-435."""
    return Layout(((4, 8, 4), (2, 2, n // 8)), ((128, 1, 16), (64, 8, 512)))


def alayout_64x16() -> Layout:
    """ALayout_64x16, mma_traits_sm90_gmma.hpp:450-452."""
    return Layout(((4, 8, 4), (2, 2, 2)), ((128, 1, 16), (64, 8, 512)))


def fragment_coords(layout: Layout, nvals: int) -> list[tuple[int, int]]:
    """(row, col) of value v of thread t, at [t * nvals + v]: the layout's index into the column-major
    64-row tile (CuTe MMA layouts map (thread, value) to the M x N tile column-major)."""
    out = []
    for t in range(128):
        for v in range(nvals):
            idx = layout(t, v)
            out.append((idx % 64, idx // 64))
    return out


# ---- TMA ---------------------------------------------------------------------------------------------------------

TMA_SWIZZLE_BITS = {0: 0, 1: 1, 2: 2, 3: 3}  # CU_TENSOR_MAP_SWIZZLE_NONE/32B/64B/128B -> B


def tma_chunk_address(swizzle: int, smem: int, byte: int) -> int:
    """Shared address of byte `byte` of the dense box image (a 16-byte chunk keeps its bytes together)."""
    return Swizzle(TMA_SWIZZLE_BITS[swizzle], 4, 3)(smem + byte)
