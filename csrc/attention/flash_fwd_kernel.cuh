// flash_fwd_kernel.cuh: FlashAttention-2 style forward on sm_80+ tensor cores (mma.sync).
//
// Design
// - One CTA = one (batch, query head, block of kBlockM query rows); 4 warps, each owning
//   kBlockM/4 rows (two m16 tiles), so every K/V fragment read from shared memory feeds two mmas.
//   The S x S score matrix never exists: the CTA walks the K/V blocks of kBlockN keys, computing
//   S = Q K^T, an online softmax (softmax.cuh) and O += P V in registers.
// - Shared memory: Q (kBlockM x d), K and V (kBlockN x d), XOR-swizzled (mma.cuh). Q is loaded
//   once; K and V alternate so that each load overlaps the other's math:
//       wait K[n] | issue V[n] | S = Q K[n]^T, mask | wait V[n] | issue K[n-1] | softmax | O += P V[n]
//   (a barrier at each wait also guarantees no warp still reads the buffer about to be refilled).
// - K/V blocks are visited from the last to the first, so the only blocks that need masking
//   (the causal diagonal, keys past kv_len) come first; others skip the mask math.
// - P goes from the S accumulators to the A operand of P V without shared memory (the C layout
//   of m16n8 pairs equals the A layout of m16k16); V is read with ldmatrix.trans.
// - Rows past Sq and keys past kv_len are zero-filled by cp.async (src-size 0), never read.
//   Rows that see no key (causal with Sq > kv_len) give zeros and lse = -inf.
// - Causal work is uneven: the CTAs of the last query blocks (most keys) are launched first.
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
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "tiles are multiples of 16");
};

// The tile configuration of each head dim. Two m16 tiles per warp (each K/V fragment read from
// shared memory feeds two mmas) and the widest key block that compiles without register spills:
// FlashAttention-2's 128x128 (d=64) and 128x64 (d=128) tiles need 192 accumulator registers and
// spill under nvcc 13 with this code, so the key blocks are halved: acc_o + acc_s = 64 + 64
// (d=64) and 128 + 32 (d=128) registers. Shared memory: 32 KB and 48 KB (+256 B alignment).
template <int kHeadDim>
struct FwdConfig {
  static_assert(kHeadDim < 0, "no forward tile configuration for this head dim (GPTK_ATTN_HEAD_DIMS lists it): "
                              "add a FwdConfig specialisation");
};
template <>
struct FwdConfig<64> {
  using Traits = FwdTraits<64, 128, 64, 4>;
};
template <>
struct FwdConfig<128> {
  using Traits = FwdTraits<128, 128, 32, 4>;
};

