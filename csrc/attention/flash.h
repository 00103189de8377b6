// flash.h: parameters and launchers of the attention kernels (plain C++, no torch, no device code).
//
// Every tensor is described in SDPA's logical (B, H, S, D) order by a pointer plus three element
// strides (batch, head, row); the last dimension must be contiguous. So (B, S, H, D) tensors, or
// q/k/v viewed out of one fused QKV projection, are read in place without a transpose copy.
//
// Semantics (gptkernels/ops/attention.py is the reference):
// - out = softmax(q k^T * scale + mask) v, lse = log-sum-exp of each row of q k^T * scale (fp32,
//   natural log, [B, Hq, Sq] contiguous).
// - causal is aligned to the bottom-right: key j is visible to query i iff j <= i + (Sk_b - Sq),
//   where Sk_b = kv_lens[b] when kv_lens is given (clamped to [0, Sk]) and Sk otherwise.
//   kv_lens also hides keys j >= Sk_b (never read from memory: a KV cache past its fill may hold
//   anything). A row that sees no key gets out = 0 and lse = -inf.
// - grouped-query attention: query head h reads K/V head h / (Hq / Hkv).
// - head_dim d: any multiple of 8 up to 128, run by the kernel compiled for 64 or 128 with the
//   columns past d zero-filled in shared memory (they add nothing to q k^T and produce nothing).
//
// Entry points (flash_api.cu) pick the kernel by dtype, head dim and architecture: the mma.sync
// path (flash_fwd_kernel.cuh, flash_bwd_kernel.cuh) on every architecture >= sm_80, and for the
// forward on compute capability 9.0 the Hopper path (sm90/: wgmma + TMA + warp specialisation,
// sharing mask.cuh / softmax.cuh) when FlashFwdParams::impl selects it (opt-in until verified on
// a GPU, see sm90/flash_fwd_sm90.h).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common.h"

namespace gptk {
namespace attn {

struct TensorRef {
  void* ptr = nullptr;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0;  // in elements
};

// Which forward kernel family to run. kAuto: the sm_80 kernel, or the sm90 kernel on compute
// capability 9.0 once it is verified (kSm90Verified). kSm90: the sm90 kernel where it can run
// (device 9.0, extension built for sm_90a, a call it supports), else the sm_80 kernel.
enum class AttnImpl : int { kAuto = 0, kSm80 = 1, kSm90 = 2 };

struct FlashFwdParams {
  TensorRef q, k, v, o;
  float* lse = nullptr;            // [B, Hq, Sq] fp32 contiguous
  const int* kv_lens = nullptr;    // [B] int32 or nullptr
  int batch = 0, hq = 0, hkv = 0, sq = 0, sk = 0, d = 0;
  float scale = 0.f;               // softmax scale (> 0)
  bool causal = false;
  DType dtype = DType::kBFloat16;
  AttnImpl impl = AttnImpl::kAuto;  // forward only (flash_fwd); the decode and backward kernels ignore it
  // split-KV decode only: fp32 partial results (see flash_decode.cu); set by the launcher
  float* o_accum = nullptr;        // [splits, B, Hq, Sq, d]
  float* lse_accum = nullptr;      // [splits, B, Hq, Sq]
  int num_splits = 1;
};

struct FlashBwdParams {
  TensorRef q, k, v, o, dout, dq, dk, dv;
  const float* lse = nullptr;      // [B, Hq, Sq] fp32 contiguous (from the forward)
  const float* dlse = nullptr;     // optional gradient of lse, [B, Hq, Sq] fp32 contiguous
  int batch = 0, hq = 0, hkv = 0, sq = 0, sk = 0, d = 0;
  float scale = 0.f;
  bool causal = false;
  bool deterministic = false;
  DType dtype = DType::kBFloat16;
  // workspace (flash_bwd_workspace_bytes), carved by the launcher:
  float* lse_log2 = nullptr;       // [B, Hq, Sq_pad]: lse * log2(e), +inf for empty/padded rows
  float* delta = nullptr;          // [B, Hq, Sq_pad]: rowsum(dO * O) - dlse
  float* dq_accum = nullptr;       // [splits, B, Hq, Sq, d] fp32
  int dq_splits = 1;
};

// Forward (out, lse). Handles every Sq; for small Sq (decoding) flash_decode is faster.
cudaError_t flash_fwd(FlashFwdParams params, cudaStream_t stream);

// The forward kernel family flash_fwd runs for `impl` on the current device for a call the sm90
// kernel supports ("sm80" or "sm90"), and whether this build holds the sm90 kernel (sm_90a).
const char* flash_fwd_active_impl(AttnImpl impl);
bool flash_fwd_sm90_built();

// Split-KV decode (flash-decoding): for small Sq over a long cache. Needs a workspace of
// flash_decode_workspace_bytes(params) bytes (0 when it runs unsplit).
int flash_decode_num_splits(const FlashFwdParams& params, int num_sms);
size_t flash_decode_workspace_bytes(const FlashFwdParams& params, int num_splits);
cudaError_t flash_decode(FlashFwdParams params, void* workspace, int num_splits, cudaStream_t stream);

// Backward: dq, dk, dv (dk/dv summed over the query heads sharing a K/V head). Non-deterministic by
// default (fp32 atomics into dq); with deterministic=true every dq element is accumulated by one
// thread in a fixed order into one of `dq_splits` slices that are then summed in order.
int flash_bwd_dq_splits(const FlashBwdParams& params, int num_sms);
size_t flash_bwd_workspace_bytes(const FlashBwdParams& params, int dq_splits);
cudaError_t flash_bwd(FlashBwdParams params, void* workspace, int dq_splits, cudaStream_t stream);

// ---- per-instantiation launchers (one .cu file each; see flash_api.cu for the dispatch) ------
template <typename T, int kHeadDim>
cudaError_t run_flash_fwd_sm80(const FlashFwdParams& params, cudaStream_t stream);
template <typename T, int kHeadDim>
cudaError_t run_flash_bwd_sm80(const FlashBwdParams& params, cudaStream_t stream);

// Backward helpers (flash_bwd_prep.cu), run by flash_bwd around the main kernel.
cudaError_t flash_bwd_preprocess(const FlashBwdParams& params, cudaStream_t stream);
cudaError_t flash_bwd_convert_dq(const FlashBwdParams& params, cudaStream_t stream);

// Tile sizes the launchers and workspace computations agree on.
constexpr int kBwdRowPad = 128;   // lse_log2 / delta rows are padded to a multiple of this (>= kBlockM)
constexpr int kBwdBlockN = 128;   // key block of every backward configuration

}  // namespace attn
}  // namespace gptk
