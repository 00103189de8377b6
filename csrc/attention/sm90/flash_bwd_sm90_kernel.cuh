// flash_bwd_sm90_kernel.cuh: FlashAttention-3 style backward for Hopper (sm_90a): TMA loads through an
// mbarrier ring, wgmma, warp specialisation. Same op, workspace and helpers as the sm_80 backward
// (flash_bwd_kernel.cuh, flash_bwd_prep.cu; semantics in flash.h).
//
// Design (FlashAttention-3's hopper/flash_bwd_kernel_sm90.h + mainloop_bwd_sm90_tma_gmma_ws.hpp schedule,
// written as plain CUDA with inline PTX):
// - One CTA = one block of kBlockN = 128 keys of one (batch, K/V head) and one slice of the query heads
//   of its GQA group (head_splits slices, flash.h); deterministic mode: the key blocks x, x + dq_splits, ..
//   in order (as on sm_80). 3 warpgroups (384 threads): warpgroup 0 the producer (setmaxnreg down to 24,
//   one thread issues every TMA load, the rest exit), warpgroups 1 and 2 the consumers (up to 240; the
//   counts of FlashAttention-3's LoadRegisterRequirement / MmaRegisterRequirement for two MMA warpgroups,
//   flash_bwd_kernel_sm90.h), consumer warpgroup w owning keys [64 w, 64 w + 64) of the block.
// - K and V: loaded once per key block (mbarrier kv_full; kv_empty hands them back in deterministic
//   mode). Q, dO (kBlockM rows each), lse_log2 and delta (kBlockM floats each) of every (query head, query
//   block) that sees the keys stream through a ring of kStages slots (pipeline.cuh), one full/empty
//   mbarrier pair per slot, the four loads completing one transaction count. Causal: query blocks above
//   the diagonal are never visited (the loop starts at the first query block that sees key n0).
// - Per step, per consumer warpgroup (the "swapped" products, FlashAttention-3's SdP_swapAB / dKV_swapAB
//   idea: the key dimension is the wgmma M, so P^T and dS^T come out of the accumulators already in the
//   register layout of an RS wgmma's A operand and dK / dV need no shared-memory round trip):
//       S^T  = K_w Q^T        SS wgmma, M = 64 keys, N = kBlockM queries, K-major A and B
//       dP^T = V_w dO^T       SS wgmma
//       P^T  = exp2(S^T * scale*log2e - lse_log2[query]) (masked: keys past Sk, causal), 0 on padded rows
//       dS^T = P^T * (dP^T - delta[query])
//       dV  += P^T dO         RS wgmma, A = P^T from registers, B = dO MN-major (imm-trans-b = 1)
//       dK  += dS^T Q         RS wgmma, B = Q MN-major
//       dS^T -> shared memory (16-bit, 128B-swizzled [query/64][key][64 queries]), fence.proxy.async,
//       named barrier over both consumer warpgroups (they each need the other's keys), then
//       dQ   = dS K           SS wgmma, A = dS MN-major (imm-trans-a = 1) from the dS^T tile, B = K
//                              MN-major; warpgroup w computes a 64 x 64 piece: query rows 64 w (d = 64,
//                              kBlockM = 128) or head-dim columns 64 w (d = 128, kBlockM = 64)
//       fp32 atomics of dQ into the workspace slice (red.global.add), scaled and converted later by
//       flash_bwd_convert_dq. Every dQ element of a slice is added by exactly one thread of one CTA, in
//       program order: with dq_splits slices (deterministic mode) the result is bitwise reproducible.
//   dS^T has two buffers: a warpgroup rewrites buffer b (step i + 2) only after the barrier of step i + 1,
//   which both pass only after their dQ wgmma of step i has completed.
// - dK / dV stay in registers across the query loop (fp32); at the end of the key block dK * scale and dV
//   go straight to global memory (head_splits == 1) or, unscaled in fp32, to the workspace slice of this
//   CTA's head slice (summed in slice order by flash_bwd_convert_dkv).
// - Tiles: kBlockN = 128 keys (kBwdBlockN, what flash_bwd_dq_splits / head_splits assume); kBlockM = 128
//   queries at d = 64, 64 at d = 128, so S^T / dP^T hold kBlockM / 2 fp32 per thread each, dK / dV d / 2:
//   192 accumulators either way (+ 32 for dQ). Shared memory: K, V, 2 ring slots of Q + dO + lse + delta,
//   2 dS^T buffers: ~162 KB at both head dims (of 227 KB).
#pragma once

