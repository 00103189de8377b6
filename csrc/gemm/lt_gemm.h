// lt_gemm.h: row-major linear-layer GEMMs on cuBLASLt, with its fused epilogues (plain C++,
// no torch: the handle, workspace and stream are passed in; see lt_gemm.cpp for the design).
//
// Every matrix is row-major with a leading dimension (elements between rows) >= its columns.
// Shapes follow torch.nn.Linear: x[n, in], W[out, in], y[n, out].
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

namespace gptk {

struct LtContext {
  cublasLtHandle_t handle;
  void* workspace;
  size_t workspace_size;
  cudaStream_t stream;
  int device;
};

// What the epilogue of one GEMM does, in row-major terms (F = features of the GEMM's output).
struct LtEpilogue {
  cublasLtEpilogue_t op = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // *BIAS: [F] input, same dtype as the output
  void* bias_grad = nullptr;   // *BGRAD / BGRADB: [F] output, same dtype as the output
  void* aux = nullptr;         // GELU_AUX: pre-activation [rows, aux_ld]; RELU_AUX: bit mask
  int64_t aux_ld = 0;          // elements (GELU: multiple of 8) or bits (ReLU: multiple of 128)
};

// y[n, out] (ld ldy) = x[n, in] @ W[out, in]^T, then the epilogue on y (bias over `out`; aux shaped
// like y: the pre-activation for GELU_AUX*, a bit mask for RELU_AUX*).
cublasStatus_t lt_linear_forward(const LtContext& ctx, DType dtype, const void* x, const void* w, void* y,
                                 int64_t n, int64_t in, int64_t out, int64_t ldy, const LtEpilogue& epi);

// dx[n, in] = dy[n, out] (ld lddy) @ W[out, in], then the epilogue on dx: DGELU / DRELU multiply
// by the activation derivative read from aux (shaped like dx), *_BGRAD also writes
// bias_grad[in] = sum over the n rows of the result.
cublasStatus_t lt_linear_dgrad(const LtContext& ctx, DType dtype, const void* dy, int64_t lddy, const void* w,
                               void* dx, int64_t n, int64_t in, int64_t out, const LtEpilogue& epi);

// dW[out, in] (dtype dw_dtype: the input dtype, or fp32 for an accumulator) = dy[n, out]^T @ x[n, in]
// (+ dW when accumulate). bias_grad, when not null: [out] = sum over rows of dy (BGRADB), in dw_dtype.
cublasStatus_t lt_linear_wgrad(const LtContext& ctx, DType dtype, DType dw_dtype, const void* dy, int64_t lddy,
                               const void* x, void* dw, int64_t n, int64_t in, int64_t out, bool accumulate,
                               void* bias_grad);

// A fused epilogue's GEMM failed in a way that a plain GEMM plus separate epilogue kernels can
// replace: cuBLASLt has no algorithm for it (NOT_SUPPORTED, also returned when the heuristic finds
// none). Every other status is an error. (lt_torch.h runs the fallback.)
inline bool lt_should_fall_back(cublasStatus_t s) { return s == CUBLAS_STATUS_NOT_SUPPORTED; }

const char* lt_status_string(cublasStatus_t s);
const char* lt_epilogue_name(cublasLtEpilogue_t e);

}  // namespace gptk
