// cross_entropy.h: launchers for the fused softmax cross-entropy (plain CUDA, see cross_entropy.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

namespace gptk {

enum class CeReduction : int { kNone = 0, kMean = 1, kSum = 2 };

// Count the targets before the main kernel (so "mean" can scale gradients without a host sync):
//   status[0] = rows whose target is in [0, vocab) ("valid"); ignore_index rows are not counted
//   status[1] = rows whose target is out of range (and not ignore_index)
//   status[2] = rows - (index of the first such row), 0 when there is none
// target: int64 or int32 [rows]. status: 3 int64 in device memory (zeroed here).
cudaError_t cross_entropy_prepare(const void* target, bool target_int64, int64_t rows, int64_t vocab,
                                  int64_t ignore_index, int64_t* status, cudaStream_t stream);

struct CrossEntropyRows {
  const void* logits = nullptr;  // [rows, vocab], row stride ld elements (ld >= vocab)
  int64_t ld = 0;
  void* grad = nullptr;  // [rows, vocab], row stride grad_ld, or nullptr (loss only); may be logits
  int64_t grad_ld = 0;
  const void* target = nullptr;
  bool target_int64 = true;
  float* losses = nullptr;  // [rows]: per-row loss (0 for ignored rows, NaN for out-of-range targets)
  const int64_t* status = nullptr;  // from cross_entropy_prepare: status[0] scales "mean" gradients
  int64_t rows = 0, vocab = 0, ignore_index = -100;
  CeReduction reduction = CeReduction::kMean;
  DType dtype = DType::kFloat32;
};

// One pass over each row for (max, sum of exp), a second (from registers, or L2 for long rows)
// writing grad = (softmax - onehot(target)) * (1 / status[0] for "mean", else 1). Ignored and
// out-of-range rows get a zero gradient.
cudaError_t cross_entropy_rows(const CrossEntropyRows& p, cudaStream_t stream);

// out[0] = sum of losses (divided by status[0] when mean: NaN when no row is valid, as torch).
// Fixed summation order: deterministic.
cudaError_t cross_entropy_reduce(const float* losses, int64_t rows, const int64_t* status, bool mean, float* out,
                                 cudaStream_t stream);

// g[r, :cols] *= scale[per_row ? r : 0] (row stride ld); rows whose factor is exactly 1 are not
// touched, so scaling by the usual upstream gradient of 1 costs one launch and no traffic.
cudaError_t scale_rows(void* g, int64_t ld, int64_t rows, int64_t cols, const float* scale, bool per_row,
                       DType dtype, cudaStream_t stream);

}  // namespace gptk
