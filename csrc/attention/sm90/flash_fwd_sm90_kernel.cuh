// flash_fwd_sm90_kernel.cuh: FlashAttention-3 style forward for Hopper (sm_90a): TMA loads, wgmma,
// warp specialisation. Same op and semantics as flash_fwd_kernel.cuh (see flash.h).
//
// Design (the schedule of FlashAttention-3, hopper/flash_fwd_kernel_sm90.h and
// mainloop_fwd_sm90_tma_gmma_ws.hpp, written as plain CUDA with inline PTX)
// - One CTA = one (batch, query head, block of kBlockM = 128 query rows), 3 warpgroups (384 threads):
//   warpgroup 0 is the producer, warpgroups 1 and 2 the consumers, each owning a 64-row slice of the
//   Q tile. Register budgets are moved with setmaxnreg: producer down to 24, consumers up to 240
//   (FlashAttention-3's LoadRegisterRequirement / MmaRegisterRequirement for two consumer
//   warpgroups, flash_fwd_kernel_sm90.h line 82).
// - Producer: one warp (the other three exit after setmaxnreg); its lane 0 issues every TMA load:
//   Q once (mbarrier q_full), then K and V blocks into a ring of kStages slots each (pipeline.cuh),
//   K one block ahead of V because the consumers need K[n] before V[n+1]:
//       K[last]  |  K[last-1] V[last]  |  K[last-2] V[last-1]  | ...  |  V[0]
// - Consumers (per warpgroup; FlashAttention-3's IntraWGOverlap schedule):
//       S = Q K[last]^T; wait; mask; softmax -> P
//       for each next block n:   S' = Q K[n]^T (async) | O += P V[n+1] (async) | wait S' |
//                                mask, softmax(S') -> P', row corrections | wait O | O *= corr | P = P'
//       O += P V[0]; wait; O /= row sums; lse
//   so the exponentials of one block run while the tensor cores do the next Q K^T and this P V.
//   The two consumer warpgroups take turns issuing their GEMMs (named barriers, pipeline.cuh
//   GemmScheduler), so one's softmax also overlaps the other's GEMMs.
// - S = Q K^T: wgmma m64n(kBlockN)k16, both operands K-major from 128B-swizzled shared memory
//   (wgmma.cuh kmajor_desc), head dim in k16 steps. P V: P stays in registers (the fp32 S
//   accumulator packs into the wgmma A fragment, wgmma.cuh) and V is the N-major B operand
//   (mnmajor_desc, imm-trans-b = 1), keys in k16 steps. fp32 accumulation.
// - Softmax: softmax.cuh (OnlineSoftmax<1, 1>: exp2 with the scale folded in, -inf safe), masks:
//   mask.cuh (MaskInfo, apply_mask) -- the wgmma accumulator is the mma.sync one per 16-row warp
//   slice, so both apply unchanged. K/V blocks are visited from the last to the first; causal
//   blocks above the diagonal are never loaded; only blocks on the diagonal or past kv_len mask.
// - Keys past kv_len may hold anything (NaN in a KV cache): their scores are masked to -inf, and
//   the one V block that straddles kv_len is loaded by the producer onto a private mbarrier, its
//   rows past kv_len zeroed (0 * NaN would poison P V), fenced to the async proxy, and only then
//   announced on the slot's full barrier. Rows / keys past Sq / Sk are zero-filled by TMA.
// - Output: normalised O is written (16-bit, 128B-swizzled) over the warpgroup's own Q rows,
//   fenced to the async proxy, and stored with one TMA store per 64 columns (rows past Sq and
//   columns past d are clipped); lse goes straight from registers. A CTA whose rows see no key
//   writes zeros and -inf without loading anything.
// - Causal work is uneven: the CTAs of the last query blocks (most keys) are launched first.
#pragma once

#include <climits>

#include "attention/mask.cuh"
#include "attention/mma.cuh"
#include "attention/sm90/flash_fwd_sm90.h"
#include "attention/sm90/pipeline.cuh"
#include "attention/sm90/tma.cuh"
#include "attention/sm90/wgmma.cuh"
#include "attention/softmax.cuh"