template <typename T, typename Kt>
__global__ void __launch_bounds__(Kt::kThreads) flash_fwd_kernel(const FlashFwdParams p) {
  constexpr int kHeadDim = Kt::kHeadDim, kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN;
  constexpr int kThreads = Kt::kThreads, kMT = Kt::kMT, kNT = Kt::kNT, kDT = Kt::kDT;
  extern __shared__ __align__(128) char smem_raw[];
  // Operand pointers combine chunk offsets by XOR (mma.cuh), which needs 256-byte aligned tiles.
  char* smem = smem_raw + ((256u - (smem_u32(smem_raw) & 255u)) & 255u);
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + Kt::kSmemQ;
  const uint32_t sV = sK + Kt::kSmemKV;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int num_m_blocks = (p.sq + kBlockM - 1) / kBlockM;
  const int bid = blockIdx.x;
  const int m_block = num_m_blocks - 1 - bid % num_m_blocks;  // heavy (late) query blocks first
  const int bh = bid / num_m_blocks;
  const int h = bh % p.hq, b = bh / p.hq;
  const int hk = h / (p.hq / p.hkv);

  int kv_len = p.sk;
  if (p.kv_lens != nullptr) kv_len = min(max(p.kv_lens[b], 0), p.sk);
  const MaskInfo mask{kv_len, kv_len - p.sq, p.causal};
  const int m0 = m_block * kBlockM;
  const int rows_valid = min(kBlockM, p.sq - m0);
  const int d_chunks = p.d / 8;

  const T* q = static_cast<const T*>(p.q.ptr) + b * p.q.batch_stride + h * p.q.head_stride;
  const T* k = static_cast<const T*>(p.k.ptr) + b * p.k.batch_stride + hk * p.k.head_stride;
  const T* v = static_cast<const T*>(p.v.ptr) + b * p.v.batch_stride + hk * p.v.head_stride;

  // Keys [0, n_end) are visible to some row of this block (the last row sees the most).
  const int n_end = p.causal ? mask.limit(m0 + rows_valid - 1) : kv_len;
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;
  if (n_blocks <= 0) {  // no row of this block sees a key: out = 0, lse = -inf
    T* o = static_cast<T*>(p.o.ptr) + b * p.o.batch_stride + h * p.o.head_stride + m0 * p.o.row_stride;
    float* lse = p.lse + (static_cast<int64_t>(b) * p.hq + h) * p.sq + m0;
    for (int idx = tid; idx < rows_valid * d_chunks; idx += kThreads) {
      const int r = idx / d_chunks, c = idx % d_chunks;
      *reinterpret_cast<int4*>(o + r * p.o.row_stride + c * 8) = make_int4(0, 0, 0, 0);
    }
    for (int r = tid; r < rows_valid; r += kThreads) lse[r] = -INFINITY;
    return;
  }

  int n_block = n_blocks - 1;
  load_tile_async<kBlockM, kHeadDim, kThreads>(sQ, q + m0 * p.q.row_stride, p.q.row_stride, rows_valid, d_chunks, q,
                                               tid);
  load_tile_async<kBlockN, kHeadDim, kThreads>(sK, k + n_block * kBlockN * p.k.row_stride, p.k.row_stride,
                                               kv_len - n_block * kBlockN, d_chunks, k, tid);
  cp_async_commit();

  float acc_o[kMT][kDT][4];
  clear(acc_o);
  OnlineSoftmax<kMT> softmax;
  softmax.init();
  const float scale_log2 = p.scale * kLog2e;
  const int warp_row0 = warp * Kt::kWarpRows;  // first row of this warp inside the block
  const uint32_t pq0 = operand_a<kHeadDim, false>(sQ, warp_row0, lane);
  const uint32_t pk0 = operand_b<kHeadDim, false>(sK, 0, lane);
  const uint32_t pv0 = operand_b<kHeadDim, true>(sV, 0, lane);

  // K/V blocks from the last to the first. Only the first few need the mask (the causal diagonal
  // and the partial block at kv_len); the others skip it.
  for (; n_block >= 0; --n_block) {
    const int n0 = n_block * kBlockN;
    float acc_s[kMT][kNT][4];
    cp_async_wait<0>();
    __syncthreads();  // K[n] (and Q) landed; every warp is done with V[n+1]
    load_tile_async<kBlockN, kHeadDim, kThreads>(sV, v + n0 * p.v.row_stride, p.v.row_stride, kv_len - n0, d_chunks,
                                                 v, tid);
    cp_async_commit();

    // S = Q K^T: A = Q [m][d], B = K^T with K stored [n][d].
    warp_gemm_ss<T, kMT, kNT, kHeadDim, kHeadDim, kHeadDim, false, false, true>(acc_s, opaque(pq0), opaque(pk0));
    if (mask.tile_needs_mask(m0, n0, kBlockN)) apply_mask(acc_s, m0 + warp_row0, n0, lane, mask);

    cp_async_wait<0>();
    __syncthreads();  // V[n] landed; every warp is done with K[n]
    if (n_block > 0) {
      load_tile_async<kBlockN, kHeadDim, kThreads>(sK, k + (n0 - kBlockN) * p.k.row_stride, p.k.row_stride,
                                                   kv_len - (n0 - kBlockN), d_chunks, k, tid);
      cp_async_commit();
    }

    softmax.update(acc_s, acc_o, scale_log2);

    // O += P V: A = P straight from the S accumulators, B = V stored [k = key][n = d] (trans).
    const uint32_t pv = opaque(pv0);
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        a[mt][0] = pack2<T>(acc_s[mt][2 * ks][0], acc_s[mt][2 * ks][1]);
        a[mt][1] = pack2<T>(acc_s[mt][2 * ks][2], acc_s[mt][2 * ks][3]);
        a[mt][2] = pack2<T>(acc_s[mt][2 * ks + 1][0], acc_s[mt][2 * ks + 1][1]);
        a[mt][3] = pack2<T>(acc_s[mt][2 * ks + 1][2], acc_s[mt][2 * ks + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t bv[4];
        ldsm_x4_trans((pv ^ ((2 * dp) << 4)) + ks * 16 * kHeadDim * 2, bv);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(acc_o[mt][2 * dp], a[mt], bv[0], bv[1]);
          mma_16816<T>(acc_o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }

  float row_lse[kMT * 2];
  softmax.finalize(acc_o, scale_log2, row_lse);

  // Epilogue. Thread indices are re-derived through opaque() so that the compiler does not keep
  // epilogue addresses alive in registers across the main loop.
  {
  const int tid = static_cast<int>(opaque(threadIdx.x)), lane = tid & 31, warp = tid >> 5;
  const int warp_row0 = warp * Kt::kWarpRows;
  T* o = static_cast<T*>(p.o.ptr) + b * p.o.batch_stride + h * p.o.head_stride + m0 * p.o.row_stride;
  float* lse = p.lse + (static_cast<int64_t>(b) * p.hq + h) * p.sq + m0;

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
  store_tile<kBlockM, kHeadDim, kThreads>(smem, o, p.o.row_stride, rows_valid, d_chunks, tid);
  }
}

template <typename T, int kHeadDim>
cudaError_t run_flash_fwd_sm80(const FlashFwdParams& p, cudaStream_t stream) {
  using Kt = typename FwdConfig<kHeadDim>::Traits;
  const int64_t num_m_blocks = (p.sq + Kt::kBlockM - 1) / Kt::kBlockM;
  const int64_t grid = num_m_blocks * p.batch * p.hq;
  if (grid <= 0) return cudaSuccess;
  if (grid > INT_MAX) return cudaErrorInvalidConfiguration;
  auto kernel = flash_fwd_kernel<T, Kt>;
  if (Kt::kSmem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kt::kSmem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(grid), Kt::kThreads, Kt::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace attn
}  // namespace gptk
