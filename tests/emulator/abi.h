// abi.h: what the test-only C ABIs (abi_<family>.cpp) share: the export macro, and for the attention
// ABIs a TensorRef from a pointer plus (batch, head, row) element strides and the forward parameters
// packed from the flat arrays the tests pass through ctypes.
#pragma once

#define GPTK_EMU_EXPORT extern "C" __attribute__((visibility("default")))

#ifdef GPTK_EMU_ABI_ATTENTION
#include "attention/flash.h"

namespace gptk_emu_abi {

inline gptk::attn::TensorRef ref(void* p, const int64_t* s) {
  gptk::attn::TensorRef r;
  r.ptr = p;
  r.batch_stride = s[0], r.head_stride = s[1], r.row_stride = s[2];
  return r;
}

// t: q, k, v, o; strides: 3 per tensor; dims: batch, hq, hkv, sq, sk, d, causal, dtype
inline gptk::attn::FlashFwdParams fwd_params(void* const* t, const int64_t* strides, float* lse, const int* kv_lens,
                                             const int* dims, float scale, gptk::attn::Impl impl) {
  gptk::attn::FlashFwdParams p;
  p.impl = impl;
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

}  // namespace gptk_emu_abi
#endif