namespace gptk {
namespace attn {

// The kernel's parameters: the problem (as for sm_80) plus the four tensor maps, built on the host.
// Passed as a __grid_constant__ kernel parameter so that TMA reads the maps in place (param space).
struct Sm90FwdParams {
  FlashFwdParams f;
  CUtensorMap tma_q, tma_k, tma_v, tma_o;
};

namespace sm90 {

template <int kHeadDim_, int kBlockN_, int kStages_>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_, kBlockM = 128, kBlockN = kBlockN_, kStages = kStages_;
  static constexpr int kConsumerWGs = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWGs);
  static constexpr int kConsumerWarps = 4 * kConsumerWGs;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;  // 128*24 + 256*240 <= 64K registers
  static constexpr int kColBlocks = kHeadDim / kBoxCols;         // 64-column boxes per row
  static constexpr int kNT = kBlockN / 8;                        // n8 column tiles of S per warp
  static constexpr int kDT = kHeadDim / 8;                       // n8 column tiles of O per warp
  static constexpr int kTileQ = kBlockM * kHeadDim * 2;          // bytes
  static constexpr int kTileKV = kBlockN * kHeadDim * 2;
  static constexpr int kOffK = kTileQ;
  static constexpr int kOffV = kOffK + kStages * kTileKV;
  static constexpr int kOffBar = kOffV + kStages * kTileKV;
  // barriers: K ring, V ring (full + empty each), q_full, v_fix
  static constexpr int kSmem = kOffBar + 2 * Ring<kStages>::kBytes + 16 + 1024;  // + room to align to 1024
  static_assert(kHeadDim % kBoxCols == 0 && kBlockN % 16 == 0 && kBlockN <= 256, "tile shape");
  static_assert(kTileQ % 1024 == 0 && kTileKV % 1024 == 0, "swizzled tiles stay 1024-byte aligned");
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumerWGs <= 65536, "register file");
};

// Tile configuration per head dim: 128 x 128 tiles, two K and two V slots (shared memory 160 KB at
// d=128, 80 KB at d=64, of 227 KB). Consumer registers: O (d/2) + S (64) + P (32) per thread.
template <int kHeadDim>
struct FwdConfig {
  static_assert(kHeadDim < 0, "no sm90 forward tile configuration for this head dim (GPTK_ATTN_HEAD_DIMS lists "
                              "it): add a FwdConfig specialisation in sm90/flash_fwd_sm90_kernel.cuh");
};
template <>
struct FwdConfig<64> {
  using Traits = FwdTraits<64, 128, 2>;
};
template <>
struct FwdConfig<128> {
  using Traits = FwdTraits<128, 128, 2>;
};

// Zero-fill pass for a query block whose rows see no key (out = 0, lse = -inf), all threads.
template <typename T, typename Kt>
__device__ __forceinline__ void write_empty_rows(const FlashFwdParams& p, int b, int h, int m0, int rows_valid,
                                                 int tid) {
  T* o = static_cast<T*>(p.o.ptr) + b * p.o.batch_stride + h * p.o.head_stride + m0 * p.o.row_stride;
  float* lse = p.lse + (static_cast<int64_t>(b) * p.hq + h) * p.sq + m0;
  const int d_chunks = p.d / 8;
  for (int idx = tid; idx < rows_valid * d_chunks; idx += Kt::kThreads) {
    const int r = idx / d_chunks, c = idx % d_chunks;
    *reinterpret_cast<int4*>(o + r * p.o.row_stride + c * 8) = make_int4(0, 0, 0, 0);
  }
  for (int r = tid; r < rows_valid; r += Kt::kThreads) lse[r] = -INFINITY;
}

