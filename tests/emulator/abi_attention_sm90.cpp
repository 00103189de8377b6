// abi_attention_sm90.cpp: test-only C ABI over the Hopper attention forward and backward (csrc/attention/sm90/),
// for tests/test_emulated_attention_sm90{,_bwd}.py (ctypes). Built only into the emulator library.
// Tensors come as pointers plus (batch, head, row) element strides, in SDPA's (B, H, S, D) order.
#include "attention/sm90/flash_bwd_sm90.h"
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

// ---- backward ----------------------------------------------------------------------------------------
// t: q, k, v, o, dout, dq, dk, dv; strides: 3 per tensor; dims: batch, hq, hkv, sq, sk, d, causal, dtype,
// deterministic, head_splits, dq_splits; ws: lse_log2, delta, dq_accum (zeroed), dk_accum, dv_accum (the
// workspace flash_bwd carves; the last two only with head_splits > 1).
namespace {
gptk::attn::FlashBwdParams bwd_params(void* const* t, const int64_t* strides, const float* lse, const float* dlse,
                                      const int* dims, float scale, float* const* ws) {
  using gptk_emu_abi::ref;
  gptk::attn::FlashBwdParams p;
  p.impl = gptk::attn::Impl::kSm90;
  p.q = ref(t[0], strides + 0), p.k = ref(t[1], strides + 3), p.v = ref(t[2], strides + 6);
  p.o = ref(t[3], strides + 9), p.dout = ref(t[4], strides + 12), p.dq = ref(t[5], strides + 15);
  p.dk = ref(t[6], strides + 18), p.dv = ref(t[7], strides + 21);
  p.lse = lse;
  p.dlse = dlse;
  p.batch = dims[0], p.hq = dims[1], p.hkv = dims[2], p.sq = dims[3], p.sk = dims[4], p.d = dims[5];
  p.causal = dims[6] != 0;
  p.dtype = (gptk::DType)dims[7];
  p.deterministic = dims[8] != 0;
  p.head_splits = dims[9];
  p.dq_splits = dims[10];
  p.scale = scale;
  p.lse_log2 = ws[0], p.delta = ws[1], p.dq_accum = ws[2], p.dk_accum = ws[3], p.dv_accum = ws[4];
  return p;
}
}  // namespace

GPTK_EMU_EXPORT const char* emu_flash_bwd_sm90_unsupported(void* const* t, const int64_t* strides, const float* lse,
                                                           const float* dlse, const int* dims, float scale,
                                                           float* const* ws) {
  return gptk::attn::flash_bwd_sm90_unsupported(bwd_params(t, strides, lse, dlse, dims, scale, ws));
}

// flash_bwd's sequence (flash_api.cu) with the sm90 main kernel: preprocess, kernel, convert dK/dV, dQ.
GPTK_EMU_EXPORT int emu_flash_bwd_sm90(void* const* t, const int64_t* strides, const float* lse, const float* dlse,
                                       const int* dims, float scale, float* const* ws) {
  const gptk::attn::FlashBwdParams p = bwd_params(t, strides, lse, dlse, dims, scale, ws);
  cudaError_t err = gptk::attn::flash_bwd_preprocess(p, nullptr);
  if (err == cudaSuccess) err = gptk::attn::run_flash_bwd_sm90(p, nullptr);
  if (err == cudaSuccess && p.head_splits > 1) err = gptk::attn::flash_bwd_convert_dkv(p, nullptr);
  if (err == cudaSuccess) err = gptk::attn::flash_bwd_convert_dq(p, nullptr);
  return (int)err;
}
