// flash_bwd_sm90_api.cu: what the sm90 backward refuses, and the dispatch to its instantiations by
// dtype and head dim (host code only).
#include "attention/sm90/flash_bwd_sm90.h"
#include "attention/sm90/flash_fwd_sm90.h"
#include "attention/sm90/tma.cuh"
#include "static_switch.h"

namespace gptk {
namespace attn {

const char* flash_bwd_sm90_unsupported(const FlashBwdParams& p) {
  // q, k, v and dout are read by TMA: the forward's rule (16-byte aligned bases and strides). out is read
  // only by flash_bwd_preprocess, dq / dk / dv written with ordinary stores, as on sm_80.
  if (p.sq == 0 || p.sk == 0) return "empty sequence (a tensor map needs every dimension >= 1)";
  FlashFwdParams f;
  f.q = p.q, f.k = p.k, f.v = p.v, f.o = p.dout;
  return flash_fwd_sm90_unsupported(f);
}

cudaError_t run_flash_bwd_sm90(const FlashBwdParams& p, cudaStream_t stream) {
  if (!problem_error(p).empty()) return cudaErrorInvalidValue;
  if (flash_bwd_sm90_unsupported(p) != nullptr) return cudaErrorNotSupported;
  if (p.batch == 0) return cudaSuccess;
  return ATTN_DTYPE_SWITCH(p.dtype, T, [&] {
    return HEADDIM_SWITCH(p.d, kHeadDim, [&] { return run_flash_bwd_sm90_<T, kHeadDim>(p, stream); });
  });
}

}  // namespace attn
}  // namespace gptk
