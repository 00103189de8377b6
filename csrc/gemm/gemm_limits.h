// gemm_limits.h: what the cuBLASLt linear-layer GEMMs (lt_gemm.h) take, stated once (plain C++).
// Used by the families that run on them (mlp_limits.h, loss_limits.h).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "kernel_limits.h"

namespace gptk {
namespace gemm {

// Feature sizes (the GEMMs' m / n / k along the feature dimensions): rows of 16 bytes, so that the
// fused epilogues' vectors and cuBLASLt's aligned kernels apply.
constexpr int64_t kFeatureMultiple = 8;
// The ReLU bit-mask epilogue (RELU_AUX) needs a hidden width that is a multiple of this (the mask's
// leading dimension is in bits and must be a multiple of 128); other widths save no mask.
constexpr int64_t kReluMaskMultiple = 128;
#define GPTK_GEMM_DTYPES DType::kFloat16, DType::kBFloat16

inline bool dtype_supported(DType t) { return dtype_in(t, {GPTK_GEMM_DTYPES}); }

// "" when the GEMMs take this dtype and these (name, size) features, else the reason.
inline std::string problem_error(DType dtype, std::initializer_list<std::pair<const char*, int64_t>> features) {
  if (!dtype_supported(dtype))
    return std::string("dtype ") + dtype_name(dtype) + ": the cuBLASLt path takes " + dtype_names({GPTK_GEMM_DTYPES});
  for (const auto& f : features)
    if (f.second <= 0 || f.second % kFeatureMultiple != 0)
      return std::string(f.first) + " " + std::to_string(f.second) + " must be a positive multiple of " +
             std::to_string(kFeatureMultiple) + " on the cuBLASLt path";
  return {};
}

inline std::string limits_json() {
  return json_object({{"feature_multiple", std::to_string(kFeatureMultiple)},
                      {"relu_mask_multiple", std::to_string(kReluMaskMultiple)},
                      {"dtypes", json_dtypes({GPTK_GEMM_DTYPES})}});
}

}  // namespace gemm
}  // namespace gptk
