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

#include <algorithm>
#include <cmath>

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

namespace {
size_t align256(size_t n) { return (n + 255) / 256 * 256; }
}  // namespace

int flash_bwd_head_splits(const FlashBwdParams& p, int num_sms) {
  // The query heads of a GQA group are shared by hs CTAs per key block when one CTA per (key block,
  // K/V head) leaves the GPU partly idle: the smallest divisor hs of the group whose grid fills
  // the last wave to >= 85% (the backward runs one CTA per SM), else the one that fills it best.
  // More slices cost fp32 partial dK/dV traffic (flash_bwd_convert_dkv).
  const int group = p.hkv > 0 ? p.hq / p.hkv : 1;
  const int64_t base = (p.sk + kBwdBlockN - 1) / kBwdBlockN * static_cast<int64_t>(p.batch) * p.hkv;
  if (group <= 1 || base <= 0 || num_sms <= 0) return 1;
  int best = 1;
  double best_eff = 0.0;
  for (int hs = 1; hs <= group; ++hs) {
    if (group % hs != 0) continue;
    const double waves = static_cast<double>(base * hs) / num_sms;
    const double eff = waves / std::ceil(waves);
    if (eff >= 0.85) return hs;
    if (eff > best_eff + 1e-9) best = hs, best_eff = eff;
  }
  return best;
}

int flash_bwd_dq_splits(const FlashBwdParams& p, int num_sms) {
  if (!p.deterministic) return 1;
  const int64_t num_n = (p.sk + kBwdBlockN - 1) / kBwdBlockN;
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.hkv * std::max(p.head_splits, 1);
  int64_t splits = ctas > 0 ? (2LL * num_sms + ctas - 1) / ctas : 1;  // about two CTAs per SM
  splits = std::min<int64_t>(std::min<int64_t>(splits, num_n), 16);
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

size_t flash_bwd_workspace_bytes(const FlashBwdParams& p, int dq_splits) {
  const int64_t sq_pad = (p.sq + kBwdRowPad - 1) / kBwdRowPad * kBwdRowPad;
  const size_t rows = static_cast<size_t>(p.batch) * p.hq * sq_pad;
  const size_t dq = static_cast<size_t>(dq_splits) * p.batch * p.hq * p.sq * p.d;
  const size_t dkv = p.head_splits > 1 ? static_cast<size_t>(p.head_splits) * p.batch * p.hkv * p.sk * p.d : 0;
  return 2 * align256(rows * sizeof(float)) + align256(dq * sizeof(float)) + 2 * align256(dkv * sizeof(float));
}

cudaError_t flash_bwd(FlashBwdParams p, void* workspace, int dq_splits, cudaStream_t stream) {
  if (!valid_common(p.batch, p.hq, p.hkv, p.sq, p.sk, p.d, p.scale) || dq_splits < 1 || p.head_splits < 1 ||
      (p.hq / p.hkv) % p.head_splits != 0)
    return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  const int64_t sq_pad = (p.sq + kBwdRowPad - 1) / kBwdRowPad * kBwdRowPad;
  const size_t rows = static_cast<size_t>(p.batch) * p.hq * sq_pad;
  char* ws = static_cast<char*>(workspace);
  p.lse_log2 = reinterpret_cast<float*>(ws);
  p.delta = reinterpret_cast<float*>(ws + align256(rows * sizeof(float)));
  p.dq_accum = reinterpret_cast<float*>(ws + 2 * align256(rows * sizeof(float)));
  p.dq_splits = dq_splits;
  const size_t dq_bytes = static_cast<size_t>(dq_splits) * p.batch * p.hq * p.sq * p.d * sizeof(float);
  const size_t dkv_bytes = static_cast<size_t>(p.head_splits) * p.batch * p.hkv * p.sk * p.d * sizeof(float);
  if (p.head_splits > 1) {
    p.dk_accum = reinterpret_cast<float*>(ws + 2 * align256(rows * sizeof(float)) + align256(dq_bytes));
    p.dv_accum = reinterpret_cast<float*>(reinterpret_cast<char*>(p.dk_accum) + align256(dkv_bytes));
  }
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
  if (p.head_splits > 1 && (err = flash_bwd_convert_dkv(p, stream)) != cudaSuccess) return err;
  return flash_bwd_convert_dq(p, stream);
}

}  // namespace attn
}  // namespace gptk
