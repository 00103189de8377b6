// attention_limits.h: what the attention kernels take, stated once (plain C++, no device code).
//
// Everything else reads this header: the dispatch (HEADDIM_SWITCH and ATTN_DTYPE_SWITCH in
// static_switch.h), the launchers (flash_api.cu) and the binding (problem_error),
// tools/gen_instantiations.py (parses the two lists below and writes the instantiation files
// flash_{fwd,bwd}_hdim{D}_{dtype}.cu and sm90/flash_fwd_sm90_hdim{D}_{dtype}.cu, which the emulated
// tests' build globs),
// tools/check_mma_layouts.py, and Python through torch.ops.gptkernels.limits()["attention"].
//
// Adding a head dim: add it to GPTK_ATTN_HEAD_DIMS, run `python tools/gen_instantiations.py`.
// Forward, backward and decode all follow. The sm80 kernels also need a tile configuration for it
// (FwdConfig / BwdConfig in flash_fwd_kernel.cuh / flash_bwd_kernel.cuh; their swizzled tiles take
// rows of 64 or 128 elements), and so does the sm90 forward (sm90/flash_fwd_sm90_kernel.cuh, multiples
// of 64 columns; sm_90a builds only): a missing one is a compile error naming the head dim.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "kernel_limits.h"

// Head dims the kernels are compiled for, ascending. A call with head dim d runs the smallest
// compiled one >= d, with the columns past d zero-filled in shared memory. (X(D, extra args):
// the extra arguments let a user pair every head dim with, e.g., every dtype.)
#define GPTK_ATTN_HEAD_DIMS(X, ...) X(64, __VA_ARGS__) X(128, __VA_ARGS__)

// Storage dtypes of q, k, v and out: X(instantiation file suffix, DType enumerator, C++ type).
#define GPTK_ATTN_DTYPES(X) X(bf16, kBFloat16, __nv_bfloat16) X(fp16, kFloat16, __half)

namespace gptk {
namespace attn {

#define GPTK_ATTN_HEAD_DIM_ITEM_(D, ...) D,
constexpr int kHeadDims[] = {GPTK_ATTN_HEAD_DIMS(GPTK_ATTN_HEAD_DIM_ITEM_)};
#undef GPTK_ATTN_HEAD_DIM_ITEM_
constexpr int kNumHeadDims = static_cast<int>(sizeof(kHeadDims) / sizeof(kHeadDims[0]));
constexpr int kMaxHeadDim = kHeadDims[kNumHeadDims - 1];
constexpr int kHeadDimMultiple = 8;                     // rows move as 16-byte chunks (cp.async, ldmatrix)
constexpr int64_t kMaxSeqLen = (int64_t(1) << 30) - 1;  // the mask arithmetic (i + Sk - Sq) stays in int32
// Dispatch policy rather than a limit: flash_decode (which every call without autograd runs) uses
// its CUDA-core kernel when a K/V head serves at most this many query rows (Sq * Hq / Hkv), and the
// tensor-core forward (split over the keys when it would have too few CTAs) above.
constexpr int kDecodeMaxRows = 16;

constexpr bool head_dims_valid() {
  for (int i = 0; i < kNumHeadDims; ++i) {
    if (kHeadDims[i] <= 0 || kHeadDims[i] % kHeadDimMultiple != 0) return false;
    if (i > 0 && kHeadDims[i] <= kHeadDims[i - 1]) return false;
  }
  return true;
}
static_assert(head_dims_valid(), "GPTK_ATTN_HEAD_DIMS: ascending positive multiples of kHeadDimMultiple");

// The compiled head dim that runs a call with head dim d (0 when none does).
constexpr int padded_head_dim(int64_t d) {
  for (int i = 0; i < kNumHeadDims; ++i)
    if (d <= kHeadDims[i]) return kHeadDims[i];
  return 0;
}

#define GPTK_ATTN_DTYPE_ITEM_(SUFFIX, ENUM, CTYPE) DType::ENUM,
inline bool dtype_supported(DType t) { return dtype_in(t, {GPTK_ATTN_DTYPES(GPTK_ATTN_DTYPE_ITEM_)}); }

// The one validity rule of forward, backward and decode: "" when the kernels take the problem,
// else the reason. Shapes are in SDPA's (B, H, S, D) terms.
inline std::string problem_error(int64_t batch, int64_t hq, int64_t hkv, int64_t sq, int64_t sk, int64_t d,
                                 double scale, DType dtype) {
  using std::to_string;
  if (!dtype_supported(dtype))
    return std::string("dtype ") + dtype_name(dtype) + ": the attention kernels take " +
           dtype_names({GPTK_ATTN_DTYPES(GPTK_ATTN_DTYPE_ITEM_)});
  if (batch < 0 || sq < 0 || sk < 0) return "batch and sequence lengths must be non-negative";
  if (hq <= 0 || hkv <= 0 || hq % hkv != 0)
    return "heads: the " + to_string(hkv) + " K/V heads must divide the " + to_string(hq) + " query heads";
  if (d <= 0 || d % kHeadDimMultiple != 0 || d > kMaxHeadDim)
    return "head dim " + to_string(d) + ": the kernels take multiples of " + to_string(kHeadDimMultiple) +
           " up to " + to_string(kMaxHeadDim);
  if (sq > kMaxSeqLen || sk > kMaxSeqLen)
    return "sequence lengths " + to_string(sq) + ", " + to_string(sk) + ": the kernels take at most " +
           to_string(kMaxSeqLen);
  if (!(scale > 0) || !std::isfinite(scale))
    return "scale " + to_string(scale) + ": the kernels need a positive finite scale";
  return {};
}

// The attention variants' extra rule (window, softcap; flash.h states their meaning): "" when the
// kernels take them. window sides: -1 = unbounded, else a number of keys >= 0; causal is the window
// (wl, 0) and takes a right side of -1 or 0 only; softcap: 0 = off, else a positive finite cap.
inline std::string variant_error(int64_t window_left, int64_t window_right, double softcap, bool causal) {
  using std::to_string;
  if (window_left < -1 || window_right < -1)
    return "window (" + to_string(window_left) + ", " + to_string(window_right) +
           "): each side must be -1 (unbounded) or a number of keys >= 0";
  if (causal && window_right > 0)
    return "window right side " + to_string(window_right) + ": with causal=True the right side must be -1 or 0";
  if (!(softcap >= 0) || !std::isfinite(softcap))
    return "softcap " + to_string(softcap) + ": must be 0 (off) or a positive finite number";
  return {};
}

// Variants the CUDA kernels implement in forward, backward and decode alike, each tested on the
// emulator (tests/test_emulated_attention_variants.py; not yet run on a GPU). Python routes a call
// that uses a variant not listed here to its PyTorch path.
#define GPTK_ATTN_VARIANTS "\"window\", \"softcap\", \"varlen\""

inline std::string limits_json() {
  return json_object({{"head_dims", json_ints(kHeadDims)},
                      {"head_dim_multiple", std::to_string(kHeadDimMultiple)},
                      {"max_head_dim", std::to_string(kMaxHeadDim)},
                      {"max_seq_len", std::to_string(kMaxSeqLen)},
                      {"dtypes", json_dtypes({GPTK_ATTN_DTYPES(GPTK_ATTN_DTYPE_ITEM_)})},
                      {"decode_max_rows", std::to_string(kDecodeMaxRows)},
                      {"variants", "[" GPTK_ATTN_VARIANTS "]"}});
}
#undef GPTK_ATTN_DTYPE_ITEM_

}  // namespace attn
}  // namespace gptk