#include <climits>

#include "attention/bwd_tile.cuh"
#include "attention/mma.cuh"
#include "attention/sm90/flash_bwd_sm90.h"
#include "attention/sm90/flash_fwd_sm90.h"
#include "attention/sm90/pipeline.cuh"
#include "attention/sm90/tma.cuh"
#include "attention/sm90/wgmma.cuh"
#include "attention/softmax.cuh"

namespace gptk {
namespace attn {

// The kernel's parameters: the problem plus the six tensor maps, built on the host (__grid_constant__).
struct Sm90BwdParams {
  FlashBwdParams f;
  CUtensorMap tma_q, tma_k, tma_v, tma_do, tma_lse, tma_delta;
};

namespace sm90 {

template <int kHeadDim_, int kBlockM_, int kStages_>
struct BwdTraits {
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBwdBlockN, kStages = kStages_;
  static constexpr int kConsumerWGs = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWGs);
  static constexpr int kConsumerWarps = 4 * kConsumerWGs;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static constexpr int kColBlocks = kHeadDim / kBoxCols;  // 64-column boxes per row
  static constexpr int kNT = kBlockM / 8;                 // n8 tiles of S^T / dP^T per thread (queries)
  static constexpr int kDT = kHeadDim / 8;                // n8 tiles of dK / dV (head dim)
  // dQ = dS K: each consumer warpgroup computes one 64 x 64 piece
  static constexpr int kDqRowBlocks = kBlockM / 64, kDqColBlocks = kHeadDim / 64;
  static constexpr int kTileKV = kBlockN * kHeadDim * 2;  // bytes
  static constexpr int kTileQ = kBlockM * kHeadDim * 2;
  static constexpr int kRowVec = kBlockM * 4;
  static constexpr int kStageBytes = (2 * kTileQ + 2 * kRowVec + 1023) / 1024 * 1024;
  static constexpr int kTileDs = kBlockM * kBlockN * 2;
  static constexpr int kOffV = kTileKV, kOffStages = 2 * kTileKV;
  static constexpr int kOffDs = kOffStages + kStages * kStageBytes;
  static constexpr int kOffBar = kOffDs + 2 * kTileDs;
  static constexpr int kSmem = kOffBar + Ring<kStages>::kBytes + 16 + 1024;  // + kv_full, kv_empty, alignment
  static_assert(kDqRowBlocks * kDqColBlocks == kConsumerWGs, "dQ: one 64 x 64 piece per consumer warpgroup");
  static_assert(kHeadDim % kBoxCols == 0 && kBlockM % 64 == 0 && kBlockM <= 256, "tile shape");
  static_assert(kBwdRowPad % kBlockM == 0, "lse_log2 / delta boxes stay inside the padded rows");
  static_assert(kTileQ % 1024 == 0 && kTileKV % 1024 == 0 && kTileDs % 1024 == 0, "swizzled tiles 1024-aligned");
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumerWGs <= 65536, "register file");
  static_assert(kSmem <= 227 * 1024, "shared memory per block");
  static_assert(kStages % 2 == 0, "the dS^T buffer is the ring slot's parity");
};

template <int kHeadDim>
struct BwdConfig {
  static_assert(kHeadDim < 0, "no sm90 backward tile configuration for this head dim (GPTK_ATTN_HEAD_DIMS lists "
                              "it): add a BwdConfig specialisation in sm90/flash_bwd_sm90_kernel.cuh");
};
template <>
struct BwdConfig<64> {
  using Traits = BwdTraits<64, 128, 2>;
};
template <>
struct BwdConfig<128> {
  using Traits = BwdTraits<128, 64, 2>;
};

// The query loop of one key block: steps it = 0 .. total-1 visit head h0 + it / nm, query block
// m_begin + it % nm (causal: the first query block that sees key n0 onwards).
struct KeyBlock {
  int n0, m_begin, nm, total, h0;
  __device__ __forceinline__ KeyBlock(const FlashBwdParams& p, const BwdTile& w, int n_block, int block_m) {
    n0 = n_block * kBwdBlockN;
    const int offset = p.sk - p.sq;  // bottom-right causal: key j visible to query i iff j <= i + offset
    m_begin = p.causal ? max(0, n0 - offset) / block_m : 0;
    nm = max(0, (p.sq + block_m - 1) / block_m - m_begin);
    const int heads = p.hq / p.hkv / p.head_splits;
    total = nm * heads;
    h0 = w.hk * (p.hq / p.hkv) + w.hs * heads;
  }
  __device__ __forceinline__ int head(int it) const { return h0 + it / nm; }
  __device__ __forceinline__ int m0(int it, int block_m) const { return (m_begin + it % nm) * block_m; }
};

// dQ partial sums: two fp32 reductions into the workspace (sm_90 has the 8-byte vector form, CUDA's
// atomicAdd(float2*); the emulator adds the two floats one by one).
__device__ __forceinline__ void red_add_pair(float* addr, float a, float b) {
#if defined(__CUDA_ARCH__) && !defined(GPTK_EMU)
  atomicAdd(reinterpret_cast<float2*>(addr), make_float2(a, b));
#else
  atomicAdd(addr, a);
  atomicAdd(addr + 1, b);
#endif
}

// The producer: one thread issues every TMA load.
template <typename Kt>
__device__ __forceinline__ void produce(const Sm90BwdParams& p, uint32_t s0, const Ring<Kt::kStages>& ring,
                                        uint32_t kv_full, uint32_t kv_empty) {
  const FlashBwdParams& f = p.f;
  prefetch_tensor_map(&p.tma_q);
  prefetch_tensor_map(&p.tma_do);
  prefetch_tensor_map(&p.tma_k);
  prefetch_tensor_map(&p.tma_v);
  const BwdTile w(f, blockIdx.x);
  const int num_n = (f.sk + Kt::kBlockN - 1) / Kt::kBlockN;
  const int grid_n = f.deterministic ? f.dq_splits : num_n;
  PipeState<Kt::kStages> st;
  uint32_t kv_phase = 0;
  for (int n_block = w.x; n_block < num_n; n_block += grid_n) {
    const KeyBlock kb(f, w, n_block, Kt::kBlockM);
    if (kb.total == 0) continue;  // (never with Sq > 0: every key is seen by the last query)
    mbar_wait(kv_empty, kv_phase ^ 1u);
    mbar_arrive_expect_tx(kv_full, 2 * Kt::kTileKV);
#pragma unroll
    for (int c = 0; c < Kt::kColBlocks; ++c) {
      tma_load_4d(s0 + c * Kt::kBlockN * 128, &p.tma_k, kv_full, c * kBoxCols, kb.n0, w.hk, w.b);
      tma_load_4d(s0 + Kt::kOffV + c * Kt::kBlockN * 128, &p.tma_v, kv_full, c * kBoxCols, kb.n0, w.hk, w.b);
    }
    for (int it = 0; it < kb.total; ++it) {
      const int h = kb.head(it), m0 = kb.m0(it, Kt::kBlockM);
      const uint32_t stage = s0 + Kt::kOffStages + st.index * Kt::kStageBytes;
      const uint32_t bar = ring.full(st.index);
      ring.acquire(st);
      mbar_arrive_expect_tx(bar, 2 * Kt::kTileQ + 2 * Kt::kRowVec);
#pragma unroll
      for (int c = 0; c < Kt::kColBlocks; ++c) {
        tma_load_4d(stage + c * Kt::kBlockM * 128, &p.tma_q, bar, c * kBoxCols, m0, h, w.b);
        tma_load_4d(stage + Kt::kTileQ + c * Kt::kBlockM * 128, &p.tma_do, bar, c * kBoxCols, m0, h, w.b);
      }
      const int row = w.b * f.hq + h;
      tma_load_2d(stage + 2 * Kt::kTileQ, &p.tma_lse, bar, m0, row);
      tma_load_2d(stage + 2 * Kt::kTileQ + Kt::kRowVec, &p.tma_delta, bar, m0, row);
      st.advance();
    }
    kv_phase ^= 1u;
  }
}

// dQ piece (query rows 64 qb, head-dim columns 64 cb) = dS K: A = dS read MN-major from the dS^T tile
// ([query/64][key][64]), B = K [key][d] MN-major; k16 steps over the 128 keys.
template <typename T, typename Kt>
__device__ __forceinline__ void gemm_dq(float (&acc)[8][4], uint32_t tile_ds, uint32_t tile_k, int qb, int cb) {
#pragma unroll
  for (int kk = 0; kk < Kt::kBlockN / 16; ++kk) {
    const uint64_t da = mnmajor_desc(tile_ds + qb * Kt::kBlockN * 128, Kt::kBlockN, kk);
    const uint64_t db = mnmajor_desc(tile_k + cb * Kt::kBlockN * 128, Kt::kBlockN, kk);
    if (kk == 0) {
      Wgmma<T, 64>::template ss_mn<0>(acc, da, db);
    } else {
      Wgmma<T, 64>::template ss_mn<1>(acc, da, db);
    }
  }
}

template <typename T, typename Kt>
__global__ void __launch_bounds__(Kt::kThreads, 1) flash_bwd_sm90_kernel(const __grid_constant__ Sm90BwdParams p) {
#if GPTK_SM90_DEVICE
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kStages = Kt::kStages;
  constexpr int kNT = Kt::kNT, kDT = Kt::kDT;
  extern __shared__ __align__(1024) char smem_raw[];
  char* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  const uint32_t s0 = smem_u32(smem);
  const uint32_t sK = s0, sV = s0 + Kt::kOffV;
  const Ring<kStages> ring{s0 + Kt::kOffBar};
  const uint32_t kv_full = ring.base + Ring<kStages>::kBytes, kv_empty = kv_full + 8;
  const FlashBwdParams& f = p.f;
  const int tid = threadIdx.x;

  if (tid == 0) {
    ring.init(Kt::kConsumerWarps);
    mbar_init(kv_full, 1);
    mbar_init(kv_empty, Kt::kConsumerWarps);
    mbar_fence_init();
  }
  __syncthreads();  // the only CTA-wide barrier: afterwards mbarriers and one named barrier

  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);  // warp-uniform (see the forward)
  if (wg == 0) {
    setmaxnreg_dec<Kt::kProducerRegs>();
    if (tid == 0) produce<Kt>(p, s0, ring, kv_full, kv_empty);
    return;
  }
  setmaxnreg_inc<Kt::kConsumerRegs>();