// The producer warp. Lane 0 issues the TMA loads; the whole warp zeroes the V rows past kv_len.
template <typename Kt>
__device__ __forceinline__ void produce(const Sm90FwdParams& p, uint32_t sQ, uint32_t sK, uint32_t sV,
                                        const Ring<Kt::kStages>& ring_k, const Ring<Kt::kStages>& ring_v,
                                        uint32_t q_full, uint32_t v_fix, char* smem, int b, int h, int hk, int m0,
                                        int kv_len, int n_blocks, int lane) {
  constexpr int kBlockN = Kt::kBlockN, kStages = Kt::kStages;
  if (lane == 0) {
    prefetch_tensor_map(&p.tma_q);
    prefetch_tensor_map(&p.tma_k);
    prefetch_tensor_map(&p.tma_v);
    mbar_arrive_expect_tx(q_full, Kt::kTileQ);
#pragma unroll
    for (int c = 0; c < Kt::kColBlocks; ++c) tma_load_4d(sQ + c * Kt::kBlockM * 128, &p.tma_q, q_full, c * kBoxCols, m0, h, b);
  }
  auto load_kv = [&](const CUtensorMap* map, uint32_t tile, uint32_t bar, int n) {
    mbar_arrive_expect_tx(bar, Kt::kTileKV);
#pragma unroll
    for (int c = 0; c < Kt::kColBlocks; ++c) tma_load_4d(tile + c * kBlockN * 128, map, bar, c * kBoxCols, n * kBlockN, hk, b);
  };
  PipeState<kStages> wk, wv;
  int n = n_blocks - 1;
  if (lane == 0) {
    ring_k.acquire(wk);
    load_kv(&p.tma_k, sK + wk.index * Kt::kTileKV, ring_k.full(wk.index), n);
  }
  for (; n >= 0; --n) {
    if (n > 0) {  // K one block ahead
      wk.advance();
      if (lane == 0) {
        ring_k.acquire(wk);
        load_kv(&p.tma_k, sK + wk.index * Kt::kTileKV, ring_k.full(wk.index), n - 1);
      }
    }
    const uint32_t tile_v = sV + wv.index * Kt::kTileKV;
    const int valid = kv_len - n * kBlockN;  // keys of this block before kv_len
    if (valid >= kBlockN || kv_len == p.f.sk) {  // nothing to hide, or TMA already zero-fills past Sk
      if (lane == 0) {
        ring_v.acquire(wv);
        load_kv(&p.tma_v, tile_v, ring_v.full(wv.index), n);
      }
    } else {  // the block straddling kv_len (at most one per CTA): load, zero the rows past it, publish
      if (lane == 0) {
        ring_v.acquire(wv);
        load_kv(&p.tma_v, tile_v, v_fix, n);
      }
      mbar_wait(v_fix, 0);
      char* t = smem + (tile_v - sQ);
      const int row_chunks = (kBlockN - valid) * 8;  // 16-byte chunks per 64-column block
      for (int c = 0; c < Kt::kColBlocks; ++c) {
        int4* rows = reinterpret_cast<int4*>(t + c * kBlockN * 128 + valid * 128);
        for (int i = lane; i < row_chunks; i += 32) rows[i] = make_int4(0, 0, 0, 0);
      }
      fence_proxy_async();  // the zeros, before the consumers' wgmma reads them through the async proxy
      __syncwarp();
      if (lane == 0) mbar_arrive(ring_v.full(wv.index));
    }
    wv.advance();
  }
}

