// binding.h: what every *_binding.cpp needs to turn torch tensors into kernel arguments.
//
// Only binding files include torch headers, and only the light ones (torch/library.h and
// c10's CUDA stream), never torch/extension.h: a binding compiles in seconds, not a minute.
// Schemas are declared with TORCH_LIBRARY_FRAGMENT(gptkernels, m) in each family's binding;
// CUDA implementations with TORCH_LIBRARY_IMPL(gptkernels, CUDA, m). Fake (meta) kernels,
// CPU reference implementations and autograd are registered from Python (gptkernels/ops).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "common.h"

namespace gptk {

inline DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, ": expected a float32, float16 or bfloat16 tensor, got ", t.scalar_type());
  }
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type(), "; they must match");
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (strides ", t.strides(), ")");
}

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Turn a launcher's status into a torch error naming the kernel.
inline void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "gptkernels: ", kernel, " failed to launch: ", cudaGetErrorString(err));
}

}  // namespace gptk
