// mask.cuh: which (query, key) pairs an attention score tile keeps, and where a sequence's rows are
// (device code, shared by the forward, backward, split-KV decode and the Hopper forward).
//
// Rule (flash.h): key j is visible to query i iff j < kv_len and, with offset = kv_len - Sq
// (bottom-right alignment), (wl < 0 or j >= i + offset - wl) and (wr < 0 or j <= i + offset + wr),
// where (wl, wr) = (window_left, window_right) and causal means wr = 0. So row i sees the keys
// [start(i), limit(i)). Masked scores become -inf before the softmax, so exp() turns them into exact
// zeros.
//
// Tiles are mma.m16n8k16 accumulator fragments acc[MT][NT][4] of one warp: element (mt, nt, e)
// sits at row row0 + mt*16 + lane/4 + 8*(e/2) and column col0 + nt*8 + 2*(lane%4) + (e%2), rows and
// columns being absolute query / key indices (relative to the sequence).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/mma.cuh"

namespace gptk {
namespace attn {

struct MaskInfo {
  int kv_len;      // keys >= kv_len are hidden
  int offset;      // kv_len - Sq
  bool causal;     // = window_right 0 (either may say it)
  int window_left = -1, window_right = -1;  // canonical (flash.h canonical_variants): < max(Sq, Sk)

  __device__ __forceinline__ int right() const { return causal ? 0 : window_right; }
  // Keys [start(row), limit(row)) are visible to query `row` (empty when start >= limit). (Sq, Sk <
  // 2^30 and windows below max(Sq, Sk), as the launchers require: no int overflow.)
  __device__ __forceinline__ int limit(int row) const {
    const int wr = right();
    return wr >= 0 ? min(max(row + offset + wr + 1, 0), kv_len) : kv_len;
  }
  __device__ __forceinline__ int start(int row) const {
    return window_left >= 0 ? max(row + offset - window_left, 0) : 0;
  }
  // True when the tile rows [m0, m0 + bm) x keys [n0, n0 + bn) has at least one hidden pair that
  // the kernel must mask explicitly (rows past Sq are harmless and may be counted either way).
  __device__ __forceinline__ bool tile_needs_mask(int m0, int bm, int n0, int bn) const {
    const int wr = right();
    return n0 + bn > kv_len || (wr >= 0 && n0 + bn - 1 > m0 + offset + wr) ||
           (window_left >= 0 && n0 < m0 + bm - 1 + offset - window_left);
  }
  // The Hopper forward's form (no left window there: flash_api.cu refuses it for that row).
  __device__ __forceinline__ bool tile_needs_mask(int m0, int n0, int bn) const {
    return n0 + bn > kv_len || (causal && n0 + bn - 1 > m0 + offset);
  }
};

// Per row, the bounds are turned into counts relative to this thread's first column, so that each
// element costs compares with an immediate (nt*8 + j) instead of a column index in a register.
template <int MT, int NT>
__device__ __forceinline__ void apply_mask(float (&acc)[MT][NT][4], int row0, int col0, int lane, const MaskInfo& m) {
  const int g = lane >> 2, t = lane & 3;
  const int col_t = col0 + 2 * t;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + mt * 16 + g + 8 * h;
      const int lim = m.limit(row) - col_t;  // keep columns c with first <= c - col_t < lim
      const int first = m.start(row) - col_t;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if (nt * 8 + j >= lim || nt * 8 + j < first) acc[mt][nt][2 * h + j] = -INFINITY;
        }
      }
    }
  }
}

// tanh for the softcap: 1 - 2 / (2^(2x log2 e) + 1), one ex2.approx and one approximate division
// (absolute error ~1e-7, what the capped scores need; tanhf costs registers the decode kernel lacks,
// tanh.approx.f32 is only ~2^-11 relative). Large |x| give exactly +-1.
__device__ __forceinline__ float softcap_tanh(float x) {
  return 1.f - __fdividef(2.f, fast_exp2(x * 2.8853900817779268f) + 1.f);
}

// Softcap on a tile of raw scores: s -> tanh(s * scale / cap); the caller's softmax then scales by
// cap (the capped score is cap * tanh(s * scale / cap)). Applied before the mask.
template <int MT, int NT>
__device__ __forceinline__ void apply_softcap(float (&acc)[MT][NT][4], float scale_over_cap) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = softcap_tanh(acc[mt][nt][e] * scale_over_cap);
}

// Where sequence b lives: query rows [q_off, q_off + sq) and key rows [k_off, k_off + sk) of the
// (packed, for varlen) tensors. Dense: offsets 0, sq = p.sq, sk = p.sk (kv_lens is the caller's).
// Varlen: from cu_seqlens, clamped so that rows stay inside [0, total) and lengths within the
// maxima the grids were sized for (bad cu_seqlens give wrong results, never out-of-bounds access).
struct SeqBounds {
  int q_off, k_off, sq, sk;
};
template <typename Params>
__device__ __forceinline__ SeqBounds seq_bounds(const Params& p, int b) {
  if (p.cu_seqlens_q == nullptr) return SeqBounds{0, 0, p.sq, p.sk};
  const int q0 = min(max(p.cu_seqlens_q[b], 0), p.total_q);
  const int q1 = min(max(p.cu_seqlens_q[b + 1], q0), p.total_q);
  const int k0 = min(max(p.cu_seqlens_k[b], 0), p.total_k);
  const int k1 = min(max(p.cu_seqlens_k[b + 1], k0), p.total_k);
  return SeqBounds{q0, k0, min(q1 - q0, p.sq), min(k1 - k0, p.sk)};
}

// Row of (sequence b, query head h, query i of the sequence) in lse / dq_accum style [B, Hq, Sq]
// (dense) or [Hq, total_q] (varlen) arrays; q_off from seq_bounds.
template <typename Params>
__device__ __forceinline__ int64_t q_row(const Params& p, int b, int h, int q_off, int i) {
  return p.cu_seqlens_q != nullptr ? static_cast<int64_t>(h) * p.total_q + q_off + i
                                   : (static_cast<int64_t>(b) * p.hq + h) * p.sq + i;
}
// The same for keys: [B, Hkv, Sk] or [Hkv, total_k] (the backward's partial dK/dV).
template <typename Params>
__device__ __forceinline__ int64_t k_row(const Params& p, int b, int hk, int k_off, int j) {
  return p.cu_seqlens_k != nullptr ? static_cast<int64_t>(hk) * p.total_k + k_off + j
                                   : (static_cast<int64_t>(b) * p.hkv + hk) * p.sk + j;
}

}  // namespace attn
}  // namespace gptk
