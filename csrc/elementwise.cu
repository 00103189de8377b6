// elementwise.cu: small general-purpose kernels (elementwise.h). Grid-stride loops, 64-bit indices.
#include "common.h"
#include "elementwise.h"

namespace gptk {
namespace {

__global__ void add_f32_kernel(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] += src[i];
}

}  // namespace

cudaError_t add_f32(float* dst, const float* src, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(n, 256), cap = (int64_t)num_sms() * 8;
  add_f32_kernel<<<(unsigned)(blocks < cap ? blocks : cap), 256, 0, stream>>>(dst, src, n);
  return cudaGetLastError();
}

}  // namespace gptk
