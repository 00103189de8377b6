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
// - sliding window (window_left, window_right; -1 = unbounded on that side): key j is visible to
//   query i iff also (wl < 0 or j >= i + offset - wl) and (wr < 0 or j <= i + offset + wr), with the
//   same bottom-right offset; causal is exactly wr = 0 (canonical_variants() folds it in). The
//   kernels visit only the key / query tiles a window reaches (cost proportional to the window).
// - softcap > 0: scores s = softcap * tanh(s / softcap) (on the scaled scores) before the softmax;
//   lse is taken over the capped scores; the backward multiplies dS by 1 - tanh^2.
// - varlen (cu_seqlens_q != nullptr): q/o are (total_q, Hq, D) and k/v (total_k, Hkv, D) packed
//   sequences (batch strides ignored), sequence b = rows [cu_q[b], cu_q[b+1]) against keys
//   [cu_k[b], cu_k[b+1]) with the rule above; batch = number of sequences, sq / sk = the maxima
//   (the grids), lse (Hq, total_q). Lengths are clamped to [0, sq] / [0, sk] and to the totals
//   (seq_bounds in mask.cuh), so bad cu_seqlens never make a kernel read out of bounds.
// - head dims, dtypes, length limits: attention_limits.h (problem_error() is the one rule); a head
//   dim d runs the kernel compiled for the smallest listed head dim >= d, the columns past d
//   zero-filled in shared memory (they add nothing to q k^T and produce nothing).
//
// Implementations. select_impl() is the one place that chooses one for an op from the device's
// compute capability (the binding reads it from the tensors' device and stores it in the params);
// the entry points (flash_api.cu) switch on params.impl, then on dtype and head dim
// (static_switch.h). Every GPU >= sm_80 runs the mma.sync kernels (flash_fwd_kernel.cuh,
// flash_bwd_kernel.cuh, flash_decode.cu). The forward and backward also have a Hopper implementation,
// Impl::kSm90 (sm90/: wgmma + TMA + warp specialisation, sharing mask.cuh / softmax.cuh and the backward's
// preprocess / convert kernels; compiled for sm_90a only, see setup.py): an opt-in row of the table in
// flash_api.cu (GPTKERNELS_ATTENTION_IMPL=sm90) until it has run on a GPU. Calls its row refuses
// (sm90/flash_fwd_sm90.h, sm90/flash_bwd_sm90.h) select the sm80 kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "attention/attention_limits.h"
#include "common.h"

