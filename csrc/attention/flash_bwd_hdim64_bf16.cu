// flash_bwd_hdim64_bf16.cu: one instantiation of the backward kernel (flash_bwd_kernel.cuh), in its
// own file so that builds compile the instantiations in parallel.
#include "attention/flash_bwd_kernel.cuh"

namespace gptk {
namespace attn {
template cudaError_t run_flash_bwd_sm80<__nv_bfloat16, 64>(const FlashBwdParams&, cudaStream_t);
}  // namespace attn
}  // namespace gptk
