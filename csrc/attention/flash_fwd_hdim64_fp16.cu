// flash_fwd_hdim64_fp16.cu: one instantiation of the forward kernel (flash_fwd_kernel.cuh), in its
// own file so that builds compile the instantiations in parallel.
#include "attention/flash_fwd_kernel.cuh"

namespace gptk {
namespace attn {
template cudaError_t run_flash_fwd_sm80<__half, 64>(const FlashFwdParams&, cudaStream_t);
}  // namespace attn
}  // namespace gptk
