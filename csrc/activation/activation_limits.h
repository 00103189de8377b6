// activation_limits.h: what the bias + activation kernels take (plain C++): any shape (rows of any
// length, 64-bit sizes), these storage dtypes.
#pragma once

#include <string>

#include "kernel_limits.h"

namespace gptk {
namespace activation {

#define GPTK_ACTIVATION_DTYPES DType::kFloat32, DType::kFloat16, DType::kBFloat16

inline std::string problem_error(DType dtype) {
  if (!dtype_in(dtype, {GPTK_ACTIVATION_DTYPES}))
    return std::string("dtype ") + dtype_name(dtype) + ": the bias + activation kernels take " +
           dtype_names({GPTK_ACTIVATION_DTYPES});
  return {};
}

inline std::string limits_json() { return json_object({{"dtypes", json_dtypes({GPTK_ACTIVATION_DTYPES})}}); }

}  // namespace activation
}  // namespace gptk
