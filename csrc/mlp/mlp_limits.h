// mlp_limits.h: what the fused linear layers and the feed-forward block take (plain C++): the
// cuBLASLt GEMMs' rules (gemm/gemm_limits.h) applied to their feature sizes.
#pragma once

#include <cstdint>
#include <string>

#include "gemm/gemm_limits.h"

namespace gptk {
namespace mlp {

// linear_act: x [n, in] -> [n, out].
inline std::string linear_problem_error(int64_t in, int64_t out, DType dtype) {
  return gemm::problem_error(dtype, {{"in_features", in}, {"out_features", out}});
}

// The FFN: x [n, in] -> hidden -> [n, out].
inline std::string problem_error(int64_t in, int64_t hidden, int64_t out, DType dtype) {
  return gemm::problem_error(dtype, {{"in_features", in}, {"hidden_features", hidden}, {"out_features", out}});
}

inline std::string limits_json() { return gemm::limits_json(); }

}  // namespace mlp
}  // namespace gptk
