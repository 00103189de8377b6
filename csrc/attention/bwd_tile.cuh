// bwd_tile.cuh: which work a backward CTA does (device code shared by the sm80 backward,
// flash_bwd_kernel.cuh, and the Hopper backward, sm90/flash_bwd_sm90_kernel.cuh).
#pragma once

#include <cuda_runtime.h>

#include "attention/flash.h"

namespace gptk {
namespace attn {

// Which work a CTA does. blockIdx.x = x * (B * Hkv * head_splits) + (b * Hkv + hk) * head_splits + hs:
// x (the key block, or in deterministic mode the first of the key blocks x, x + grid_n, ...) varies
// slowest, so under causal masking the key blocks that see the most queries (the first ones) are
// all launched first and the light ones fill the tail.
struct BwdTile {
  int x, hs, hk, b;
  __device__ __forceinline__ BwdTile(const FlashBwdParams& p, unsigned bid) {
    const unsigned rest = static_cast<unsigned>(p.batch) * p.hkv * p.head_splits;
    x = static_cast<int>(bid / rest);
    bid %= rest;
    hs = static_cast<int>(bid % p.head_splits);
    bid /= p.head_splits;
    hk = static_cast<int>(bid % p.hkv);
    b = static_cast<int>(bid / p.hkv);
  }
};

}  // namespace attn
}  // namespace gptk
