// flash_api.cu: the attention entry points declared in flash.h. They validate what the kernels
// rely on and pick an instantiation by dtype (bf16 / fp16), head dim (<= 64 -> the 64 kernel,
// <= 128 -> the 128 kernel; other dims are zero-padded in shared memory) and architecture.
//
// Architecture dispatch: `select_arch_path` is the one place that chooses between kernel
// families. Today it returns the sm_80 mma.sync path for every GPU >= sm_80 (it runs on sm_90
// too). A Hopper path (wgmma + TMA + warp specialisation, FlashAttention-3 style) would add
// ArchPath::kSm90 and its own run_flash_*_sm90 instantiations next to the sm80 ones.
#include "attention/flash.h"
#include "static_switch.h"

namespace gptk {
namespace attn {
namespace {

enum class ArchPath { kSm80 };

ArchPath select_arch_path() { return ArchPath::kSm80; }

bool valid_common(int batch, int hq, int hkv, int sq, int sk, int d, float scale) {
  constexpr int kMaxLen = 1 << 30;  // mask arithmetic stays in int32 (mask.cuh)
  return batch >= 0 && hq > 0 && hkv > 0 && hq % hkv == 0 && sq >= 0 && sk >= 0 && sq < kMaxLen && sk < kMaxLen &&
         d > 0 && d % 8 == 0 && d <= 128 && scale > 0.f && scale < INFINITY;
}

}  // namespace

cudaError_t flash_fwd(FlashFwdParams p, cudaStream_t stream) {
  if (!valid_common(p.batch, p.hq, p.hkv, p.sq, p.sk, p.d, p.scale)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.sq == 0) return cudaSuccess;
  switch (select_arch_path()) {
    case ArchPath::kSm80:
    default:
      return HALF_DTYPE_SWITCH(p.dtype, T, [&] {
        return p.d <= 64 ? run_flash_fwd_sm80<T, 64>(p, stream) : run_flash_fwd_sm80<T, 128>(p, stream);
      });
  }
}

}  // namespace attn
}  // namespace gptk
