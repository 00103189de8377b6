// abi_attention_sm90.cpp: test-only C ABI over the Hopper attention forward (csrc/attention/sm90/),
// for tests/test_emulated_attention_sm90.py (ctypes). Built only into the emulator library.
// Tensors come as pointers plus (batch, head, row) element strides, in SDPA's (B, H, S, D) order.
#include "attention/sm90/flash_fwd_sm90.h"

#define GPTK_EMU_ABI_ATTENTION
#include "abi.h"

namespace {

gptk::attn::FlashFwdParams fwd_params(void* const* t, const int64_t* strides, float* lse, const int* kv_lens,
                                      const int* dims, float scale) {
  return gptk_emu_abi::fwd_params(t, strides, lse, kv_lens, dims, scale, gptk::attn::Impl::kSm90);
}
}  // namespace

// nullptr when the sm90 kernel takes the call, else its reason.
GPTK_EMU_EXPORT const char* emu_flash_fwd_sm90_unsupported(void* const* t, const int64_t* strides, float* lse,
                                                           const int* kv_lens, const int* dims, float scale) {
  return gptk::attn::flash_fwd_sm90_unsupported(fwd_params(t, strides, lse, kv_lens, dims, scale));
}

GPTK_EMU_EXPORT int emu_flash_fwd_sm90(void* const* t, const int64_t* strides, float* lse, const int* kv_lens,
                                       const int* dims, float scale) {
  return (int)gptk::attn::run_flash_fwd_sm90(fwd_params(t, strides, lse, kv_lens, dims, scale), nullptr);
}
