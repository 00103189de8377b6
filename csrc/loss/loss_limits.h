// loss_limits.h: what the cross-entropy kernels and the chunked linear cross-entropy take, stated
// once (plain C++, no device code).
#pragma once

#include <cstdint>
#include <string>

#include "gemm/gemm_limits.h"
#include "kernel_limits.h"

namespace gptk {
namespace loss {

// A row of logits is indexed with 32-bit ints inside the kernel (rows themselves are 64-bit).
constexpr int64_t kMaxVocab = (int64_t(1) << 31) - 1;
#define GPTK_LOSS_DTYPES DType::kFloat32, DType::kFloat16, DType::kBFloat16

inline std::string vocab_error(int64_t vocab) {
  if (vocab < 1 || vocab > kMaxVocab)
    return "vocab size " + std::to_string(vocab) + " is outside the kernels' range [1, " + std::to_string(kMaxVocab) +
           "]";
  return {};
}

// cross_entropy over [rows, vocab] logits: "" when the kernels take it.
inline std::string problem_error(int64_t vocab, DType dtype) {
  if (!dtype_in(dtype, {GPTK_LOSS_DTYPES}))
    return std::string("dtype ") + dtype_name(dtype) + ": the cross-entropy kernels take " +
           dtype_names({GPTK_LOSS_DTYPES});
  return vocab_error(vocab);
}

// linear_cross_entropy: x [n, features] @ weight[vocab, features]^T on cuBLASLt, then the kernels.
inline std::string linear_problem_error(int64_t features, int64_t vocab, DType dtype) {
  const std::string g = gemm::problem_error(dtype, {{"features", features}});
  return g.empty() ? vocab_error(vocab) : g;
}

inline std::string limits_json() {
  return json_object({{"max_vocab", std::to_string(kMaxVocab)},
                      {"dtypes", json_dtypes({GPTK_LOSS_DTYPES})},
                      {"linear", gemm::limits_json()}});
}

}  // namespace loss
}  // namespace gptk
