// abi_layernorm.cpp: test-only C ABI over the LayerNorm launchers, for the emulated kernel tests
// (tests/test_emulated_layernorm.py loads it with ctypes). Built only into the emulator library.
#include "layernorm/layer_norm.h"

#include "abi.h"

GPTK_EMU_EXPORT int emu_layer_norm_forward(const void* x, const void* residual, const void* weight, const void* bias,
                                           void* y, void* s_out, float* mean, float* rstd, int64_t rows, int64_t cols,
                                           float eps, int dtype) {
  return (int)gptk::layer_norm_forward(x, residual, weight, bias, y, s_out, mean, rstd, rows, cols, eps,
                                       (gptk::DType)dtype, nullptr);
}

GPTK_EMU_EXPORT int64_t emu_layer_norm_backward_workspace(int64_t rows, int64_t cols, int dtype, int param_grads) {
  return (int64_t)gptk::layer_norm_backward_workspace(rows, cols, (gptk::DType)dtype, param_grads != 0);
}

GPTK_EMU_EXPORT int emu_layer_norm_backward(const void* dy, const void* x, const void* weight, const float* mean,
                                            const float* rstd, const void* ds, void* dx, void* dweight, void* dbias,
                                            int64_t rows, int64_t cols, int dtype, void* workspace) {
  return (int)gptk::layer_norm_backward(dy, x, weight, mean, rstd, ds, dx, dweight, dbias, rows, cols,
                                        (gptk::DType)dtype, workspace, nullptr);
}
