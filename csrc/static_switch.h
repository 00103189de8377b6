// static_switch.h: turn runtime values into template arguments, in one place.
//
// Usage (as FlashAttention's static_switch.h):
//   BOOL_SWITCH(is_causal, kIsCausal, [&] { launch<kIsCausal>(params, stream); });
//   DTYPE_SWITCH(params.dtype, T, [&] { launch<T>(params, stream); });
// Each macro instantiates the lambda once per case, so keep the cases few.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

// fp16 and bf16 only: the tensor-core kernels (attention).
#define HALF_DTYPE_SWITCH(DTYPE, T, ...)                             \
  [&] {                                                              \
    switch (DTYPE) {                                                 \
      case ::gptk::DType::kFloat16: {                                \
        using T = __half;                                            \
        return __VA_ARGS__();                                        \
      }                                                              \
      case ::gptk::DType::kBFloat16: {                               \
        using T = __nv_bfloat16;                                     \
        return __VA_ARGS__();                                        \
      }                                                              \
      default:                                                       \
        return cudaErrorInvalidValue;                                \
    }                                                                \
  }()
