// flash_fwd_sm90_hdim64_fp16.cu: one instantiation of the sm_90a forward (flash_fwd_sm90_kernel.cuh),
// in its own file so that builds compile the instantiations in parallel.
#include "attention/sm90/flash_fwd_sm90_kernel.cuh"

namespace gptk {
namespace attn {
template cudaError_t run_flash_fwd_sm90_<__half, 64>(const FlashFwdParams&, cudaStream_t);
}  // namespace attn
}  // namespace gptk