namespace gptk {
namespace attn {

// The attention ops, as select_impl() and the table of implementations name them.
enum class AttnOp : int { kFwd = 0, kBwd = 1, kDecode = 2 };

// Kernel implementations. kNone: no kernel serves this op on this device.
enum class Impl : int { kNone = 0, kSm80 = 1, kSm90 = 2 };

struct FlashFwdParams;
struct FlashBwdParams;

// The implementation that runs `op` on a device of compute capability `cc` (major * 10 + minor).
// `requested` (GPTKERNELS_ATTENTION_IMPL; nullptr, "" or "auto" = automatic) names an
// implementation to prefer where it serves the op and the device (the automatic choice elsewhere).
// `call` (a forward's params, optional; or a backward's): skip implementations that refuse this call.
Impl select_impl(AttnOp op, int cc, const char* requested, const FlashFwdParams* call = nullptr);
Impl select_impl(AttnOp op, int cc, const char* requested, const FlashBwdParams* call);
// nullptr when `requested` is empty, "auto" or an implementation's name; else the list of names.
const char* unknown_impl_error(const char* requested);
const char* impl_name(Impl impl);                      // "sm80"
std::string impl_description(Impl impl, AttnOp op);   // "sm80 mma.sync kernel"
// What `gptkernels info` prints for `op` on a device of compute capability `cc`: the description of
// select_impl's choice plus, where other rows serve that device, how they are selected (opt-in) or
// that they are not in this build. "" when no implementation serves it.
std::string impl_summary(AttnOp op, int cc, const char* requested);

struct TensorRef {
  void* ptr = nullptr;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0;  // in elements
};

// The variant fields FlashFwdParams and FlashBwdParams share (flash.h's header comment: semantics).
struct VariantParams {
  int window_left = -1, window_right = -1;  // keys left / right of the aligned diagonal; -1 = unbounded
  float softcap = 0.f;                      // 0 = off
  const int* cu_seqlens_q = nullptr;        // [batch + 1] int32 (varlen) or nullptr (dense)
  const int* cu_seqlens_k = nullptr;        // [batch + 1] int32 (varlen)
  int total_q = 0, total_k = 0;             // varlen: rows of q / k (lse is [Hq, total_q])
};

struct FlashFwdParams : VariantParams {
  TensorRef q, k, v, o;
  float* lse = nullptr;            // [B, Hq, Sq] fp32 contiguous (varlen: [Hq, total_q])
  const int* kv_lens = nullptr;    // [B] int32 or nullptr (dense only)
  int batch = 0, hq = 0, hkv = 0, sq = 0, sk = 0, d = 0;
  float scale = 0.f;               // softmax scale (> 0)
  bool causal = false;
  DType dtype = DType::kBFloat16;
  Impl impl = Impl::kSm80;         // chosen by select_impl (the portable sm80 kernels by default)
  // split-KV forward only (flash_decode): fp32 partial results (see flash_decode.cu); set by the launcher
  float* o_accum = nullptr;        // [splits, B, Hq, Sq, d] (varlen: [splits, Hq, total_q, d])
  float* lse_accum = nullptr;      // [splits, B, Hq, Sq] (varlen: [splits, Hq, total_q])
  int num_splits = 1;
};

struct FlashBwdParams : VariantParams {
  TensorRef q, k, v, o, dout, dq, dk, dv;
  const float* lse = nullptr;      // [B, Hq, Sq] fp32 contiguous (from the forward; varlen [Hq, total_q])
  const float* dlse = nullptr;     // optional gradient of lse, laid out as lse
  int batch = 0, hq = 0, hkv = 0, sq = 0, sk = 0, d = 0;
  float scale = 0.f;
  bool causal = false;
  bool deterministic = false;
  DType dtype = DType::kBFloat16;
  Impl impl = Impl::kSm80;
  // workspace (flash_bwd_workspace_bytes), carved by the launcher:
  float* lse_log2 = nullptr;       // [B, Hq, Sq_pad]: lse * log2(e), +inf for empty/padded rows (also varlen)
  float* delta = nullptr;          // [B, Hq, Sq_pad]: rowsum(dO * O) - dlse
  float* dq_accum = nullptr;       // [splits, B, Hq, Sq, d] fp32 (varlen: [splits, Hq, total_q, d])
  int dq_splits = 1;
  // GQA: the query heads of a group are shared by head_splits CTAs per key block (a divisor of
  // Hq / Hkv, flash_bwd_head_splits; set before sizing the workspace). With more than one, each
  // writes fp32 partial dK/dV to the workspace, summed in slice order by flash_bwd_convert_dkv.
  int head_splits = 1;
  float* dk_accum = nullptr;       // [head_splits, B, Hkv, Sk, d] fp32 (head_splits > 1 only; varlen [.., Hkv, total_k, d])
  float* dv_accum = nullptr;
};

// problem_error (attention_limits.h) of a params struct: "" when the kernels take it.
template <typename Params>
std::string problem_error(const Params& p) {
  std::string why = problem_error(p.batch, p.hq, p.hkv, p.sq, p.sk, p.d, p.scale, p.dtype);
  if (why.empty()) why = variant_error(p.window_left, p.window_right, p.softcap, p.causal);
  if (why.empty() && (p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr))
    why = "varlen: cu_seqlens_q and cu_seqlens_k come together";
  if (why.empty() && p.cu_seqlens_q != nullptr && (p.total_q < 0 || p.total_k < 0))
    why = "varlen: negative totals";
  return why;
}

// Folds causal into the window (causal = right side 0; a right side of 0 is causal) and drops
// sides that reach every key anyway (left >= Sk, right >= Sq: then the side is -1), so that the
// mask arithmetic stays in int32 and a huge window runs the dense kernels' fast paths. The entry
// points apply it; the binding too, before select_impl, so that rows refusing variants see the
// canonical form. Call when problem_error(p) is empty.
template <typename Params>
void canonical_variants(Params& p) {
  if (p.causal) p.window_right = 0;
  if (p.window_left >= p.sk) p.window_left = -1;
  if (p.window_right > 0 && p.window_right >= p.sq) p.window_right = -1;
  p.causal = p.window_right == 0;
}

// Whether a call uses any variant (a window other than causal, softcap, varlen), in canonical form.
template <typename Params>
bool uses_variant(const Params& p) {
  return p.window_left >= 0 || (p.window_right >= 0 && !p.causal) || p.softcap > 0.f || p.cu_seqlens_q != nullptr;
}

// Rows of lse / dq_accum ([B, Hq, Sq], or [Hq, total_q] for varlen) and of the dK/dV partials.
template <typename Params>
__host__ __device__ inline int64_t q_rows(const Params& p) {
  return p.cu_seqlens_q != nullptr ? static_cast<int64_t>(p.hq) * p.total_q : static_cast<int64_t>(p.batch) * p.hq * p.sq;
}
template <typename Params>
__host__ __device__ inline int64_t kv_rows(const Params& p) {
  return p.cu_seqlens_k != nullptr ? static_cast<int64_t>(p.hkv) * p.total_k : static_cast<int64_t>(p.batch) * p.hkv * p.sk;
}

// Forward (out, lse). Handles every Sq; for small Sq (decoding) flash_decode is faster.
cudaError_t flash_fwd(FlashFwdParams params, cudaStream_t stream);

// Split-KV forward (flash-decoding, flash_decode.cu): for small Sq over a long cache (decoding,
// chunked prefill, speculative decoding), any Sq. Needs a workspace of
// flash_decode_workspace_bytes(params) bytes (0 when it runs unsplit).
int flash_decode_num_splits(const FlashFwdParams& params, int num_sms);
size_t flash_decode_workspace_bytes(const FlashFwdParams& params, int num_splits);
cudaError_t flash_decode(FlashFwdParams params, void* workspace, int num_splits, cudaStream_t stream);

// Backward: dq, dk, dv (dk/dv summed over the query heads sharing a K/V head). Non-deterministic by
// default (fp32 atomics into dq); with deterministic=true every dq element is accumulated by one
// thread in a fixed order into one of `dq_splits` slices that are then summed in order.
int flash_bwd_head_splits(const FlashBwdParams& params, int num_sms);
int flash_bwd_dq_splits(const FlashBwdParams& params, int num_sms);
size_t flash_bwd_workspace_bytes(const FlashBwdParams& params, int dq_splits);
cudaError_t flash_bwd(FlashBwdParams params, void* workspace, int dq_splits, cudaStream_t stream);

// ---- per-implementation launchers (see flash_api.cu for the dispatch) ------------------------
// sm80 forward / backward: one instantiation per file, flash_{fwd,bwd}_hdim{D}_{dtype}[_softcap].cu,
// generated by tools/gen_instantiations.py from attention_limits.h. kSoftcap: the kernels for
// params.softcap > 0 (a compile-time switch, so that the others keep their registers).
template <typename T, int kHeadDim, bool kSoftcap>
cudaError_t run_flash_fwd_sm80(const FlashFwdParams& params, cudaStream_t stream);
template <typename T, int kHeadDim, bool kSoftcap>
cudaError_t run_flash_bwd_sm80(const FlashBwdParams& params, cudaStream_t stream);
// sm80 split-KV forward (flash_decode.cu: its CUDA-core kernel or the tensor-core forward split over
// the keys, then the combine): params.num_splits / o_accum / lse_accum already set.
template <typename T, int kHeadDim>
cudaError_t run_flash_decode_sm80(const FlashFwdParams& params, cudaStream_t stream);

// Backward helpers (flash_bwd_prep.cu), run by flash_bwd around the main kernel.
cudaError_t flash_bwd_preprocess(const FlashBwdParams& params, cudaStream_t stream);
cudaError_t flash_bwd_convert_dq(const FlashBwdParams& params, cudaStream_t stream);
cudaError_t flash_bwd_convert_dkv(const FlashBwdParams& params, cudaStream_t stream);

// Tile sizes the launchers and workspace computations agree on.
constexpr int kBwdRowPad = 128;   // lse_log2 / delta rows are padded to a multiple of this (>= kBlockM)
constexpr int kBwdBlockN = 128;   // key block of every backward configuration
constexpr int kFwdBlockM = 128;   // query block of every forward configuration

}  // namespace attn
}  // namespace gptk
