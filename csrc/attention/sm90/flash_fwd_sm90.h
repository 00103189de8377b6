// flash_fwd_sm90.h: the Hopper (sm_90a) attention forward -- parameters, launcher declarations and
// the compile guard (plain C++ plus the CUtensorMap type; no torch).
//
// Same op and semantics as run_flash_fwd_sm80 (flash.h): out and lse in the same layout, so the
// sm_80 backward keeps working on its results. What differs is how the tiles move and multiply:
// TMA loads into 128-byte swizzled shared memory, wgmma from shared-memory descriptors, one
// producer warp and two consumer warpgroups (flash_fwd_sm90_kernel.cuh has the design).
//
// Coverage: bf16 / fp16; head dims that are multiples of 8 up to 128 (the 64 and 128 kernels, the
// columns past d zero-filled by TMA); causal (bottom-right), full, Sq != Sk, GQA / MQA, kv_lens;
// bhsd and bshd (any strides TMA accepts: 16-byte aligned base, strides multiples of 16 bytes).
// flash_fwd_sm90_unsupported() names what it refuses; flash_fwd (flash_api.cu) then runs sm_80.
//
// Selection: opt-in until a GPU run verifies it (kSm90Verified below). FlashFwdParams::impl
// (from GPTKERNELS_ATTENTION_IMPL / gptkernels.set_attention_impl) = kSm90 asks for it; it runs
// when the device is compute capability 9.0 and the extension was built for sm_90a.
#pragma once

#include <cuda_runtime.h>

#include "attention/flash.h"

// Device code of the sm90 path exists only where wgmma / TMA / setmaxnreg do: the sm_90a device
// pass (CUTLASS's CUTE_ARCH_MMA_SM90A_ENABLED test, cute/arch/mma_sm90_desc.hpp) and the CPU
// emulator. In every other pass (host, sm_80) the kernel body is empty and never launched.
#if defined(GPTK_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define GPTK_SM90_DEVICE 1
#else
#define GPTK_SM90_DEVICE 0
#endif

namespace gptk {
namespace attn {

// Flip to true in the same change that records a green device run (CUDA tests of both paths and the
// benchmark in benchmarks/results/): "auto" then picks the sm90 kernel on compute capability 9.0.
constexpr bool kSm90Verified = false;

// nullptr when the sm90 kernel handles `p`, else a short reason (the caller falls back to sm_80).
const char* flash_fwd_sm90_unsupported(const FlashFwdParams& p);

// Runs the forward on the sm90 kernel. cudaErrorNotSupported (nothing launched) when
// flash_fwd_sm90_unsupported(p) != nullptr or the driver lacks cuTensorMapEncodeTiled. Does not
// check the device: the caller (flash_fwd) runs it only on compute capability 9.0.
cudaError_t run_flash_fwd_sm90(const FlashFwdParams& p, cudaStream_t stream);

// Per-instantiation launchers (flash_fwd_sm90_hdim{64,128}_{bf16,fp16}.cu).
template <typename T, int kHeadDim>
cudaError_t run_flash_fwd_sm90_(const FlashFwdParams& p, cudaStream_t stream);

}  // namespace attn
}  // namespace gptk
