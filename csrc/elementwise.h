// elementwise.h: small general-purpose kernels the families share (plain CUDA, see elementwise.cu).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace gptk {

// dst[i] += src[i] (fp32), e.g. to accumulate per-chunk bias gradients.
cudaError_t add_f32(float* dst, const float* src, int64_t n, cudaStream_t stream);

}  // namespace gptk