template <typename T, typename Kt>
__global__ void __launch_bounds__(Kt::kThreads, 1) flash_fwd_sm90_kernel(const __grid_constant__ Sm90FwdParams p) {
#if GPTK_SM90_DEVICE
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kStages = Kt::kStages;
  constexpr int kNT = Kt::kNT, kDT = Kt::kDT;
  extern __shared__ __align__(1024) char smem_raw[];
  // Swizzled tiles need 1024-byte alignment; the dynamic shared memory base only promises less.
  char* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  const uint32_t sQ = smem_u32(smem);
  const uint32_t sK = sQ + Kt::kOffK, sV = sQ + Kt::kOffV;
  const Ring<kStages> ring_k{sQ + Kt::kOffBar};
  const Ring<kStages> ring_v{ring_k.base + Ring<kStages>::kBytes};
  const uint32_t q_full = ring_v.base + Ring<kStages>::kBytes, v_fix = q_full + 8;

  const FlashFwdParams& f = p.f;
  const int tid = threadIdx.x, lane = tid & 31;
  const int num_m_blocks = (f.sq + kBlockM - 1) / kBlockM;
  const int bid = blockIdx.x;
  const int m_block = num_m_blocks - 1 - bid % num_m_blocks;  // heavy (late) query blocks first
  const int bh = bid / num_m_blocks;
  const int h = bh % f.hq, b = bh / f.hq;
  const int hk = h / (f.hq / f.hkv);
  int kv_len = f.sk;
  if (f.kv_lens != nullptr) kv_len = min(max(f.kv_lens[b], 0), f.sk);
  const MaskInfo mask{kv_len, kv_len - f.sq, f.causal};
  const int m0 = m_block * kBlockM;
  const int rows_valid = min(kBlockM, f.sq - m0);
  // Keys [0, n_end) are visible to some row of this block (the last row sees the most).
  const int n_end = f.causal ? mask.limit(m0 + rows_valid - 1) : kv_len;
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;
  if (n_blocks <= 0) {
    write_empty_rows<T, Kt>(f, b, h, m0, rows_valid, tid);
    return;
  }

  if (tid == 0) {
    ring_k.init(Kt::kConsumerWarps);
    ring_v.init(Kt::kConsumerWarps);
    mbar_init(q_full, 1);
    mbar_init(v_fix, 1);
    mbar_fence_init();
  }
  __syncthreads();  // the last CTA-wide barrier: from here on the warpgroups sync only by mbarriers
                    // and named barriers (the producer's idle warps exit)

  // Warp-uniform in the compiler's eyes (a shuffle from lane 0, CUTLASS canonical_warp_group_idx):
  // wgmma must not sit in code ptxas considers divergent, or it serialises them.
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  if (wg == 0) {
    setmaxnreg_dec<Kt::kProducerRegs>();
    if (tid / 32 == 0) produce<Kt>(p, sQ, sK, sV, ring_k, ring_v, q_full, v_fix, smem, b, h, hk, m0, kv_len, n_blocks, lane);
    return;
  }
  setmaxnreg_inc<Kt::kConsumerRegs>();

  // ---- consumers ---------------------------------------------------------------------------------
  const int cw = wg - 1;                       // consumer warpgroup: rows [m0 + 64 cw, m0 + 64 cw + 64)
  const int warp_row0 = m0 + cw * 64 + ((tid / 32) & 3) * 16;  // first row of this warp's 16
  const float scale_log2 = f.scale * kLog2e;
  const GemmScheduler sched{cw, n_blocks};  // steps: the first Q K^T, n_blocks - 1 overlapped, the last P V

  float acc_s[1][kNT][4];
  float acc_o[1][kDT][4];
  uint32_t pa[kNT / 2][4];
  float corr[2];
  float row_sum[2];  // the running sums stay in registers here (kStride 1): the consumers have room
  OnlineSoftmax<1, 1> softmax;
  softmax.init(row_sum);

  mbar_wait(q_full, 0);
  PipeState<kStages> rk;  // slot of the K block being read
  int n = n_blocks - 1;
  ring_k.wait_full(rk);
  sched.begin(0);
  wgmma_fence();
  gemm_ss_kmajor<T, Kt::kHeadDim, Kt::kBlockM, Kt::kBlockN>(acc_s[0], sQ, cw * 64, sK + rk.index * Kt::kTileKV);
  wgmma_commit();
  sched.end(0);
  wgmma_wait<0>();
  fence_operand(acc_s[0]);
  ring_k.release(rk, lane);
  if (mask.tile_needs_mask(m0 + cw * 64, n * kBlockN, kBlockN)) apply_mask(acc_s, warp_row0, n * kBlockN, lane, mask);
  softmax.exp_scores(acc_s, scale_log2, corr, row_sum);  // corr unused: O starts at zero
  clear(acc_o);
  pack_p<T, kNT>(acc_s[0], pa);

  PipeState<kStages> rv = rk;  // slot of the V block matching P
  for (int step = 1; n > 0; ++step) {
    --n;
    rk.advance();
    ring_k.wait_full(rk);
    sched.begin(step);
    wgmma_fence();
    gemm_ss_kmajor<T, Kt::kHeadDim, Kt::kBlockM, Kt::kBlockN>(acc_s[0], sQ, cw * 64, sK + rk.index * Kt::kTileKV);
    wgmma_commit();
    ring_v.wait_full(rv);
    wgmma_fence();  // as FlashAttention-3's flash::gemm: every GEMM batch starts with a fence
    gemm_rs_mnmajor<T, Kt::kHeadDim, Kt::kBlockN>(acc_o[0], pa, sV + rv.index * Kt::kTileKV);
    wgmma_commit();
    sched.end(step);
    wgmma_wait<1>();  // S = Q K[n]^T is done; O += P V[n+1] may still run
    fence_operand(acc_s[0]);
    ring_k.release(rk, lane);
    if (mask.tile_needs_mask(m0 + cw * 64, n * kBlockN, kBlockN)) apply_mask(acc_s, warp_row0, n * kBlockN, lane, mask);
    softmax.exp_scores(acc_s, scale_log2, corr, row_sum);
    wgmma_wait<0>();
    fence_operand(acc_o[0]);
    ring_v.release(rv, lane);
    softmax.rescale(acc_o, corr);
    pack_p<T, kNT>(acc_s[0], pa);
    rv = rk;
  }
  ring_v.wait_full(rv);
  sched.begin(n_blocks);
  wgmma_fence();
  gemm_rs_mnmajor<T, Kt::kHeadDim, Kt::kBlockN>(acc_o[0], pa, sV + rv.index * Kt::kTileKV);
  wgmma_commit();
  sched.end(n_blocks);
  wgmma_wait<0>();
  fence_operand(acc_o[0]);
  ring_v.release(rv, lane);

  float row_lse[2];
  softmax.finalize(acc_o, scale_log2, row_lse, row_sum);

  // ---- epilogue: lse from registers, O through shared memory and TMA -----------------------------
  const int g = lane >> 2, t = lane & 3;
  if (t == 0) {
    float* lse = f.lse + (static_cast<int64_t>(b) * f.hq + h) * f.sq;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = warp_row0 + g + 8 * hh;
      if (r < f.sq) lse[r] = row_lse[hh];
    }
  }
  // Rows of this warpgroup's Q slice: only its own (finished) wgmmas read them, so O may overwrite.
  const int r_tile = warp_row0 - m0 + g;  // row inside the 128-row tile; (r_tile & 7) == g