  // ---- consumers ---------------------------------------------------------------------------------
  const int cw = wg - 1, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int wrow = ((tid / 32) & 3) * 16 + g;  // this thread's first row in a 64-row warpgroup tile
  const int qb = Kt::kDqRowBlocks > 1 ? cw : 0, cb = Kt::kDqColBlocks > 1 ? cw : 0;  // its dQ piece
  // Per-CTA values (work decode, sizes, scale) are re-derived from the parameters where used (through
  // opaque(): not hoisted), so that only the loop state stays live next to 192 fp32 accumulators.
  auto work = [&] { return BwdTile(f, opaque(blockIdx.x)); };
  auto num_n = [&] { return (static_cast<int>(opaque(static_cast<uint32_t>(f.sk))) + kBlockN - 1) / kBlockN; };

  PipeState<kStages> rd;  // also picks the dS^T buffer: rd.index & 1 alternates step by step (kStages even)
  uint32_t kv_phase = 0;
  for (int n_block = work().x; n_block < num_n();) {
    const KeyBlock kb(f, work(), n_block, kBlockM);
    const int key0 = kb.n0 + cw * 64 + wrow;  // keys key0, key0 + 8 of this thread's accumulator rows
    float acc_dk[kDT][4], acc_dv[kDT][4];
#pragma unroll
    for (int j = 0; j < kDT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[j][e] = acc_dv[j][e] = 0.f;
    if (kb.total > 0) mbar_wait(kv_full, kv_phase);
    for (int it = 0; it < kb.total; ++it) {
      const int h = kb.head(it), m0 = kb.m0(it, kBlockM);
      const uint32_t stage = s0 + Kt::kOffStages + rd.index * Kt::kStageBytes;
      const uint32_t sQ = stage, sdO = stage + Kt::kTileQ;
      const float* lse2 = reinterpret_cast<const float*>(smem + (stage - s0) + 2 * Kt::kTileQ);
      const float* delta = lse2 + kBlockM;
      ring.wait_full(rd);

      float acc_s[kNT][4], acc_dp[kNT][4];
      wgmma_fence();
      gemm_ss_kmajor<T, Kt::kHeadDim, Kt::kBlockN, Kt::kBlockM>(acc_s, sK, cw * 64, sQ);
      wgmma_commit();
      gemm_ss_kmajor<T, Kt::kHeadDim, Kt::kBlockN, Kt::kBlockM>(acc_dp, sV, cw * 64, sdO);
      wgmma_commit();
      wgmma_wait<1>();
      fence_operand(acc_s);
      // P^T: the rows are keys key0 (+8), the columns queries m0 + 8j + 2t (+1). Causal: key > query +
      // offset is masked, i.e. rel + 8 (e >> 1) - (e & 1) > 8 j with rel below (constants per unrolled
      // element). Keys past Sk need no mask: TMA zero-fills their K and V rows, so their dP^T row is 0,
      // their dS^T row meets a zero K row in dQ = dS K, and their dK / dV rows are never stored.
      const int offset = f.sk - f.sq;
      const int rel = f.causal && kb.n0 + cw * 64 + 63 > m0 + offset ? key0 - m0 - offset - 2 * t : INT_MIN / 2;
      const float scale_log2 = f.scale * kLog2e;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const float2 l2 = *reinterpret_cast<const float2*>(lse2 + 8 * j + 2 * t);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pr = fast_exp2(fmaf(acc_s[j][e], scale_log2, -((e & 1) ? l2.y : l2.x)));
          acc_s[j][e] = rel + 8 * (e >> 1) - (e & 1) > 8 * j ? 0.f : pr;
        }
      }
      wgmma_wait<0>();
      fence_operand(acc_dp);
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const float2 dl = *reinterpret_cast<const float2*>(delta + 8 * j + 2 * t);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dp[j][e] = acc_s[j][e] * (acc_dp[j][e] - ((e & 1) ? dl.y : dl.x));
      }
      uint32_t pa[kNT / 2][4], dsa[kNT / 2][4];
      pack_p<T, kNT>(acc_s, pa);
      pack_p<T, kNT>(acc_dp, dsa);
      // dS^T rows (keys cw*64 + wrow (+8)) into buffer step & 1: [query/64][key][64 queries], 128B swizzle
      char* ds_tile = smem + Kt::kOffDs + (rd.index & 1) * Kt::kTileDs;
#pragma unroll
      for (int kk = 0; kk < kNT / 2; ++kk) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int j = 2 * kk + half;  // query tile: columns 8j .. 8j + 7
          char* row = ds_tile + (j / 8) * kBlockN * 128 + (cw * 64 + wrow) * 128 + (((j & 7) ^ g) << 4) + t * 4;
          *reinterpret_cast<uint32_t*>(row) = dsa[kk][2 * half];
          *reinterpret_cast<uint32_t*>(row + 8 * 128) = dsa[kk][2 * half + 1];
        }
      }
      fence_proxy_async();  // the dS^T stores, before the dQ wgmma reads them through the async proxy
      wgmma_fence();
      gemm_rs_mnmajor<T, Kt::kHeadDim, Kt::kBlockM>(acc_dv, pa, sdO);
      gemm_rs_mnmajor<T, Kt::kHeadDim, Kt::kBlockM>(acc_dk, dsa, sQ);
      wgmma_commit();
      named_bar_sync(static_cast<uint32_t>(NamedBarrier::kBwdDsReady), 256);  // both halves of dS^T written
      float acc_dq[8][4];
      wgmma_fence();
      gemm_dq<T, Kt>(acc_dq, s0 + Kt::kOffDs + (rd.index & 1) * Kt::kTileDs, sK, qb, cb);
      wgmma_commit();
      wgmma_wait<0>();
      fence_operand(acc_dq);
      fence_operand(acc_dv);
      fence_operand(acc_dk);
      fence_operand(pa);  // the A fragments of dV / dK stay allocated until their wgmma completed (FlashAttention-3
      fence_operand(dsa);  // hopper/utils.h flash::gemm fences an RS A operand the same way): acc_dq may not reuse them
      ring.release(rd, lane);  // Q, dO, lse, delta of this slot are no longer read
      // dQ piece: rows m0 + 64 qb + wrow (+8), columns 64 cb + 8j + 2t (+1)
      const BwdTile w = work();
      const int64_t slice = f.deterministic ? w.x : 0;
      float* dq = f.dq_accum + ((slice * f.batch + w.b) * f.hq + h) * static_cast<int64_t>(f.sq) * f.d;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = m0 + 64 * qb + wrow + 8 * hh;
        if (r >= f.sq) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int c = 64 * cb + 8 * j + 2 * t;
          if (c < f.d) red_add_pair(dq + static_cast<int64_t>(r) * f.d + c, acc_dq[j][2 * hh], acc_dq[j][2 * hh + 1]);
        }
      }
      rd.advance();
    }
    if (kb.total > 0 && lane == 0) mbar_arrive(kv_empty);  // K and V are no longer read (wgmma waited)
    if (kb.total > 0) kv_phase ^= 1u;

    // ---- epilogue of the key block: rows key0 (+8), columns 8j + 2t (+1) --------------------------------
    const BwdTile w = work();
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int key = key0 + 8 * hh;
      if (key >= f.sk) continue;
      if (f.head_splits > 1) {
        const int64_t row = ((static_cast<int64_t>(w.hs) * f.batch + w.b) * f.hkv + w.hk) * f.sk + key;
#pragma unroll
        for (int j = 0; j < kDT; ++j) {
          const int c = 8 * j + 2 * t;
          if (c >= f.d) continue;
          *reinterpret_cast<float2*>(f.dk_accum + row * f.d + c) = make_float2(acc_dk[j][2 * hh], acc_dk[j][2 * hh + 1]);
          *reinterpret_cast<float2*>(f.dv_accum + row * f.d + c) = make_float2(acc_dv[j][2 * hh], acc_dv[j][2 * hh + 1]);
        }
      } else {
        T* dk = static_cast<T*>(f.dk.ptr) + w.b * f.dk.batch_stride + w.hk * f.dk.head_stride + key * f.dk.row_stride;
        T* dv = static_cast<T*>(f.dv.ptr) + w.b * f.dv.batch_stride + w.hk * f.dv.head_stride + key * f.dv.row_stride;
#pragma unroll
        for (int j = 0; j < kDT; ++j) {
          const int c = 8 * j + 2 * t;
          if (c >= f.d) continue;
          *reinterpret_cast<uint32_t*>(dk + c) = pack2<T>(acc_dk[j][2 * hh] * f.scale, acc_dk[j][2 * hh + 1] * f.scale);
          *reinterpret_cast<uint32_t*>(dv + c) = pack2<T>(acc_dv[j][2 * hh], acc_dv[j][2 * hh + 1]);
        }
      }
    }
    n_block += f.deterministic ? f.dq_splits : num_n();
  }
