// flash_fwd_kernel.cuh: FlashAttention-2 style forward on sm_80+ tensor cores (mma.sync).
//
// Design
// - One CTA = one (batch, query head, block of kBlockM query rows, key split); 4 warps, each owning
//   kBlockM/4 rows (two m16 tiles), so every K/V fragment read from shared memory feeds two mmas.
//   The S x S score matrix never exists: the CTA walks the K/V blocks of kBlockN keys, computing
//   S = Q K^T, an online softmax (softmax.cuh) and O += P V in registers.
// - Shared memory: Q (kBlockM x d), K and V (kBlockN x d), XOR-swizzled (mma.cuh). Q is loaded
//   once; K and V alternate so that each load overlaps the other's math:
//       wait K[n] | issue V[n] | S = Q K[n]^T, mask | wait V[n] | issue K[n-1] | softmax | O += P V[n]
//   (a barrier at each wait also guarantees no warp still reads the buffer about to be refilled).
// - K/V blocks are visited from the last to the first, so the only blocks that need masking
//   (the causal diagonal, keys past kv_len) come first; others skip the mask math.
// - Variants (flash.h). Sliding window: a tile visits only the key blocks from the first key its
//   first row sees to the last key its last row sees (mask.cuh: start / limit), so the cost is
//   proportional to the window; only blocks crossing a window edge or kv_len are masked. Softcap
//   (kSoftcap, a separate instantiation so that the plain kernel keeps its registers): S becomes
//   tanh(S * scale / cap) and the softmax scales by cap. Varlen: the sequence's rows come from
//   cu_seqlens (seq_bounds); a tile past its sequence's queries exits at once.
// - P goes from the S accumulators to the A operand of P V without shared memory (the C layout
//   of m16n8 pairs equals the A layout of m16k16), packed to 16 bits as it is exponentiated;
//   V is read with ldmatrix.trans.
// - Registers: FlashAttention-2's tiles hold 192 fp32 accumulators per thread (O: 2 x 16 x 4 at
//   d=128 or 2 x 8 x 4 at d=64; S: 2 x 8 x 4 or 2 x 16 x 4) in 255 registers. What else the loop
//   needs is kept out of registers: the per-CTA pointers and lengths (FwdCtx) and the softmax row
//   sums live in shared memory and are read back after barriers, per-thread indices and operand
//   pointers are re-derived from threadIdx each iteration, and the row sums are taken from the
//   packed P (the fp32 probabilities die as they are packed). ptxas reports no spills for sm_80
//   and sm_90a with ~25 registers to spare (tools/ptxas_report.py).
// - Rows past Sq and keys past kv_len are zero-filled by cp.async (src-size 0), never read.
//   Rows that see no key (causal with Sq > kv_len) give zeros and lse = -inf.
// - Causal work is uneven: the CTAs of the last query blocks (most keys) are launched first.
// - Split-KV (num_splits > 1, run by flash_decode when one CTA per query tile would leave SMs
//   idle): each CTA takes an equal share of the key blocks its tile sees (counted from kv_lens[b]
//   in the kernel) and writes its normalised fp32 partial output and lse to the workspace for
//   flash_decode_combine; a split with no block writes lse = -inf.
// - The output goes registers -> shared (reusing Q's buffer) -> 16-byte coalesced stores.
// - 64-bit offsets for every global address; int for in-tile indices.
#pragma once

#include <climits>

#include "attention/flash.h"
#include "attention/mask.cuh"
#include "attention/mma.cuh"
#include "attention/softmax.cuh"

