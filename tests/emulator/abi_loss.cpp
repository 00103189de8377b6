// abi_loss.cpp: test-only C ABI over the fused softmax cross-entropy launchers, for the
// emulated kernel tests (tests/test_emulated_loss.py loads it with ctypes). Built only into the
// emulator library.
#include "elementwise.h"
#include "loss/cross_entropy.h"

#include "abi.h"

GPTK_EMU_EXPORT int emu_ce_prepare(const void* target, int target_int64, int64_t rows, int64_t vocab,
                                   int64_t ignore_index, int64_t* status) {
  return (int)gptk::cross_entropy_prepare(target, target_int64 != 0, rows, vocab, ignore_index, status, nullptr);
}

GPTK_EMU_EXPORT int emu_ce_rows(const void* logits, int64_t ld, void* grad, int64_t grad_ld, const void* target,
                                int target_int64, float* losses, const int64_t* status, int64_t rows, int64_t vocab,
                                int64_t ignore_index, int reduction, int dtype) {
  gptk::CrossEntropyRows p;
  p.logits = logits;
  p.ld = ld;
  p.grad = grad;
  p.grad_ld = grad_ld;
  p.target = target;
  p.target_int64 = target_int64 != 0;
  p.losses = losses;
  p.status = status;
  p.rows = rows;
  p.vocab = vocab;
  p.ignore_index = ignore_index;
  p.reduction = (gptk::CeReduction)reduction;
  p.dtype = (gptk::DType)dtype;
  return (int)gptk::cross_entropy_rows(p, nullptr);
}

GPTK_EMU_EXPORT int emu_ce_reduce(const float* losses, int64_t rows, const int64_t* status, int mean, float* out) {
  return (int)gptk::cross_entropy_reduce(losses, rows, status, mean != 0, out, nullptr);
}

GPTK_EMU_EXPORT int emu_ce_scale_rows(void* g, int64_t ld, int64_t rows, int64_t cols, const float* scale,
                                      int per_row, int dtype) {
  return (int)gptk::scale_rows(g, ld, rows, cols, scale, per_row != 0, (gptk::DType)dtype, nullptr);
}

GPTK_EMU_EXPORT int emu_ce_add_f32(float* dst, const float* src, int64_t n) {
  return (int)gptk::add_f32(dst, src, n, nullptr);
}
