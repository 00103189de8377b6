// abi_attention_sm90.cpp: test-only C ABI over the Hopper attention forward (csrc/attention/sm90/),
// for tests/test_emulated_attention_sm90.py (ctypes). Built only into the emulator library.
// Tensors come as pointers plus (batch, head, row) element strides, in SDPA's (B, H, S, D) order.
#include "attention/sm90/flash_fwd_sm90.h"

#define GPTK_EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace {
using gptk::attn::TensorRef;

TensorRef ref(void* p, const int64_t* s) {
  TensorRef r;
  r.ptr = p;
  r.batch_stride = s[0], r.head_stride = s[1], r.row_stride = s[2];
  return r;
}

// t: q, k, v, o; dims: batch, hq, hkv, sq, sk, d, causal, dtype
gptk::attn::FlashFwdParams fwd_params(void* const* t, const int64_t* strides, float* lse, const int* kv_lens,
                                      const int* dims, float scale) {
  gptk::attn::FlashFwdParams p;
  p.q = ref(t[0], strides + 0), p.k = ref(t[1], strides + 3), p.v = ref(t[2], strides + 6);
  p.o = ref(t[3], strides + 9);
  p.lse = lse;
  p.kv_lens = kv_lens;
  p.batch = dims[0], p.hq = dims[1], p.hkv = dims[2], p.sq = dims[3], p.sk = dims[4], p.d = dims[5];
  p.causal = dims[6] != 0;
  p.dtype = (gptk::DType)dims[7];
  p.scale = scale;
  p.impl = gptk::attn::Impl::kSm90;
  return p;
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
