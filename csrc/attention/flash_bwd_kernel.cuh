// flash_bwd_kernel.cuh: FlashAttention-2 style backward on sm_80+ tensor cores (mma.sync).
//
// Design
// - One CTA = one block of kBlockN keys of one (batch, K/V head) and one slice of the query heads
//   of its GQA group (head_splits slices; one slice = the whole group). K and V stay in shared
//   memory; the CTA walks every (query head of the slice, block of kBlockM queries) that sees these
//   keys (causal: from the diagonal down), recomputing the probabilities from the saved
//   log-sum-exp instead of storing the S x S matrix:
//       S = Q K^T, P = exp(S*scale - lse)            (mask as in the forward)
//       dP = dO V^T, dS = P * (dP - delta)            delta = rowsum(dO * O) - dlse (preprocess)
//       dV += P^T dO, dK += dS^T Q                     (registers, whole loop; dK scaled at the end)
//       dQ += dS K                                     (fp32 atomics into a workspace, then scaled
//                                                       and converted by flash_bwd_convert_dq)
//   dK/dV of a K/V head thereby sum over its query heads in registers: no expanded copies. With
//   several slices each CTA writes its fp32 partial dK/dV to a workspace and
//   flash_bwd_convert_dkv sums the slices in slice order (deterministic in both modes).
// - Grid order: the key-block index varies slowest, so under causal masking the key blocks that
//   see the most queries run first and the light ones fill the tail (one CTA per SM).
// - Three warp layouts over the same 8 warps: (kWarpsM_SdP x rest) for S and dP, (kWarpsN_dKV x
//   rest) for dK/dV, (kWarpsM_dQ x rest) for dQ. P and dS go through shared memory (as 16-bit)
//   because dV/dK need them transposed (ldmatrix.trans) and dQ in another layout.
// - Q, dO, lse and delta of the next (head, query block) are prefetched with cp.async into a
//   second buffer while the current one is processed; two barriers per step:
//       wait + barrier | prefetch next | S, dP, P, dS -> smem | barrier | dV, dK, dQ (+atomics)
// - Registers: FlashAttention-2's tiles hold 192 fp32 accumulators per thread (dK + dV + S + dP)
//   in 255 registers; the per-key-block loop state (BwdCtx) lives in shared memory and indices,
//   warp tiles and operand pointers are re-derived each step, so ptxas reports no spills for
//   sm_80 and sm_90a.
// - Rows past Sq: Q/dO are zero-filled and the preprocess pads lse with +inf, so P = 0 there and
//   nothing reaches dK/dV; dQ atomics are predicated. Keys past Sk: zero-filled and masked. Fully
//   masked rows (lse = -inf) are also given +inf: their P is exactly 0.
// - Variants (flash.h). Sliding window: a key block walks only the query blocks whose rows see one
//   of its keys (from the first row its last key's window reaches to the last row its first key's
//   window reaches), so the cost is proportional to the window; tiles crossing a window edge are
//   masked as in the forward. Softcap (kSoftcap, its own instantiation): S is recomputed as
//   tanh(S * scale / cap), P = exp(cap * S - lse) and dS is multiplied by 1 - tanh^2 (masked
//   entries, -inf, count as tanh = -1: derivative 0). Varlen: the sequence's rows come from
//   cu_seqlens (seq_bounds); lse_log2 / delta are padded per (sequence, head) to the maximum
//   length, dq_accum and the partial dK/dV are [.., H, total, d] (q_row / k_row).
// - Determinism: with params.deterministic the grid has dq_splits CTAs per (batch, K/V head,
//   slice); CTA x handles key blocks x, x + dq_splits, ... in order and adds into its own dq slice,
//   where each element is only ever updated by one thread (fixed warp layout) in program order;
//   the convert kernel sums the slices in slice order. Otherwise one CTA per key block, one slice,
//   and the order of the atomics (hence the fp32 rounding of dQ) varies from run to run.
#pragma once

#include <climits>

#include "attention/bwd_tile.cuh"
#include "attention/flash.h"
#include "attention/mask.cuh"
#include "attention/mma.cuh"
#include "attention/softmax.cuh"

