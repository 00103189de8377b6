// bias_act.h: launchers for y = act(x + bias) and its backward (plain CUDA, see bias_act.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

namespace gptk {

enum class Activation : int { kReLU = 0, kGeluTanh = 1, kGeluErf = 2 };

// x, y: [rows, cols] row-major; bias: [cols]. y must not alias x.
cudaError_t bias_act_forward(const void* x, const void* bias, void* y, int64_t rows, int64_t cols, DType dtype,
                             Activation act, cudaStream_t stream);

// fp32 bytes of scratch bias_act_backward needs for its partial column sums.
size_t bias_act_backward_workspace(int64_t rows, int64_t cols);

// dx = dy * act'(x + bias); dbias = sum over rows of dx (fp32 partials, then a fixed-order
// reduction: deterministic). dx must not alias dy or x.
cudaError_t bias_act_backward(const void* dy, const void* x, const void* bias, void* dx, void* dbias, int64_t rows,
                              int64_t cols, DType dtype, Activation act, void* workspace, cudaStream_t stream);

}  // namespace gptk
