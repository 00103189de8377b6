// static_switch.h: turn runtime values into template arguments, in one place.
//
// Usage (as FlashAttention's static_switch.h):
//   BOOL_SWITCH(is_causal, kIsCausal, [&] { launch<kIsCausal>(params, stream); });
//   DTYPE_SWITCH(params.dtype, T, [&] { launch<T>(params, stream); });
//   ATTN_DTYPE_SWITCH / HEADDIM_SWITCH: the attention kernels' lists (below)
// Each macro instantiates the lambda once per case, so keep the cases few.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "attention/attention_limits.h"
#include "device.cuh"

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// fp32, fp16 and bf16: the storage types every memory-bound kernel takes.
#define DTYPE_SWITCH(DTYPE, T, ...)                                  \
  [&] {                                                              \
    switch (DTYPE) {                                                 \
      case ::gptk::DType::kFloat32: {                                \
        using T = float;                                             \
        return __VA_ARGS__();                                        \
      }                                                              \
      case ::gptk::DType::kFloat16: {                                \
        using T = __half;                                            \
        return __VA_ARGS__();                                        \
      }                                                              \
      case ::gptk::DType::kBFloat16: {                               \
        using T = __nv_bfloat16;                                     \
        return __VA_ARGS__();                                        \
      }                                                              \
    }                                                                \
    return cudaErrorInvalidValue;                                    \
  }()

// The attention kernels' dtypes and head dims, from the lists in attention/attention_limits.h
// (GPTK_ATTN_DTYPES, GPTK_ATTN_HEAD_DIMS): one case per list entry, cudaErrorInvalidValue otherwise.
//   ATTN_DTYPE_SWITCH(p.dtype, T, [&] {
//     return HEADDIM_SWITCH(p.d, kHeadDim, [&] { return run_flash_fwd_sm80<T, kHeadDim>(p, stream); });
//   });
// HEADDIM_SWITCH runs the smallest compiled head dim >= d (attn::padded_head_dim). Both return what
// the lambda returns (a cudaError_t).
namespace gptk {
template <typename T>
struct TypeTag {
  using type = T;
};
}  // namespace gptk

#define GPTK_ATTN_DTYPE_CASE_(SUFFIX, ENUM, CTYPE) \
  case ::gptk::DType::ENUM:                        \
    return f_(::gptk::TypeTag<CTYPE>{});

#define ATTN_DTYPE_SWITCH(DTYPE, T, ...)                  \
  [&] {                                                   \
    auto f_ = [&](auto tag_) {                            \
      using T = typename decltype(tag_)::type;            \
      return __VA_ARGS__();                               \
    };                                                    \
    switch (DTYPE) {                                      \
      GPTK_ATTN_DTYPES(GPTK_ATTN_DTYPE_CASE_)             \
      default:                                            \
        break;                                            \
    }                                                     \
    return cudaErrorInvalidValue;                         \
  }()

#define GPTK_ATTN_HEAD_DIM_CASE_(HD, ...) \
  case HD:                                \
    return f_(std::integral_constant<int, HD>{});

#define HEADDIM_SWITCH(D, K, ...)                         \
  [&] {                                                   \
    auto f_ = [&](auto k_) {                              \
      constexpr int K = decltype(k_)::value;              \
      return __VA_ARGS__();                               \
    };                                                    \
    switch (::gptk::attn::padded_head_dim(D)) {           \
      GPTK_ATTN_HEAD_DIMS(GPTK_ATTN_HEAD_DIM_CASE_)       \
      default:                                            \
        break;                                            \
    }                                                     \
    return cudaErrorInvalidValue;                         \
  }()
