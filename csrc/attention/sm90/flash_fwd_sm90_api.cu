// flash_fwd_sm90_api.cu: what the sm90 forward refuses, and the dispatch to its instantiations by
// dtype and head dim (host code only; the lists are attention_limits.h's, as for sm_80).
#include <cstdint>

#include "attention/sm90/flash_fwd_sm90.h"
#include "attention/sm90/tma.cuh"
#include "static_switch.h"

namespace gptk {
namespace attn {
namespace {

// TMA reads a tensor through a map whose base must be 16-byte aligned and whose byte strides must be
// multiples of 16 below 2^40 (cuda.h, cuTensorMapEncodeTiled). A stride of 0 marks a dimension of
// size 1 (the map then gets a packed stride of its own).
bool tma_friendly(const TensorRef& t) {
  if (reinterpret_cast<uintptr_t>(t.ptr) % 16 != 0) return false;
  for (int64_t s : {t.batch_stride, t.head_stride, t.row_stride}) {
    if (s < 0 || s % 8 != 0 || s >= (int64_t{1} << 39)) return false;  // 8 elements = 16 bytes
  }
  return true;
}

}  // namespace

const char* flash_fwd_sm90_unsupported(const FlashFwdParams& p) {
  if (!tma_friendly(p.q) || !tma_friendly(p.k) || !tma_friendly(p.v) || !tma_friendly(p.o)) {
    return "tensor layout (TMA needs 16-byte aligned bases and strides)";
  }
  if (sm90::encode_tiled_fn() == nullptr) return "driver (no cuTensorMapEncodeTiled)";
  return nullptr;
}

cudaError_t run_flash_fwd_sm90(const FlashFwdParams& p, cudaStream_t stream) {
  if (!problem_error(p).empty()) return cudaErrorInvalidValue;
  if (flash_fwd_sm90_unsupported(p) != nullptr) return cudaErrorNotSupported;
  if (p.batch == 0 || p.sq == 0) return cudaSuccess;
  return ATTN_DTYPE_SWITCH(p.dtype, T, [&] {
    return HEADDIM_SWITCH(p.d, kHeadDim, [&] { return run_flash_fwd_sm90_<T, kHeadDim>(p, stream); });
  });
}

}  // namespace attn
}  // namespace gptk