namespace gptk {
namespace attn {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kWarpsM_SdP_, int kWarpsN_dKV_,
          int kWarpsM_dQ_>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  // S, dP: kBlockM x kBlockN
  static constexpr int kWarpsM_SdP = kWarpsM_SdP_, kWarpsN_SdP = kNWarps / kWarpsM_SdP_;
  static constexpr int kMT_s = kBlockM / kWarpsM_SdP / 16, kNT_s = kBlockN / kWarpsN_SdP / 8;
  // dK, dV: kBlockN x kHeadDim
  static constexpr int kWarpsN_dKV = kWarpsN_dKV_, kWarpsD_dKV = kNWarps / kWarpsN_dKV_;
  static constexpr int kMT_kv = kBlockN / kWarpsN_dKV / 16, kNT_kv = kHeadDim / kWarpsD_dKV / 8;
  // dQ: kBlockM x kHeadDim
  static constexpr int kWarpsM_dQ = kWarpsM_dQ_, kWarpsD_dQ = kNWarps / kWarpsM_dQ_;
  static constexpr int kMT_q = kBlockM / kWarpsM_dQ / 16, kNT_q = kHeadDim / kWarpsD_dQ / 8;
  static_assert(kMT_s >= 1 && kNT_s >= 2 && kMT_kv >= 1 && kNT_kv >= 2 && kMT_q >= 1 && kNT_q >= 2,
                "warp tiles must be at least 16 x 16");
  // shared memory (bytes); every tile offset is a multiple of 256 (operand pointers need it)
  static constexpr int kTileQ = kBlockM * kHeadDim * 2;
  static constexpr int kTileK = kBlockN * kHeadDim * 2;
  static constexpr int kTileP = kBlockM * kBlockN * 2;
  static constexpr int kOffK = 0, kOffV = kTileK, kOffQ = 2 * kTileK, kOffdO = kOffQ + 2 * kTileQ;
  static constexpr int kOffP = kOffdO + 2 * kTileQ, kOffdS = kOffP + kTileP;
  static constexpr int kOffLse = kOffdS + kTileP, kOffDelta = kOffLse + 2 * kBlockM * 4;
  static constexpr int kSmem = kOffDelta + 2 * kBlockM * 4 + 256;  // + alignment slack
  static_assert(kOffLse % 256 == 0, "tiles must stay 256-byte aligned");
  static_assert(kSmem + 256 <= 163 * 1024, "fits A100's 163 KB per block, with the static BwdCtx");
};

// Tile configurations: FlashAttention-2's for GPUs with >= 144 KB of shared memory per block
// (A100, H100): 64 x 128 (queries x keys) at d=128 with warp layouts 2/4/2, 128 x 128 at d=64 with
// 4/4/4, 8 warps. Key blocks of 128 (the dQ atomics scale with the number of key blocks).
// Shared memory: ~161 KB (d=128), ~162 KB (d=64), under A100's 163 KB per block.
template <int kHeadDim>
struct BwdConfig {
  static_assert(kHeadDim < 0, "no backward tile configuration for this head dim (GPTK_ATTN_HEAD_DIMS lists it): "
                              "add a BwdConfig specialisation");
};
template <>
struct BwdConfig<64> {
  using Traits = BwdTraits<64, 128, 128, 8, 4, 4, 4>;
};
template <>
struct BwdConfig<128> {
  using Traits = BwdTraits<128, 64, 128, 8, 2, 4, 2>;
};

__device__ __forceinline__ void atomic_add_pair(float* addr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(addr), make_float2(a, b));
#else
  atomicAdd(addr, a);
  atomicAdd(addr + 1, b);
#endif
}

// Store a warp's fp32 accumulator tile (rows r0.., cols c0..) to a row-major fp32 matrix with
// `ld` elements per row: rows < rows_valid and columns < ld only (8-byte stores).
template <int MT, int NT>
__device__ __forceinline__ void store_acc_f32(const float (&acc)[MT][NT][4], float* base, int ld, int rows_valid,
                                              int r0, int c0, int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = r0 + mt * 16 + (lane >> 2) + 8 * hh;
      if (r >= rows_valid) continue;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int col = c0 + nt * 8 + 2 * (lane & 3);
        if (col < ld)
          *reinterpret_cast<float2*>(base + static_cast<int64_t>(r) * ld + col) =
              make_float2(acc[mt][nt][2 * hh], acc[mt][nt][2 * hh + 1]);
      }
    }
  }
}

// 16-byte cp.async of kRows fp32 values (rows of lse_log2 / delta; the buffers are padded).
template <int kRows>
__device__ __forceinline__ void load_rowvec_async(uint32_t smem, const float* gmem, int idx) {
  if (idx >= 0 && idx < kRows / 4) cp_async_16(smem + idx * 16, gmem + idx * 4, true);
}