#pragma unroll
  for (int j = 0; j < kDT; ++j) {
    const int c_blk = j / 8, chunk = j % 8;  // 64-column block, 16-byte chunk inside its 128-byte row
    char* row_lo = smem + c_blk * kBlockM * 128 + r_tile * 128 + ((chunk ^ g) << 4) + t * 4;
    *reinterpret_cast<uint32_t*>(row_lo) = pack2<T>(acc_o[0][j][0], acc_o[0][j][1]);
    *reinterpret_cast<uint32_t*>(row_lo + 8 * 128) = pack2<T>(acc_o[0][j][2], acc_o[0][j][3]);
  }
  fence_proxy_async();  // the ordinary stores above, before the TMA store reads them
  named_bar_sync(static_cast<uint32_t>(NamedBarrier::kEpilogueWG0) + cw, 128);
  if ((tid & 127) == 0 && m0 + cw * 64 < f.sq) {
#pragma unroll
    for (int c = 0; c < Kt::kColBlocks; ++c) {
      tma_store_4d(&p.tma_o, sQ + c * kBlockM * 128 + cw * 64 * 128, c * kBoxCols, m0 + cw * 64, h, b);
    }
    tma_store_commit();
    tma_store_wait_read();
  }
#endif
}

template <typename T, int kHeadDim>
cudaError_t launch_flash_fwd_sm90(const FlashFwdParams& f, cudaStream_t stream) {
  using Kt = typename FwdConfig<kHeadDim>::Traits;
  const int64_t num_m_blocks = (f.sq + Kt::kBlockM - 1) / Kt::kBlockM;
  const int64_t grid = num_m_blocks * f.batch * f.hq;
  if (grid <= 0) return cudaSuccess;
  if (grid > INT_MAX) return cudaErrorInvalidConfiguration;
  Sm90FwdParams p;
  p.f = f;
  cudaError_t err;
  if ((err = make_tensor_map(&p.tma_q, f.q, f.dtype, f.batch, f.hq, f.sq, f.d, Kt::kBlockM)) != cudaSuccess ||
      (err = make_tensor_map(&p.tma_k, f.k, f.dtype, f.batch, f.hkv, f.sk, f.d, Kt::kBlockN)) != cudaSuccess ||
      (err = make_tensor_map(&p.tma_v, f.v, f.dtype, f.batch, f.hkv, f.sk, f.d, Kt::kBlockN)) != cudaSuccess ||
      (err = make_tensor_map(&p.tma_o, f.o, f.dtype, f.batch, f.hq, f.sq, f.d, 64)) != cudaSuccess) {
    return err;
  }
  auto kernel = flash_fwd_sm90_kernel<T, Kt>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kt::kSmem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid), Kt::kThreads, Kt::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm90

template <typename T, int kHeadDim>
cudaError_t run_flash_fwd_sm90_(const FlashFwdParams& p, cudaStream_t stream) {
  return sm90::launch_flash_fwd_sm90<T, kHeadDim>(p, stream);
}

}  // namespace attn
}  // namespace gptk
