// abi_attention.cpp: test-only C ABI over the attention launchers (flash.h), for the emulated kernel
// tests (tests/test_emulated_attention.py loads it with ctypes). Built only into the emulator library.
// Tensors come as pointers plus (batch, head, row) element strides, in SDPA's (B, H, S, D) order.
#include "attention/flash.h"

#define GPTK_EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace {
using gptk::attn::TensorRef;

TensorRef ref(void* p, const int64_t* s) {
  TensorRef r;
  r.ptr = p;
  r.batch_stride = s[0], r.head_stride = s[1], r.row_stride = s[2];
  return r;
}

// dims: batch, hq, hkv, sq, sk, d, causal, dtype
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
  return p;
}

// t: q, k, v, o, dout, dq, dk, dv; dims as above plus deterministic
gptk::attn::FlashBwdParams bwd_params(void* const* t, const int64_t* strides, const float* lse, const float* dlse,
                                      const int* dims, float scale) {
  gptk::attn::FlashBwdParams p;
  p.q = ref(t[0], strides + 0), p.k = ref(t[1], strides + 3), p.v = ref(t[2], strides + 6);
  p.o = ref(t[3], strides + 9), p.dout = ref(t[4], strides + 12), p.dq = ref(t[5], strides + 15);
  p.dk = ref(t[6], strides + 18), p.dv = ref(t[7], strides + 21);
  p.lse = lse;
  p.dlse = dlse;
  p.batch = dims[0], p.hq = dims[1], p.hkv = dims[2], p.sq = dims[3], p.sk = dims[4], p.d = dims[5];
  p.causal = dims[6] != 0;
  p.dtype = (gptk::DType)dims[7];
  p.deterministic = dims[8] != 0;
  p.scale = scale;
  return p;
}
}  // namespace

GPTK_EMU_EXPORT int emu_flash_fwd(void* const* t, const int64_t* strides, float* lse, const int* kv_lens,
                                  const int* dims, float scale) {
  return (int)gptk::attn::flash_fwd(fwd_params(t, strides, lse, kv_lens, dims, scale), nullptr);
}

GPTK_EMU_EXPORT int emu_flash_decode_num_splits(void* const* t, const int64_t* strides, float* lse,
                                                const int* kv_lens, const int* dims, float scale, int num_sms) {
  return gptk::attn::flash_decode_num_splits(fwd_params(t, strides, lse, kv_lens, dims, scale), num_sms);
}

GPTK_EMU_EXPORT int64_t emu_flash_decode_workspace(void* const* t, const int64_t* strides, float* lse,
                                                   const int* kv_lens, const int* dims, float scale, int splits) {
  return (int64_t)gptk::attn::flash_decode_workspace_bytes(fwd_params(t, strides, lse, kv_lens, dims, scale), splits);
}

GPTK_EMU_EXPORT int emu_flash_decode(void* const* t, const int64_t* strides, float* lse, const int* kv_lens,
                                     const int* dims, float scale, void* workspace, int splits) {
  return (int)gptk::attn::flash_decode(fwd_params(t, strides, lse, kv_lens, dims, scale), workspace, splits, nullptr);
}

GPTK_EMU_EXPORT int emu_flash_bwd_dq_splits(void* const* t, const int64_t* strides, const float* lse,
                                            const float* dlse, const int* dims, float scale, int num_sms) {
  return gptk::attn::flash_bwd_dq_splits(bwd_params(t, strides, lse, dlse, dims, scale), num_sms);
}

GPTK_EMU_EXPORT int64_t emu_flash_bwd_workspace(void* const* t, const int64_t* strides, const float* lse,
                                                const float* dlse, const int* dims, float scale, int splits) {
  return (int64_t)gptk::attn::flash_bwd_workspace_bytes(bwd_params(t, strides, lse, dlse, dims, scale), splits);
}

GPTK_EMU_EXPORT int emu_flash_bwd(void* const* t, const int64_t* strides, const float* lse, const float* dlse,
                                  const int* dims, float scale, void* workspace, int splits) {
  return (int)gptk::attn::flash_bwd(bwd_params(t, strides, lse, dlse, dims, scale), workspace, splits, nullptr);
}
