// lt_torch.h: what a binding needs to run the cuBLASLt GEMMs (lt_gemm.h) on torch tensors: torch's
// handle, workspace and stream, errors that name the GEMM, and the fallback for fused epilogues.
//
// Fallback. cuBLASLt may have no algorithm for a fused epilogue on some problem (a shape, alignment,
// dtype or GPU): it reports CUBLAS_STATUS_NOT_SUPPORTED (lt_gemm.cpp also returns it when the
// heuristic finds nothing). lt_try_fused() then warns once per epilogue, naming it, and returns
// false; the caller runs the plain GEMM and applies the epilogue itself (bias add, column sums,
// or our bias + activation kernels). GPTKERNELS_LT_FALLBACK=1 takes that path for every fused
// epilogue, so that it can be tested on any GPU. Other failures raise, naming the GEMM.
#pragma once

#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/sum.h>

#include <cstdlib>
#include <mutex>
#include <set>

#include "binding.h"
#include "gemm/lt_gemm.h"

namespace gptk {

inline LtContext lt_context(const at::Tensor& x) {
  LtContext c;
  c.handle = at::cuda::getCurrentCUDABlasLtHandle();
  c.workspace = at::cuda::getCUDABlasLtWorkspace();
  c.workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  c.stream = current_stream(x);
  c.device = x.device().index();
  return c;
}

inline void check_lt(cublasStatus_t s, const char* what, cublasLtEpilogue_t epi, int64_t n, int64_t in, int64_t out) {
  TORCH_CHECK(s == CUBLAS_STATUS_SUCCESS, "gptkernels: cuBLASLt ", what, " (epilogue ", lt_epilogue_name(epi),
              ", tokens=", n, ", in=", in, ", out=", out, ") failed: ", lt_status_string(s));
}

inline bool lt_fallback_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("GPTKERNELS_LT_FALLBACK");
    return v != nullptr && v[0] == '1';
  }();
  return forced;
}

inline void lt_warn_fallback(cublasLtEpilogue_t epi, const char* why) {
  static std::mutex mu;
  static std::set<int> warned;
  std::lock_guard<std::mutex> lock(mu);
  if (warned.insert(static_cast<int>(epi)).second)
    TORCH_WARN("gptkernels: cuBLASLt ", why, " for the fused epilogue ", lt_epilogue_name(epi),
               "; running a plain GEMM and applying the epilogue with separate kernels (slower, same result). "
               "Warned once per epilogue.");
}

// Runs `call` (a cuBLASLt GEMM with the fused epilogue `epi`). true: done. false: the caller must run
// the unfused steps (cuBLASLt has no algorithm for the epilogue, or GPTKERNELS_LT_FALLBACK=1).
template <typename Call>
bool lt_try_fused(cublasLtEpilogue_t epi, const char* what, int64_t n, int64_t in, int64_t out, Call&& call) {
  const bool fused = epi != CUBLASLT_EPILOGUE_DEFAULT;
  if (fused && lt_fallback_forced()) {
    lt_warn_fallback(epi, "fallback forced by GPTKERNELS_LT_FALLBACK=1");
    return false;
  }
  const cublasStatus_t s = call();
  if (fused && lt_should_fall_back(s)) {
    lt_warn_fallback(epi, "has no algorithm");
    return false;
  }
  check_lt(s, what, epi, n, in, out);
  return true;
}

// dW = dy^T x with, when db is defined, db = column sums of dy in one GEMM (BGRADB); unfused: the
// plain GEMM and a sum over rows of dy (fp32 accumulation). dy_view: dy as a [rows, out] tensor.
inline void lt_wgrad_bias(const LtContext& ctx, DType dt, DType dw_dt, const at::Tensor& dy_view, int64_t lddy,
                          const void* x, void* dw, int64_t n, int64_t in, int64_t out, bool accumulate,
                          at::Tensor db, const char* what) {
  void* bg = db.defined() ? db.data_ptr() : nullptr;
  const cublasLtEpilogue_t epi = bg ? CUBLASLT_EPILOGUE_BGRADB : CUBLASLT_EPILOGUE_DEFAULT;
  if (lt_try_fused(epi, what, n, in, out, [&] {
        return lt_linear_wgrad(ctx, dt, dw_dt, dy_view.data_ptr(), lddy, x, dw, n, in, out, accumulate, bg);
      }))
    return;
  check_lt(lt_linear_wgrad(ctx, dt, dw_dt, dy_view.data_ptr(), lddy, x, dw, n, in, out, accumulate, nullptr), what,
           CUBLASLT_EPILOGUE_DEFAULT, n, in, out);
  if (db.defined()) at::sum_out(db, dy_view, {0}, false, db.scalar_type());
}

}  // namespace gptk
