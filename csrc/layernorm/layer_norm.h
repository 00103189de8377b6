// layer_norm.h: launchers for LayerNorm (optionally fused with a residual add) forward and
// backward (plain CUDA, see layer_norm.cu).
//
// Layout: every tensor is row-major [rows, cols] and contiguous; weight/bias/dweight/dbias are
// [cols]; mean and rstd are fp32 [rows]. x, residual, weight, bias, dy, ds and the outputs share
// one storage type (DType); statistics and accumulation are fp32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "layernorm/layernorm_limits.h"

namespace gptk {

// y = (s - mean) * rstd * weight + bias with s = x, or s = residual + x (rounded to the storage
// type and written to s_out) when residual is not null. weight and bias may be null. Writes
// mean and rstd (fp32, [rows]). Needs layernorm::problem_error(cols, dtype) to be "".
cudaError_t layer_norm_forward(const void* x, const void* residual, const void* weight, const void* bias, void* y,
                               void* s_out, float* mean, float* rstd, int64_t rows, int64_t cols, float eps,
                               DType dtype, cudaStream_t stream);

// Bytes of scratch layer_norm_backward needs (fp32 partial sums of dweight/dbias, one row per
// block); 0 when neither parameter gradient is wanted.
size_t layer_norm_backward_workspace(int64_t rows, int64_t cols, DType dtype, bool param_grads);

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + ds, g = dy * weight (dy when weight is
// null), xhat = (x - mean) * rstd; ds (the gradient reaching s directly, for the fused residual)
// may be null. dweight = sum over rows of dy * xhat (skipped when null), dbias = sum of dy
// (skipped when null): fp32 partial sums per block, then a fixed-order reduction (deterministic).
cudaError_t layer_norm_backward(const void* dy, const void* x, const void* weight, const float* mean,
                                const float* rstd, const void* ds, void* dx, void* dweight, void* dbias, int64_t rows,
                                int64_t cols, DType dtype, void* workspace, cudaStream_t stream);

}  // namespace gptk
