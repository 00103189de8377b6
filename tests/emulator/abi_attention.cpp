// abi_attention.cpp: test-only C ABI over the attention launchers (flash.h), for the emulated kernel
// tests (tests/test_emulated_attention.py loads it with ctypes). Built only into the emulator library.
// Tensors come as pointers plus (batch, head, row) element strides, in SDPA's (B, H, S, D) order.
#include "attention/flash.h"

#define GPTK_EMU_ABI_ATTENTION
#include "abi.h"

namespace {

using gptk_emu_abi::ref;

// The variant fields (window, softcap, varlen) every following call gets, set by emu_attn_set_variants
// (tests/test_emulated_attention_variants.py) and reset to none by emu_attn_set_variants(-1, -1, 0, ...).
// For varlen calls the tensors are (total, H, D) with batch stride 0 and dims[3] / dims[4] the maxima.
gptk::attn::VariantParams g_variants;

template <typename Params>
void with_variants(Params& p) {
  static_cast<gptk::attn::VariantParams&>(p) = g_variants;
  // as the binding does: value checks are problem_error's (the launchers refuse bad values)
  if (gptk::attn::problem_error(p).empty()) gptk::attn::canonical_variants(p);
}

// The implementation the binding would choose for `op` on the emulated device (select_impl from its
// compute capability: sm_90 by default, sm_80 per case).
gptk::attn::Impl impl_for(gptk::attn::AttnOp op) {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  return gptk::attn::select_impl(op, major * 10 + minor, nullptr);
}

// dims: batch, hq, hkv, sq, sk, d, causal, dtype
gptk::attn::FlashFwdParams fwd_params(void* const* t, const int64_t* strides, float* lse, const int* kv_lens,
                                      const int* dims, float scale, gptk::attn::AttnOp op) {
  gptk::attn::FlashFwdParams p = gptk_emu_abi::fwd_params(t, strides, lse, kv_lens, dims, scale, impl_for(op));
  with_variants(p);
  return p;
}

// t: q, k, v, o, dout, dq, dk, dv; dims as above plus deterministic, head_splits
gptk::attn::FlashBwdParams bwd_params(void* const* t, const int64_t* strides, const float* lse, const float* dlse,
                                      const int* dims, float scale) {
  gptk::attn::FlashBwdParams p;
  p.impl = impl_for(gptk::attn::AttnOp::kBwd);
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
  p.scale = scale;
  with_variants(p);
  return p;
}

}  // namespace

GPTK_EMU_EXPORT void emu_attn_set_variants(int window_left, int window_right, float softcap, const int* cu_seqlens_q,
                                           const int* cu_seqlens_k, int total_q, int total_k) {
  g_variants.window_left = window_left;
  g_variants.window_right = window_right;
  g_variants.softcap = softcap;
  g_variants.cu_seqlens_q = cu_seqlens_q;
  g_variants.cu_seqlens_k = cu_seqlens_k;
  g_variants.total_q = total_q;
  g_variants.total_k = total_k;
}

GPTK_EMU_EXPORT const char* emu_attn_limits_json() {
  static const std::string s = gptk::attn::limits_json();
  return s.c_str();
}

namespace {
constexpr gptk::attn::AttnOp kFwd = gptk::attn::AttnOp::kFwd, kDecode = gptk::attn::AttnOp::kDecode;
}  // namespace

GPTK_EMU_EXPORT int emu_flash_fwd(void* const* t, const int64_t* strides, float* lse, const int* kv_lens,
                                  const int* dims, float scale) {
  return (int)gptk::attn::flash_fwd(fwd_params(t, strides, lse, kv_lens, dims, scale, kFwd), nullptr);
}

GPTK_EMU_EXPORT int emu_flash_decode_num_splits(void* const* t, const int64_t* strides, float* lse,
                                                const int* kv_lens, const int* dims, float scale, int num_sms) {
  return gptk::attn::flash_decode_num_splits(fwd_params(t, strides, lse, kv_lens, dims, scale, kDecode), num_sms);
}

GPTK_EMU_EXPORT int64_t emu_flash_decode_workspace(void* const* t, const int64_t* strides, float* lse,
                                                   const int* kv_lens, const int* dims, float scale, int splits) {
  const gptk::attn::FlashFwdParams p = fwd_params(t, strides, lse, kv_lens, dims, scale, kDecode);
  return (int64_t)gptk::attn::flash_decode_workspace_bytes(p, splits);
}

GPTK_EMU_EXPORT int emu_flash_decode(void* const* t, const int64_t* strides, float* lse, const int* kv_lens,
                                     const int* dims, float scale, void* workspace, int splits) {
  const gptk::attn::FlashFwdParams p = fwd_params(t, strides, lse, kv_lens, dims, scale, kDecode);
  return (int)gptk::attn::flash_decode(p, workspace, splits, nullptr);
}

GPTK_EMU_EXPORT int emu_flash_bwd_head_splits(void* const* t, const int64_t* strides, const float* lse,
                                              const float* dlse, const int* dims, float scale, int num_sms) {
  return gptk::attn::flash_bwd_head_splits(bwd_params(t, strides, lse, dlse, dims, scale), num_sms);
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
