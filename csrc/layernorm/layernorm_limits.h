// layernorm_limits.h: what the LayerNorm kernels take, stated once (plain C++, no device code).
// Read by the launchers and the binding (problem_error) and, through torch.ops.gptkernels.limits(),
// by gptkernels/ops/layernorm.py.
#pragma once

#include <cstdint>
#include <string>

#include "kernel_limits.h"

namespace gptk {
namespace layernorm {

// Row length (the normalized size): a row lives in the registers of up to 512 threads, 4 units of
// 8 elements each (layer_norm.cu checks that the launch limits give exactly this).
constexpr int64_t kMinCols = 1;
constexpr int64_t kMaxCols = 16384;
#define GPTK_LAYERNORM_DTYPES DType::kFloat32, DType::kFloat16, DType::kBFloat16

inline bool dtype_supported(DType t) { return dtype_in(t, {GPTK_LAYERNORM_DTYPES}); }

// The one validity rule of forward and backward: "" when the kernels take rows of `cols` elements.
inline std::string problem_error(int64_t cols, DType dtype) {
  if (!dtype_supported(dtype))
    return std::string("dtype ") + dtype_name(dtype) + ": the LayerNorm kernels take " +
           dtype_names({GPTK_LAYERNORM_DTYPES});
  if (cols < kMinCols || cols > kMaxCols)
    return "normalized size " + std::to_string(cols) + " is outside the kernels' range [" + std::to_string(kMinCols) +
           ", " + std::to_string(kMaxCols) + "]";
  return {};
}

inline std::string limits_json() {
  return json_object({{"min_cols", std::to_string(kMinCols)},
                      {"max_cols", std::to_string(kMaxCols)},
                      {"dtypes", json_dtypes({GPTK_LAYERNORM_DTYPES})}});
}

}  // namespace layernorm
}  // namespace gptk
