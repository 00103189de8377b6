// common.h: host-side helpers shared by kernels and bindings (no torch, no device code).
//
// - DType: the storage type of a tensor, chosen at run time by the binding and turned
//   into a template argument by DTYPE_SWITCH (static_switch.h).
// - Launchers return cudaError_t (the launch status); the binding turns it into an error.
// Device helpers (conversions, 16-byte packs, reductions) live in device.cuh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace gptk {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- launch helpers ------------------------------------------------------------------------
inline int num_sms() {
  int dev = 0, n = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  return n > 0 ? n : 1;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace gptk
