// flash_api.cu: the attention entry points declared in flash.h. They validate what the kernels
// rely on and pick an instantiation by dtype (bf16 / fp16), head dim (<= 64 -> the 64 kernel,
// <= 128 -> the 128 kernel; other dims are zero-padded in shared memory) and architecture.
//
// Architecture dispatch: `select_arch_path` is the one place that chooses between kernel
// families. The sm_80 mma.sync path runs on every GPU >= sm_80 (sm_90 too). The forward also has
// the Hopper path (sm90/, wgmma + TMA + warp specialisation, FlashAttention-3 style), chosen by
// FlashFwdParams::impl on compute capability 9.0 in a build for sm_90a; a call it does not support
// (run_flash_fwd_sm90 returns cudaErrorNotSupported before launching) runs the sm_80 kernel.
#include "attention/flash.h"
#include "attention/sm90/flash_fwd_sm90.h"
#include "static_switch.h"

#include <algorithm>
#include <cstring>

namespace gptk {
namespace attn {
namespace {

enum class ArchPath { kSm80, kSm90 };

#ifndef GPTK_CUDA_ARCHS
#define GPTK_CUDA_ARCHS ""
#endif

// The sm90 kernels have code only in the sm_90a device pass (flash_fwd_sm90.h).
bool built_for_sm90a() {
  const char* a = GPTK_CUDA_ARCHS;  // e.g. "80;90a"
  for (const char* p = std::strstr(a, "90a"); p != nullptr; p = std::strstr(p + 1, "90a")) {
    const bool starts = p == a || p[-1] == ';' || p[-1] == ',' || p[-1] == ' ';
    const bool ends = p[3] == '\0' || p[3] == ';' || p[3] == ',' || p[3] == ' ';
    if (starts && ends) return true;
  }
  return false;
}

bool device_is_sm90() {
  int dev = 0, major = 0, minor = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  return major == 9 && minor == 0;  // sm_90a code runs on 9.0 only
}

ArchPath select_arch_path() { return ArchPath::kSm80; }

ArchPath select_fwd_path(AttnImpl impl) {
  const bool wanted = impl == AttnImpl::kSm90 || (impl == AttnImpl::kAuto && kSm90Verified);
  return wanted && built_for_sm90a() && device_is_sm90() ? ArchPath::kSm90 : select_arch_path();
}

bool valid_common(int batch, int hq, int hkv, int sq, int sk, int d, float scale) {
  constexpr int kMaxLen = 1 << 30;  // mask arithmetic stays in int32 (mask.cuh)
  return batch >= 0 && hq > 0 && hkv > 0 && hq % hkv == 0 && sq >= 0 && sk >= 0 && sq < kMaxLen && sk < kMaxLen &&
         d > 0 && d % 8 == 0 && d <= 128 && scale > 0.f && scale < INFINITY;
}

}  // namespace

const char* flash_fwd_active_impl(AttnImpl impl) {
  return select_fwd_path(impl) == ArchPath::kSm90 ? "sm90" : "sm80";
}

bool flash_fwd_sm90_built() { return built_for_sm90a(); }

cudaError_t flash_fwd(FlashFwdParams p, cudaStream_t stream) {
  if (!valid_common(p.batch, p.hq, p.hkv, p.sq, p.sk, p.d, p.scale)) return cudaErrorInvalidValue;
  if (p.batch == 0 || p.sq == 0) return cudaSuccess;
  switch (select_fwd_path(p.impl)) {
    case ArchPath::kSm90: {
#ifndef GPTK_EMU  // (never selected under the CPU emulator, which has no sm_90a build)
      const cudaError_t err = run_flash_fwd_sm90(p, stream);
      if (err != cudaErrorNotSupported) return err;
#endif
      [[fallthrough]];  // a call the sm90 kernel does not take: the sm_80 kernel
    }
    case ArchPath::kSm80:
    default:
      return HALF_DTYPE_SWITCH(p.dtype, T, [&] {
        return p.d <= 64 ? run_flash_fwd_sm80<T, 64>(p, stream) : run_flash_fwd_sm80<T, 128>(p, stream);
      });
  }
}

namespace {
size_t align256(size_t n) { return (n + 255) / 256 * 256; }
}  // namespace

int flash_bwd_dq_splits(const FlashBwdParams& p, int num_sms) {
  if (!p.deterministic) return 1;
  const int64_t num_n = (p.sk + kBwdBlockN - 1) / kBwdBlockN;
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.hkv;
  int64_t splits = ctas > 0 ? (2LL * num_sms + ctas - 1) / ctas : 1;  // about two CTAs per SM
  splits = std::min<int64_t>(std::min<int64_t>(splits, num_n), 16);
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

size_t flash_bwd_workspace_bytes(const FlashBwdParams& p, int dq_splits) {
  const int64_t sq_pad = (p.sq + kBwdRowPad - 1) / kBwdRowPad * kBwdRowPad;
  const size_t rows = static_cast<size_t>(p.batch) * p.hq * sq_pad;
  const size_t dq = static_cast<size_t>(dq_splits) * p.batch * p.hq * p.sq * p.d;
  return 2 * align256(rows * sizeof(float)) + align256(dq * sizeof(float));
}

cudaError_t flash_bwd(FlashBwdParams p, void* workspace, int dq_splits, cudaStream_t stream) {
  if (!valid_common(p.batch, p.hq, p.hkv, p.sq, p.sk, p.d, p.scale) || dq_splits < 1) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  const int64_t sq_pad = (p.sq + kBwdRowPad - 1) / kBwdRowPad * kBwdRowPad;
  const size_t rows = static_cast<size_t>(p.batch) * p.hq * sq_pad;
  char* ws = static_cast<char*>(workspace);
  p.lse_log2 = reinterpret_cast<float*>(ws);
  p.delta = reinterpret_cast<float*>(ws + align256(rows * sizeof(float)));
  p.dq_accum = reinterpret_cast<float*>(ws + 2 * align256(rows * sizeof(float)));
  p.dq_splits = dq_splits;
  const size_t dq_bytes = static_cast<size_t>(dq_splits) * p.batch * p.hq * p.sq * p.d * sizeof(float);
  cudaError_t err = dq_bytes ? cudaMemsetAsync(p.dq_accum, 0, dq_bytes, stream) : cudaSuccess;
  if (err != cudaSuccess) return err;
  if ((err = flash_bwd_preprocess(p, stream)) != cudaSuccess) return err;
  switch (select_arch_path()) {
    case ArchPath::kSm80:
    default:
      err = HALF_DTYPE_SWITCH(p.dtype, T, [&] {
        return p.d <= 64 ? run_flash_bwd_sm80<T, 64>(p, stream) : run_flash_bwd_sm80<T, 128>(p, stream);
      });
  }
  if (err != cudaSuccess) return err;
  return flash_bwd_convert_dq(p, stream);
}

}  // namespace attn
}  // namespace gptk
