// pipeline.cuh: the TMA rings of the sm90 attention kernels (the forward's K/V, the backward's
// Q/dO/lse/delta) as small types -- slot/phase state, the full/empty mbarrier pairs of each slot --
// and the named barriers of the consumer warpgroups.
//
// Ring protocol (FlashAttention-3 hopper/mainloop_fwd_sm90_tma_gmma_ws.hpp with CUTLASS
// PipelineTmaAsync, cutlass/pipeline/sm90_pipeline.hpp; written here without them):
//   producer, slot s of round r:  wait empty[s] (parity of round r-1, so round 0 passes at once)
//                                 arrive.expect_tx(full[s], bytes); TMA loads complete_tx on full[s]
//   consumer:                     wait full[s] (parity of round r); wgmma reads the slot;
//                                 after wgmma.wait_group, lane 0 of each consumer warp arrives on
//                                 empty[s] (count = number of consumer warps), handing it back.
// A slot's state is (index, phase): index advances 0, 1, .., kStages-1, 0, ..; phase flips each time
// the index wraps. Consumers wait for parity `phase`, producers for parity `phase ^ 1`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attention/sm90/tma.cuh"

namespace gptk {
namespace attn {
namespace sm90 {

template <int kStages>
struct PipeState {
  int index = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++index == kStages) {
      index = 0;
      phase ^= 1u;
    }
  }
};

// kStages full barriers followed by kStages empty barriers, 8 bytes each, at `base` (shared window).
template <int kStages>
struct Ring {
  uint32_t base;
  __device__ __forceinline__ uint32_t full(int s) const { return base + 8u * static_cast<uint32_t>(s); }
  __device__ __forceinline__ uint32_t empty(int s) const { return base + 8u * static_cast<uint32_t>(kStages + s); }
  static constexpr int kBytes = 16 * kStages;

  __device__ __forceinline__ void init(uint32_t consumer_arrivals) const {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);  // the producer's arrive.expect_tx (or plain arrive)
      mbar_init(empty(s), consumer_arrivals);
    }
  }
  // Producer side: wait until slot st.index may be overwritten.
  __device__ __forceinline__ void acquire(const PipeState<kStages>& st) const { mbar_wait(empty(st.index), st.phase ^ 1u); }
  // Consumer side: wait until slot st.index holds its data / give it back (one call per consumer warp).
  __device__ __forceinline__ void wait_full(const PipeState<kStages>& st) const { mbar_wait(full(st.index), st.phase); }
  __device__ __forceinline__ void release(const PipeState<kStages>& st, int lane) const {
    if (lane == 0) mbar_arrive(empty(st.index));
  }
};

// ---- named barriers (PTX ISA "Parallel Synchronization and Communication Instructions: bar, barrier") ----
// Id 0 is __syncthreads. One enum for every id the kernel uses (FlashAttention-3 named_barrier.hpp).
enum class NamedBarrier : uint32_t {
  kSchedWG0 = 1,     // consumer warpgroup 0 may issue its GEMMs (arrived at by warpgroup 1)
  kSchedWG1 = 2,     // consumer warpgroup 1 may issue its GEMMs (arrived at by warpgroup 0)
  kEpilogueWG0 = 3,  // the 128 threads of consumer warpgroup 0 have written their output tile
  kEpilogueWG1 = 4,
  kBwdDsReady = 5,   // backward: both consumer warpgroups have written their dS^T rows (flash_bwd_sm90_kernel.cuh)
};

__device__ __forceinline__ void named_bar_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Ping-pong of the two consumer warpgroups (FlashAttention-3 warp_scheduler_barrier_sync/arrive,
// mainloop_fwd_sm90_tma_gmma_ws.hpp around line 915): each issues its GEMMs of a step only after
// the other has issued its own, so one warpgroup's softmax overlaps the other's tensor-core work.
// Both run the same number of steps; warpgroup 0 starts without waiting and warpgroup 1 does not
// signal after its last step, so every bar.sync is matched by exactly one bar.arrive.
struct GemmScheduler {
  int wg;         // consumer warpgroup, 0 or 1
  int last_step;  // index of the last step
  __device__ __forceinline__ void begin(int step) const {
    if (wg != 0 || step != 0) named_bar_sync(static_cast<uint32_t>(NamedBarrier::kSchedWG0) + wg, 256);
  }
  __device__ __forceinline__ void end(int step) const {
    if (wg != 1 || step != last_step) named_bar_arrive(static_cast<uint32_t>(NamedBarrier::kSchedWG0) + (1 - wg), 256);
  }
};

}  // namespace sm90
}  // namespace attn
}  // namespace gptk
