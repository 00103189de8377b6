// mask.cuh: which (query, key) pairs an attention score tile keeps (device code, shared by the
// forward, backward and, later, a Hopper path).
//
// Rule (flash.h): key j is visible to query i iff j < kv_len and, when causal, j <= i + offset
// with offset = kv_len - Sq (bottom-right alignment). Masked scores become -inf before the
// softmax, so exp() turns them into exact zeros.
//
// Tiles are mma.m16n8k16 accumulator fragments acc[MT][NT][4] of one warp: element (mt, nt, e)
// sits at row row0 + mt*16 + lane/4 + 8*(e/2) and column col0 + nt*8 + 2*(lane%4) + (e%2), rows and
// columns being absolute query / key indices.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace gptk {
namespace attn {

struct MaskInfo {
  int kv_len;      // keys >= kv_len are hidden
  int offset;      // kv_len - Sq
  bool causal;

  // Number of keys (from 0) visible to query `row`: keys [0, limit) are kept. (Sq, Sk < 2^30, as
  // the launchers require, so row + offset + 1 cannot overflow.)
  __device__ __forceinline__ int limit(int row) const {
    return causal ? min(max(row + offset + 1, 0), kv_len) : kv_len;
  }
  // True when the tile rows [m0, m0 + bm) x keys [n0, n0 + bn) has at least one hidden pair that
  // the kernel must mask explicitly (rows past Sq are harmless and not counted).
  __device__ __forceinline__ bool tile_needs_mask(int m0, int n0, int bn) const {
    return n0 + bn > kv_len || (causal && n0 + bn - 1 > m0 + offset);
  }
};

// Per row, the limit is turned into a count relative to this thread's first column, so that each
// element costs one compare with an immediate (nt*8 + j) instead of a column index in a register.
template <int MT, int NT>
__device__ __forceinline__ void apply_mask(float (&acc)[MT][NT][4], int row0, int col0, int lane, const MaskInfo& m) {
  const int g = lane >> 2, t = lane & 3;
  const int col_t = col0 + 2 * t;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int lim = m.limit(row0 + mt * 16 + g + 8 * h) - col_t;  // keep columns c with c - col_t < lim
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (nt * 8 + j >= lim) acc[mt][nt][2 * h + j] = -INFINITY;
        }
      }
    }
  }
}

}  // namespace attn
}  // namespace gptk
