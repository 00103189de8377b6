// flash_bwd_sm90.h: the Hopper (sm_90a) attention backward -- refusal, launcher declarations (plain
// C++; no torch). The design is in flash_bwd_sm90_kernel.cuh.
//
// Same op and semantics as the sm_80 backward (flash.h flash_bwd): it runs between the same
// flash_bwd_preprocess (lse_log2, delta) and flash_bwd_convert_dq / flash_bwd_convert_dkv, on the
// same workspace (dq_accum slices, dq_splits in deterministic mode; dk_accum / dv_accum with
// head_splits > 1), so flash_bwd only switches the main kernel. Coverage: what problem_error allows
// (dtypes, head dims, causal bottom-right, Sq != Sk, GQA / MQA, both layouts, dlse).
//
// Selection: the opt-in sm90 row of the table in flash_api.cu (GPTKERNELS_ATTENTION_IMPL=sm90), until a
// GPU run verifies it; calls flash_bwd_sm90_unsupported refuses run the sm_80 backward instead.
#pragma once

#include <cuda_runtime.h>

#include "attention/flash.h"

namespace gptk {
namespace attn {

// For a call within problem_error's limits: nullptr when the sm90 backward handles `p`, else a short
// reason (q, k, v or dout in a layout TMA cannot read; a driver without cuTensorMapEncodeTiled).
const char* flash_bwd_sm90_unsupported(const FlashBwdParams& p);

// The main kernel only (params with the workspace pointers, dq_splits and head_splits set, as
// flash_bwd carves them; preprocess already run): cudaErrorInvalidValue when problem_error(p) is not
// empty, cudaErrorNotSupported (nothing launched) when flash_bwd_sm90_unsupported(p) != nullptr.
cudaError_t run_flash_bwd_sm90(const FlashBwdParams& p, cudaStream_t stream);

// Per-instantiation launchers (flash_bwd_sm90_hdim{D}_{dtype}.cu, tools/gen_instantiations.py).
template <typename T, int kHeadDim>
cudaError_t run_flash_bwd_sm90_(const FlashBwdParams& p, cudaStream_t stream);

}  // namespace attn
}  // namespace gptk
