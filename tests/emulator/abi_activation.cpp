// abi_activation.cpp: test-only C ABI over the bias_act launchers, for the emulated kernel tests
// (tests/test_emulated_activation.py loads it with ctypes). Built only into the emulator library.
#include "activation/bias_act.h"

#include "abi.h"

GPTK_EMU_EXPORT int emu_bias_act_forward(const void* x, const void* bias, void* y, int64_t rows, int64_t cols,
                                         int dtype, int act) {
  return (int)gptk::bias_act_forward(x, bias, y, rows, cols, (gptk::DType)dtype, (gptk::Activation)act, nullptr);
}

GPTK_EMU_EXPORT int64_t emu_bias_act_backward_workspace(int64_t rows, int64_t cols) {
  return (int64_t)gptk::bias_act_backward_workspace(rows, cols);
}

GPTK_EMU_EXPORT int emu_bias_act_backward(const void* dy, const void* x, const void* bias, void* dx, void* dbias,
                                          int64_t rows, int64_t cols, int dtype, int act, void* workspace) {
  return (int)gptk::bias_act_backward(dy, x, bias, dx, dbias, rows, cols, (gptk::DType)dtype, (gptk::Activation)act,
                                      workspace, nullptr);
}