// Per key block, what the query loop needs besides its accumulators, parked in shared memory by
// thread 0 and read back after barriers (in registers across the loop these cost the few registers
// that decide whether 192 fp32 accumulators fit in 255 without spills).
struct BwdCtx {
  int n0;        // first key of the block
  int m_begin;   // first query block that sees these keys
  int nm;        // query blocks per head from m_begin
  int total;     // nm * heads of the slice: steps of the query loop
  int h0;        // first query head of the slice
  int b;
  int sq, sk;    // the sequence's lengths (dense: Sq, Sk)
  int q_off;     // its first query row (varlen; 0 dense)
};

// Softmax scale (log2 units) of the values the S accumulators hold: raw scores, or under softcap
// tanh(s * scale / cap), whose capped score is cap * tanh.
template <bool kSoftcap>
__device__ __forceinline__ float bwd_score_scale_log2(const FlashBwdParams& p) {
  return (kSoftcap ? p.softcap : p.scale) * kLog2e;
}

template <typename T, typename Kt, bool kSoftcap>
__global__ void __launch_bounds__(Kt::kThreads, 1) flash_bwd_kernel(const FlashBwdParams p) {
  constexpr int kHeadDim = Kt::kHeadDim, kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kThreads = Kt::kThreads;
  constexpr int kMT_s = Kt::kMT_s, kNT_s = Kt::kNT_s, kMT_kv = Kt::kMT_kv, kNT_kv = Kt::kNT_kv;
  constexpr int kMT_q = Kt::kMT_q, kNT_q = Kt::kNT_q;
  extern __shared__ __align__(128) char smem_raw[];
  __shared__ BwdCtx ctx;
  char* smem = smem_raw + ((256u - (smem_u32(smem_raw) & 255u)) & 255u);
  const uint32_t s0 = smem_u32(smem);
  const uint32_t sK = s0 + Kt::kOffK, sV = s0 + Kt::kOffV, sQ = s0 + Kt::kOffQ, sdO = s0 + Kt::kOffdO;
  const uint32_t sP = s0 + Kt::kOffP, sdS = s0 + Kt::kOffdS;
  const float* sLse = reinterpret_cast<const float*>(smem + Kt::kOffLse);
  const float* sDelta = reinterpret_cast<const float*>(smem + Kt::kOffDelta);

  // Loop bounds are recomputed from the parameters where needed (through opaque(): not hoisted
  // into registers that would stay live across the query loop).
  // Key blocks of this CTA's sequence (varlen: its own length), and the grid's stride over them.
  auto num_n_blocks = [&] {
    const int sk = seq_bounds(p, BwdTile(p, opaque(blockIdx.x)).b).sk;
    return (static_cast<int>(opaque(static_cast<uint32_t>(sk))) + kBlockN - 1) / kBlockN;
  };
  auto grid_n = [&] { return p.deterministic ? p.dq_splits : (p.sk + kBlockN - 1) / kBlockN; };

  // Prefetch step `it` of the query loop (head h0 + it / nm, query block m_begin + it % nm) into
  // buffer `buf`. Everything is derived from the arguments and the parameters (constant memory):
  // the compiler recomputes the 64-bit offsets each step instead of keeping them live.
  auto prefetch = [&](int it, int buf, int b, int h0, int m_begin, int nm, int sq, int q_off) {
    const int tid = static_cast<int>(opaque(threadIdx.x));
    const int h = h0 + it / nm;
    const int m0 = (m_begin + it % nm) * kBlockM;
    const int rows = sq - m0;
    const T* q = static_cast<const T*>(p.q.ptr) + b * p.q.batch_stride + h * p.q.head_stride + q_off * p.q.row_stride;
    const T* dout = static_cast<const T*>(p.dout.ptr) + b * p.dout.batch_stride + h * p.dout.head_stride +
                    q_off * p.dout.row_stride;
    load_tile_async<kBlockM, kHeadDim, kThreads>(sQ + buf * Kt::kTileQ, q + m0 * p.q.row_stride, p.q.row_stride,
                                                 rows, p.d / 8, q, tid);
    load_tile_async<kBlockM, kHeadDim, kThreads>(sdO + buf * Kt::kTileQ, dout + m0 * p.dout.row_stride,
                                                 p.dout.row_stride, rows, p.d / 8, dout, tid);
    const int sq_pad = (p.sq + kBwdRowPad - 1) / kBwdRowPad * kBwdRowPad;
    const int64_t row_off = (static_cast<int64_t>(b) * p.hq + h) * sq_pad + m0;
    load_rowvec_async<kBlockM>(smem_u32(sLse + buf * kBlockM), p.lse_log2 + row_off, tid);
    load_rowvec_async<kBlockM>(smem_u32(sDelta + buf * kBlockM), p.delta + row_off, tid - kBlockM / 4);
  };

  for (int n_block = BwdTile(p, blockIdx.x).x; n_block < num_n_blocks();) {
    {
      const BwdTile tile(p, opaque(blockIdx.x));
      const SeqBounds sb = seq_bounds(p, tile.b);
      const int tid = threadIdx.x;
      const int n0 = n_block * kBlockN;
      const int group = p.hq / p.hkv, heads = group / p.head_splits;  // query heads per group, per slice
      const MaskInfo mask{sb.sk, sb.sk - sb.sq, p.causal, p.window_left, p.window_right};
      // Query blocks that see some key of this block: rows i with limit(i) > n0 (i >= n0 - offset -
      // wr) and start(i) < n0 + kBlockN (i < n0 + kBlockN - offset + wl).
      const int num_m_blocks = (sb.sq + kBlockM - 1) / kBlockM;
      const int wr = mask.right();
      const int m_begin = wr >= 0 ? max(0, n0 - mask.offset - wr) / kBlockM : 0;
      const int m_end = p.window_left >= 0
                            ? min(num_m_blocks, (max(0, n0 + kBlockN - mask.offset + p.window_left) + kBlockM - 1) / kBlockM)
                            : num_m_blocks;
      const int nm = max(0, m_end - m_begin);
      const int h0 = tile.hk * group + tile.hs * heads;
      if (tid == 0) ctx = BwdCtx{n0, m_begin, nm, nm * heads, h0, tile.b, sb.sq, sb.sk, sb.q_off};
      if (nm > 0) {
        const T* kbase = static_cast<const T*>(p.k.ptr) + tile.b * p.k.batch_stride + tile.hk * p.k.head_stride +
                         sb.k_off * p.k.row_stride;
        const T* vbase = static_cast<const T*>(p.v.ptr) + tile.b * p.v.batch_stride + tile.hk * p.v.head_stride +
                         sb.k_off * p.v.row_stride;
        load_tile_async<kBlockN, kHeadDim, kThreads>(sK, kbase + n0 * p.k.row_stride, p.k.row_stride, sb.sk - n0,
                                                     p.d / 8, kbase, tid);
        load_tile_async<kBlockN, kHeadDim, kThreads>(sV, vbase + n0 * p.v.row_stride, p.v.row_stride, sb.sk - n0,
                                                     p.d / 8, vbase, tid);
        prefetch(0, 0, tile.b, h0, m_begin, nm, sb.sq, sb.q_off);
        cp_async_commit();
      }
    }

    float acc_dk[kMT_kv][kNT_kv][4], acc_dv[kMT_kv][kNT_kv][4];
    clear(acc_dk);
    clear(acc_dv);
    __syncthreads();  // ctx is written (no warp reads it before this barrier)
    for (int it = 0; it < ctx.total; ++it) {
      const int buf = it & 1;
      cp_async_wait<0>();
      __syncthreads();  // this step's Q/dO/lse/delta landed; every warp finished the previous step
      const int nm = ctx.nm, m_begin = ctx.m_begin;
      if (it + 1 < ctx.total) {
        prefetch(it + 1, buf ^ 1, ctx.b, ctx.h0, m_begin, nm, ctx.sq, ctx.q_off);
        cp_async_commit();
      }
      const int m0 = (m_begin + it % nm) * kBlockM;
      const uint32_t boff = static_cast<uint32_t>(buf * Kt::kTileQ);
      // Warp tiles and operand pointers are rebuilt each step from an opaque thread id (a few
      // integer ops) rather than kept live across the loop next to the dK/dV accumulators.
      const int tid = static_cast<int>(opaque(threadIdx.x)), lane = tid & 31, warp = tid >> 5;
      const int s_row0 = (warp / Kt::kWarpsN_SdP) * (kMT_s * 16), s_col0 = (warp % Kt::kWarpsN_SdP) * (kNT_s * 8);

      // S = Q K^T and dP = dO V^T (warp tile s_row0.., s_col0..)
      float acc_s[kMT_s][kNT_s][4], acc_dp[kMT_s][kNT_s][4];
      warp_gemm_ss<T, kMT_s, kNT_s, kHeadDim, kHeadDim, kHeadDim, false, false, true>(
          acc_s, operand_a<kHeadDim, false>(sQ + boff, s_row0, lane), operand_b<kHeadDim, false>(sK, s_col0, lane));
      if constexpr (kSoftcap) apply_softcap(acc_s, p.scale / p.softcap);
      {
        const MaskInfo mask{ctx.sk, ctx.sk - ctx.sq, p.causal, p.window_left, p.window_right};
        const int n0 = ctx.n0;
        if (mask.tile_needs_mask(m0, kBlockM, n0, kBlockN)) apply_mask(acc_s, m0 + s_row0, n0 + s_col0, lane, mask);
      }
      warp_gemm_ss<T, kMT_s, kNT_s, kHeadDim, kHeadDim, kHeadDim, false, false, true>(
          acc_dp, operand_a<kHeadDim, false>(sdO + boff, s_row0, lane), operand_b<kHeadDim, false>(sV, s_col0, lane));

      // P = exp2(S * scale*log2e - lse*log2e); dS = P * (dP - delta) (softcap: S = tanh(..), the
      // scale is cap*log2e and dS takes the tanh's derivative 1 - S^2; -inf (masked) counts as -1)
      const float* lse_b = sLse + buf * kBlockM;
      const float* delta_b = sDelta + buf * kBlockM;
#pragma unroll
      for (int mt = 0; mt < kMT_s; ++mt) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int r = s_row0 + mt * 16 + (lane >> 2) + 8 * hh;
          const float lse2 = lse_b[r], dl = delta_b[r];
#pragma unroll
          for (int nt = 0; nt < kNT_s; ++nt) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const float sv = acc_s[mt][nt][2 * hh + j];
              const float pr = fast_exp2(fmaf(sv, bwd_score_scale_log2<kSoftcap>(p), -lse2));
              acc_s[mt][nt][2 * hh + j] = pr;
              float ds = pr * (acc_dp[mt][nt][2 * hh + j] - dl);
              if constexpr (kSoftcap) {
                const float th = fmaxf(sv, -1.f);
                ds *= fmaf(-th, th, 1.f);
              }
              acc_dp[mt][nt][2 * hh + j] = ds;
            }
          }
        }
      }
      store_acc_to_smem<T, kMT_s, kNT_s, kBlockN>(acc_s, smem + Kt::kOffP, s_row0, s_col0, lane, 1.f);
      store_acc_to_smem<T, kMT_s, kNT_s, kBlockN>(acc_dp, smem + Kt::kOffdS, s_row0, s_col0, lane, 1.f);
      __syncthreads();  // P and dS complete

      // dV += P^T dO, dK += dS^T Q   (warp tile kv_row0.. keys x kv_col0.. dims; k = the query block)
      {
        const int kv_row0 = (warp / Kt::kWarpsD_dKV) * (kMT_kv * 16);
        const int kv_col0 = (warp % Kt::kWarpsD_dKV) * (kNT_kv * 8);
        warp_gemm_ss<T, kMT_kv, kNT_kv, kBlockM, kBlockN, kHeadDim, true, true>(
            acc_dv, operand_a<kBlockN, true>(sP, kv_row0, lane), operand_b<kHeadDim, true>(sdO + boff, kv_col0, lane));
        warp_gemm_ss<T, kMT_kv, kNT_kv, kBlockM, kBlockN, kHeadDim, true, true>(
            acc_dk, operand_a<kBlockN, true>(sdS, kv_row0, lane), operand_b<kHeadDim, true>(sQ + boff, kv_col0, lane));
      }

      // dQ (+)= dS K   (warp tile q_row0.. queries x q_col0.. dims; k = this key block)
      {
        const int q_row0 = (warp / Kt::kWarpsD_dQ) * (kMT_q * 16), q_col0 = (warp % Kt::kWarpsD_dQ) * (kNT_q * 8);
        float acc_dq[kMT_q][kNT_q][4];
        warp_gemm_ss<T, kMT_q, kNT_q, kBlockN, kBlockN, kHeadDim, false, true, true>(
            acc_dq, operand_a<kBlockN, false>(sdS, q_row0, lane), operand_b<kHeadDim, true>(sK, q_col0, lane));
        const int h = ctx.h0 + it / nm;
        const int64_t slice = p.deterministic ? static_cast<int64_t>(BwdTile(p, opaque(blockIdx.x)).x) : 0;
        float* dq_head = p.dq_accum + (slice * q_rows(p) + q_row(p, ctx.b, h, ctx.q_off, 0)) * p.d;
        const int sq = ctx.sq;
#pragma unroll
        for (int mt = 0; mt < kMT_q; ++mt) {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int row = m0 + q_row0 + mt * 16 + (lane >> 2) + 8 * hh;
            if (row < sq) {
              float* dq_row = dq_head + static_cast<int64_t>(row) * p.d;
#pragma unroll
              for (int nt = 0; nt < kNT_q; ++nt) {
                const int col = q_col0 + nt * 8 + 2 * (lane & 3);
                if (col < p.d) atomic_add_pair(dq_row + col, acc_dq[mt][nt][2 * hh], acc_dq[mt][nt][2 * hh + 1]);
              }
            }
          }
        }
      }
    }

    // Epilogue of the key block. One slice (all query heads of the group in this CTA): dK (scaled)
    // and dV through shared memory (the K and V buffers) to global memory. Several slices: this
    // slice's fp32 partial sums to the workspace, reduced in slice order by flash_bwd_convert_dkv.
    const int n0 = ctx.n0;
    const int sk = ctx.sk;
    __syncthreads();  // every warp is done with K, V, the last step's buffers and ctx
    {
      const int tid = static_cast<int>(opaque(threadIdx.x)), lane = tid & 31, warp = tid >> 5;
      const int r0 = (warp / Kt::kWarpsD_dKV) * (kMT_kv * 16), c0 = (warp % Kt::kWarpsD_dKV) * (kNT_kv * 8);
      const BwdTile tile(p, opaque(blockIdx.x));
      const int k_off = seq_bounds(p, tile.b).k_off;
      if (p.head_splits > 1) {
        const int64_t rows0 = tile.hs * kv_rows(p) + k_row(p, tile.b, tile.hk, k_off, n0);
        store_acc_f32(acc_dk, p.dk_accum + rows0 * p.d, p.d, sk - n0, r0, c0, lane);
        store_acc_f32(acc_dv, p.dv_accum + rows0 * p.d, p.d, sk - n0, r0, c0, lane);
      } else {
        store_acc_to_smem<T, kMT_kv, kNT_kv, kHeadDim>(acc_dk, smem + Kt::kOffK, r0, c0, lane, p.scale);
        store_acc_to_smem<T, kMT_kv, kNT_kv, kHeadDim>(acc_dv, smem + Kt::kOffV, r0, c0, lane, 1.f);
        __syncthreads();
        T* dk = static_cast<T*>(p.dk.ptr) + tile.b * p.dk.batch_stride + tile.hk * p.dk.head_stride +
                (k_off + n0) * p.dk.row_stride;
        T* dv = static_cast<T*>(p.dv.ptr) + tile.b * p.dv.batch_stride + tile.hk * p.dv.head_stride +
                (k_off + n0) * p.dv.row_stride;
        store_tile<kBlockN, kHeadDim, kThreads>(smem + Kt::kOffK, dk, p.dk.row_stride, sk - n0, p.d / 8, tid);
        store_tile<kBlockN, kHeadDim, kThreads>(smem + Kt::kOffV, dv, p.dv.row_stride, sk - n0, p.d / 8, tid);
      }
    }
    __syncthreads();  // the next key block (deterministic mode) reloads K and V and rewrites ctx
    n_block = n0 / kBlockN + grid_n();
  }
}

template <typename T, int kHeadDim, bool kSoftcap>
cudaError_t run_flash_bwd_sm80(const FlashBwdParams& p, cudaStream_t stream) {
  using Kt = typename BwdConfig<kHeadDim>::Traits;
  const int64_t num_n_blocks = (p.sk + Kt::kBlockN - 1) / Kt::kBlockN;
  const int64_t grid_n = p.deterministic ? p.dq_splits : num_n_blocks;
  const int64_t grid = grid_n * p.batch * p.hkv * p.head_splits;
  if (grid <= 0) return cudaSuccess;
  if (grid > INT_MAX) return cudaErrorInvalidConfiguration;
  auto kernel = flash_bwd_kernel<T, Kt, kSoftcap>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kt::kSmem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid), Kt::kThreads, Kt::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace attn
}  // namespace gptk