#endif
}

template <typename T, int kHeadDim>
cudaError_t launch_flash_bwd_sm90(const FlashBwdParams& f, cudaStream_t stream) {
  using Kt = typename BwdConfig<kHeadDim>::Traits;
  const int64_t num_n = (f.sk + Kt::kBlockN - 1) / Kt::kBlockN;
  const int64_t grid_n = f.deterministic ? f.dq_splits : num_n;
  const int64_t grid = grid_n * f.batch * f.hkv * f.head_splits;
  if (grid <= 0) return cudaSuccess;
  if (grid > INT_MAX) return cudaErrorInvalidConfiguration;
  Sm90BwdParams p;
  p.f = f;
  const int64_t sq_pad = (f.sq + kBwdRowPad - 1) / kBwdRowPad * kBwdRowPad;
  const int64_t rows = static_cast<int64_t>(f.batch) * f.hq;
  cudaError_t err;
  if ((err = make_tensor_map(&p.tma_q, f.q, f.dtype, f.batch, f.hq, f.sq, f.d, Kt::kBlockM)) != cudaSuccess ||
      (err = make_tensor_map(&p.tma_do, f.dout, f.dtype, f.batch, f.hq, f.sq, f.d, Kt::kBlockM)) != cudaSuccess ||
      (err = make_tensor_map(&p.tma_k, f.k, f.dtype, f.batch, f.hkv, f.sk, f.d, Kt::kBlockN)) != cudaSuccess ||
      (err = make_tensor_map(&p.tma_v, f.v, f.dtype, f.batch, f.hkv, f.sk, f.d, Kt::kBlockN)) != cudaSuccess ||
      (err = make_rowvec_map(&p.tma_lse, f.lse_log2, sq_pad, rows, Kt::kBlockM)) != cudaSuccess ||
      (err = make_rowvec_map(&p.tma_delta, f.delta, sq_pad, rows, Kt::kBlockM)) != cudaSuccess) {
    return err;
  }
  auto kernel = flash_bwd_sm90_kernel<T, Kt>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Kt::kSmem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid), Kt::kThreads, Kt::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sm90

template <typename T, int kHeadDim>
cudaError_t run_flash_bwd_sm90_(const FlashBwdParams& p, cudaStream_t stream) {
  return sm90::launch_flash_bwd_sm90<T, kHeadDim>(p, stream);
}

}  // namespace attn
}  // namespace gptk