namespace gptk {
namespace attn {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kMT = kBlockM / (16 * kNWarps);  // m16 tiles per warp
  static constexpr int kWarpRows = kMT * 16;
  static constexpr int kNT = kBlockN / 8;    // n8 tiles of S per warp (a warp has all kBlockN keys)
  static constexpr int kDT = kHeadDim / 8;   // n8 tiles of O per warp
  static constexpr int kSmemQ = kBlockM * kHeadDim * 2;
  static constexpr int kSmemKV = kBlockN * kHeadDim * 2;
  static constexpr int kSmem = kSmemQ + 2 * kSmemKV + 256;  // + room to align the base to 256 bytes
  static_assert(kMT >= 1 && kBlockM % (16 * kNWarps) == 0, "kBlockM must give whole m16 tiles per warp");
  static_assert(kBlockM == kFwdBlockM, "flash_decode_num_splits counts query tiles of kFwdBlockM rows");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tiles are multiples of 16");
};

// The tile configuration of each head dim: FlashAttention-2's choices for A100/H100 (sm_80 path):
// 128 x 64 at d=128 and 128 x 128 at d=64, 4 warps. Shared memory: 64 KB (d=128), 48 KB (d=64),
// + 256 B alignment + 2 KB of row sums.
template <int kHeadDim>
struct FwdConfig {
  static_assert(kHeadDim < 0, "no forward tile configuration for this head dim (GPTK_ATTN_HEAD_DIMS lists it): "
                              "add a FwdConfig specialisation");
};
template <>
struct FwdConfig<64> {
  using Traits = FwdTraits<64, 128, 128, 4>;
};
template <>
struct FwdConfig<128> {
  using Traits = FwdTraits<128, 128, 64, 4>;
};

// What the main loop needs besides its accumulators, parked in shared memory by thread 0 and read
// back after each barrier: keeping these (two 64-bit pointers, lengths, the tile origin) in
// registers across the loop costs the 10-20 registers that decide whether 192 fp32 accumulators
// fit in 255 without spills.
template <typename T>
struct FwdCtx {
  const T* k;       // this (batch, K/V head)'s K rows
  const T* v;
  int kv_len;       // keys >= kv_len are hidden
  int m0;           // first query row of the tile
  int n_lo;         // the CTA's key blocks are [n_lo, n_hi)
  int offset;       // kv_len - the sequence's Sq (mask.cuh)
};

// Index of the tile a CTA runs: blockIdx.x = ((b * Hq + h) * num_splits + split) * num_m_blocks + m
// with query blocks in reverse (the causal blocks with the most keys start first).
struct FwdTile {
  int m_block, split, h, b;
  __device__ __forceinline__ FwdTile(const FlashFwdParams& p, int kBlockM, unsigned bid) {
    const int num_m_blocks = (p.sq + kBlockM - 1) / kBlockM;
    m_block = num_m_blocks - 1 - static_cast<int>(bid % num_m_blocks);
    bid /= num_m_blocks;
    split = static_cast<int>(bid % p.num_splits);
    bid /= p.num_splits;
    h = static_cast<int>(bid % p.hq);
    b = static_cast<int>(bid / p.hq);
  }
};

// Key blocks [lo, hi) of split `split` when the n_blocks key blocks a query tile sees are shared by
// num_splits CTAs: equal shares of the blocks that exist (a split past them gets lo >= hi).
__device__ __forceinline__ void split_range(int n_blocks, int num_splits, int split, int& lo, int& hi) {
  const int per = (n_blocks + num_splits - 1) / num_splits;
  lo = split * per;
  hi = min(lo + per, n_blocks);
}

// The softmax's scale of the values in the S accumulators, in log2 units: scale (raw scores) or
// softcap (tanh of the scaled scores over the cap, apply_softcap).
template <bool kSoftcap>
__device__ __forceinline__ float score_scale_log2(const FlashFwdParams& p) {
  return (kSoftcap ? p.softcap : p.scale) * kLog2e;
}

template <typename T, typename Kt, bool kSoftcap>
__global__ void __launch_bounds__(Kt::kThreads) flash_fwd_kernel(const FlashFwdParams p) {
  constexpr int kHeadDim = Kt::kHeadDim, kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN;
  constexpr int kThreads = Kt::kThreads, kMT = Kt::kMT, kNT = Kt::kNT, kDT = Kt::kDT;
  extern __shared__ __align__(128) char smem_raw[];
  __shared__ FwdCtx<T> ctx;
  __shared__ float row_sums[kMT * 2 * kThreads];  // OnlineSoftmax's running sums
  // Operand pointers combine chunk offsets by XOR (mma.cuh), which needs 256-byte aligned tiles.
  char* smem = smem_raw + ((256u - (smem_u32(smem_raw) & 255u)) & 255u);
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + Kt::kSmemQ;
  const uint32_t sV = sK + Kt::kSmemKV;

  int n_block;
  {
    const int tid = threadIdx.x;
    const FwdTile t(p, kBlockM, blockIdx.x);
    const SeqBounds sb = seq_bounds(p, t.b);
    const int m0 = t.m_block * kBlockM;
    if (m0 >= sb.sq) return;  // varlen: past this sequence's queries (nothing to write)
    const int hk = t.h / (p.hq / p.hkv);
    int kv_len = sb.sk;
    if (p.kv_lens != nullptr) kv_len = min(max(p.kv_lens[t.b], 0), p.sk);
    const MaskInfo mask{kv_len, kv_len - sb.sq, p.causal, p.window_left, p.window_right};
    const int rows_valid = min(kBlockM, sb.sq - m0);
    const int d_chunks = p.d / 8;
    // Keys [n_begin, n_end) are visible to some row of this tile (its first row sees the first
    // key of the window, its last row the last).
    const int n_begin = mask.start(m0), n_end = mask.limit(m0 + rows_valid - 1);
    const int nb_begin = n_begin / kBlockN;
    int n_lo, n_hi;
    split_range(max((n_end + kBlockN - 1) / kBlockN - nb_begin, 0), p.num_splits, t.split, n_lo, n_hi);
    n_lo += nb_begin, n_hi += nb_begin;
    if (n_hi <= n_lo) {  // no key for this CTA: out = 0 and lse = -inf (a split's share: lse = -inf)
      const int64_t row = q_row(p, t.b, t.h, sb.q_off, m0);
      if (p.num_splits > 1) {
        float* lse = p.lse_accum + t.split * q_rows(p) + row;
        for (int r = tid; r < rows_valid; r += kThreads) lse[r] = -INFINITY;
        return;
      }
      T* o = static_cast<T*>(p.o.ptr) + t.b * p.o.batch_stride + t.h * p.o.head_stride +
             (sb.q_off + m0) * p.o.row_stride;
      float* lse = p.lse + row;
      for (int idx = tid; idx < rows_valid * d_chunks; idx += kThreads) {
        const int r = idx / d_chunks, c = idx % d_chunks;
        *reinterpret_cast<int4*>(o + r * p.o.row_stride + c * 8) = make_int4(0, 0, 0, 0);
      }
      for (int r = tid; r < rows_valid; r += kThreads) lse[r] = -INFINITY;
      return;
    }
    const T* q = static_cast<const T*>(p.q.ptr) + t.b * p.q.batch_stride + t.h * p.q.head_stride +
                 sb.q_off * p.q.row_stride;
    const T* k = static_cast<const T*>(p.k.ptr) + t.b * p.k.batch_stride + hk * p.k.head_stride +
                 sb.k_off * p.k.row_stride;
    const T* v = static_cast<const T*>(p.v.ptr) + t.b * p.v.batch_stride + hk * p.v.head_stride +
                 sb.k_off * p.v.row_stride;
    if (tid == 0) ctx = FwdCtx<T>{k, v, kv_len, m0, n_lo, mask.offset};  // (read after the loop's first barrier)
    n_block = n_hi - 1;
    load_tile_async<kBlockM, kHeadDim, kThreads>(sQ, q + m0 * p.q.row_stride, p.q.row_stride, rows_valid, d_chunks,
                                                 q, tid);
    load_tile_async<kBlockN, kHeadDim, kThreads>(sK, k + n_block * kBlockN * p.k.row_stride, p.k.row_stride,
                                                 kv_len - n_block * kBlockN, d_chunks, k, tid);
    cp_async_commit();
  }

  float acc_o[kMT][kDT][4];
  clear(acc_o);
  OnlineSoftmax<kMT, kThreads> softmax;
  softmax.init(row_sums + threadIdx.x);

  // K/V blocks from the last to the first. Only the first few need the mask (the causal diagonal
  // and the partial block at kv_len); the others skip it. Per-thread indices and shared-memory
  // operand pointers are re-derived from threadIdx each iteration (a few integer ops) instead of
  // being kept live next to the accumulators.
  const uint32_t tid_reg = threadIdx.x;  // one register; everything derived from it is recomputed
  do {  // (n_block >= n_lo on entry; ctx is read only after the first barrier)
    const int n0 = n_block * kBlockN;
    float acc_s[kMT][kNT][4];
    cp_async_wait<0>();
    __syncthreads();  // K[n] (and Q, ctx) landed; every warp is done with V[n+1]
    const int tid = static_cast<int>(opaque(tid_reg)), lane = tid & 31, warp = tid >> 5;
    const int warp_row0 = warp * Kt::kWarpRows;  // first row of this warp inside the tile
    const int kv_len = ctx.kv_len;
    load_tile_async<kBlockN, kHeadDim, kThreads>(sV, ctx.v + n0 * p.v.row_stride, p.v.row_stride, kv_len - n0,
                                                 p.d / 8, ctx.v, tid);
    cp_async_commit();

    // S = Q K^T: A = Q [m][d], B = K^T with K stored [n][d].
    warp_gemm_ss<T, kMT, kNT, kHeadDim, kHeadDim, kHeadDim, false, false, true>(
        acc_s, operand_a<kHeadDim, false>(sQ, warp_row0, lane), operand_b<kHeadDim, false>(sK, 0, lane));
    if constexpr (kSoftcap) apply_softcap(acc_s, p.scale / p.softcap);
    {
      const MaskInfo mask{kv_len, ctx.offset, p.causal, p.window_left, p.window_right};
      const int m0 = ctx.m0;
      if (mask.tile_needs_mask(m0, kBlockM, n0, kBlockN)) apply_mask(acc_s, m0 + warp_row0, n0, lane, mask);
    }

    cp_async_wait<0>();
    __syncthreads();  // V[n] landed; every warp is done with K[n]
    if (n_block > ctx.n_lo) {
      const T* k = ctx.k;
      load_tile_async<kBlockN, kHeadDim, kThreads>(sK, k + (n0 - kBlockN) * p.k.row_stride, p.k.row_stride,
                                                   ctx.kv_len - (n0 - kBlockN), p.d / 8, k, tid);
      cp_async_commit();
    }

    uint32_t pk[kMT][kNT][2];
    softmax.template update<T>(acc_s, acc_o, score_scale_log2<kSoftcap>(p), pk, row_sums + tid);

    // O += P V: A = P (packed by the softmax straight from the S accumulators: the C layout of an
    // m16n8 pair is the A layout of m16k16), B = V stored [k = key][n = d] (ldmatrix.trans).
    const uint32_t pv = operand_b<kHeadDim, true>(sV, 0, static_cast<int>(opaque(tid_reg)) & 31);
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t bv[4];
        ldsm_x4_trans((pv ^ ((2 * dp) << 4)) + ks * 16 * kHeadDim * 2, bv);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          const uint32_t a[4] = {pk[mt][2 * ks][0], pk[mt][2 * ks][1], pk[mt][2 * ks + 1][0], pk[mt][2 * ks + 1][1]};
          mma_16816<T>(acc_o[mt][2 * dp], a, bv[0], bv[1]);
          mma_16816<T>(acc_o[mt][2 * dp + 1], a, bv[2], bv[3]);
        }
      }
    }
  } while (--n_block >= ctx.n_lo);

  float row_lse[kMT * 2];
  softmax.finalize(acc_o, score_scale_log2<kSoftcap>(p), row_lse, row_sums + opaque(threadIdx.x));

  // Epilogue: everything re-derived from blockIdx / threadIdx (through opaque(): nothing computed
  // before the loop stays alive across it).
  const int tid = static_cast<int>(opaque(threadIdx.x)), lane = tid & 31, warp = tid >> 5;
  const int warp_row0 = warp * Kt::kWarpRows;
  const FwdTile t(p, kBlockM, opaque(blockIdx.x));
  const SeqBounds sb = seq_bounds(p, t.b);
  const int m0 = t.m_block * kBlockM;
  const int rows_valid = min(kBlockM, sb.sq - m0);
  if (p.num_splits > 1) {
    // Split-KV: this split's normalised partial output (fp32) and its lse, merged later by
    // flash_decode_combine (flash_decode.cu). Straight from the accumulators (8-byte stores).
    const int64_t row_base = t.split * q_rows(p) + q_row(p, t.b, t.h, sb.q_off, m0);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = warp_row0 + mt * 16 + (lane >> 2) + 8 * hh;
        if (r >= rows_valid) continue;
        float* orow = p.o_accum + (row_base + r) * p.d;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          const int col = dt * 8 + 2 * (lane & 3);
          if (col < p.d) *reinterpret_cast<float2*>(orow + col) = make_float2(acc_o[mt][dt][2 * hh], acc_o[mt][dt][2 * hh + 1]);
        }
        if ((lane & 3) == 0) p.lse_accum[row_base + r] = row_lse[mt * 2 + hh];
      }
    }
    return;
  }
  T* o = static_cast<T*>(p.o.ptr) + t.b * p.o.batch_stride + t.h * p.o.head_stride +
         (sb.q_off + m0) * p.o.row_stride;
  float* lse = p.lse + q_row(p, t.b, t.h, sb.q_off, m0);
  // Every warp passed the last loop barrier after its final read of Q, so Q's buffer is free.
  store_acc_to_smem<T, kMT, kDT, kHeadDim>(acc_o, smem, warp_row0, 0, lane, 1.f);
  if ((lane & 3) == 0) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = warp_row0 + mt * 16 + (lane >> 2) + 8 * hh;
        if (r < rows_valid) lse[r] = row_lse[mt * 2 + hh];
      }
    }
  }
  __syncthreads();
  store_tile<kBlockM, kHeadDim, kThreads>(smem, o, p.o.row_stride, rows_valid, p.d / 8, tid);
}

template <typename T, int kHeadDim, bool kSoftcap>
cudaError_t run_flash_fwd_sm80(const FlashFwdParams& p, cudaStream_t stream) {
  using Kt = typename FwdConfig<kHeadDim>::Traits;
  const int64_t num_m_blocks = (p.sq + Kt::kBlockM - 1) / Kt::kBlockM;
  const int64_t grid = num_m_blocks * p.num_splits * p.batch * p.hq;
  if (grid <= 0) return cudaSuccess;
  if (grid > INT_MAX) return cudaErrorInvalidConfiguration;
  auto kernel = flash_fwd_kernel<T, Kt, kSoftcap>;
  if (Kt::kSmem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kt::kSmem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(grid), Kt::kThreads, Kt::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace attn
}  // namespace gptk
