// flash_bwd_prep.cu: the small kernels around the attention backward (flash_bwd_kernel.cuh).
//
// - preprocess: one warp per query row (rows padded to a multiple of kBwdRowPad): delta =
//   rowsum(dO * O) - dlse (fp32, 16-byte loads) and lse * log2(e), with +inf for padded rows and
//   for rows that saw no key (lse = -inf), so the main kernel's exp2(s - lse) is exactly 0 there
//   and needs no row predicate.
// - convert_dq: dq = scale * (sum of the fp32 dq slices, in slice order), converted to the input
//   dtype and written with dq's strides (16-byte stores).
// - convert_dkv (GQA with head_splits > 1 only): dk = scale * (sum of the fp32 partial dK slices,
//   in slice order), dv = the sum of the dV slices, the same way.
//
// Varlen (flash.h): lse_log2 / delta stay [B, Hq, Sq_pad] with Sq the maximum length (each sequence
// padded to it); lse, dlse and dq_accum are [Hq, total_q] / [splits, Hq, total_q, d] and dK/dV
// partials [head_splits, Hkv, total_k, d]: the convert kernels walk them as one "batch" of total rows.
#include "attention/flash.h"
#include "attention/mask.cuh"
#include "device.cuh"
#include "static_switch.h"

namespace gptk {
namespace attn {
namespace {

constexpr int kPrepThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kPrepThreads) flash_bwd_preprocess_kernel(const FlashBwdParams p, int sq_pad) {
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kPrepThreads / 32) + threadIdx.x / 32;
  const int64_t total = static_cast<int64_t>(p.batch) * p.hq * sq_pad;
  if (row >= total) return;
  const int lane = threadIdx.x & 31;
  const int r = static_cast<int>(row % sq_pad);
  const int64_t bh = row / sq_pad;
  const int h = static_cast<int>(bh % p.hq), b = static_cast<int>(bh / p.hq);
  float dot = 0.f, lse2 = INFINITY;
  const SeqBounds sb = seq_bounds(p, b);
  if (r < sb.sq) {
    const int64_t qr = sb.q_off + r;
    const T* o = static_cast<const T*>(p.o.ptr) + b * p.o.batch_stride + h * p.o.head_stride + qr * p.o.row_stride;
    const T* dout =
        static_cast<const T*>(p.dout.ptr) + b * p.dout.batch_stride + h * p.dout.head_stride + qr * p.dout.row_stride;
    for (int c = lane; c < p.d / 8; c += 32) {
      const Pack<T> ov = load_pack(o + c * 8), dv = load_pack(dout + c * 8);
#pragma unroll
      for (int j = 0; j < Pack<T>::N; ++j) dot += to_float(ov.v[j]) * to_float(dv.v[j]);
    }
    dot = warp_sum(dot);
    const int64_t lrow = q_row(p, b, h, sb.q_off, r);
    const float l = p.lse[lrow];
    lse2 = l == -INFINITY ? INFINITY : l * kLog2e;
    if (p.dlse != nullptr) dot -= p.dlse[lrow];
  }
  if (lane == 0) {
    p.lse_log2[row] = lse2;
    p.delta[row] = dot;
  }
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads) flash_bwd_convert_dq_kernel(const FlashBwdParams p) {
  const int chunks = p.d / 8;
  const int64_t total = q_rows(p) * chunks;
  const int64_t slice = q_rows(p) * p.d;
  const int seq = p.cu_seqlens_q != nullptr ? p.total_q : p.sq;  // rows per (batch, head); varlen: one batch
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % chunks);
    const int64_t row = i / chunks;
    const int r = static_cast<int>(row % seq);
    const int64_t bh = row / seq;
    const int h = static_cast<int>(bh % p.hq), b = static_cast<int>(bh / p.hq);
    const float* src = p.dq_accum + row * p.d + c * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < p.dq_splits; ++s) {  // fixed order: deterministic
      const float4 lo = *reinterpret_cast<const float4*>(src + s * slice);
      const float4 hi = *reinterpret_cast<const float4*>(src + s * slice + 4);
      acc[0] += lo.x; acc[1] += lo.y; acc[2] += lo.z; acc[3] += lo.w;
      acc[4] += hi.x; acc[5] += hi.y; acc[6] += hi.z; acc[7] += hi.w;
    }
    Pack<T> out;
#pragma unroll
    for (int j = 0; j < 8; ++j) out.v[j] = from_float<T>(acc[j] * p.scale);
    T* dq = static_cast<T*>(p.dq.ptr) + b * p.dq.batch_stride + h * p.dq.head_stride + r * p.dq.row_stride + c * 8;
    store_pack(dq, out);
  }
}

// dk = scale * (sum of the fp32 partial dK slices, in slice order), dv = the same sum of the dV
// slices without the scale, converted to the input dtype and written with dk's / dv's strides.
template <typename T>
__global__ void __launch_bounds__(kPrepThreads) flash_bwd_convert_dkv_kernel(const FlashBwdParams p) {
  const int chunks = p.d / 8;
  const int64_t per_tensor = kv_rows(p) * chunks;
  const int64_t slice = kv_rows(p) * p.d;
  const int seq = p.cu_seqlens_k != nullptr ? p.total_k : p.sk;  // rows per (batch, head); varlen: one batch
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < 2 * per_tensor;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool is_v = i >= per_tensor;
    const int64_t j = is_v ? i - per_tensor : i;
    const int c = static_cast<int>(j % chunks);
    const int64_t row = j / chunks;
    const int r = static_cast<int>(row % seq);
    const int64_t bh = row / seq;
    const int h = static_cast<int>(bh % p.hkv), b = static_cast<int>(bh / p.hkv);
    const float* src = (is_v ? p.dv_accum : p.dk_accum) + row * p.d + c * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < p.head_splits; ++s) {  // fixed order: deterministic
      const float4 lo = *reinterpret_cast<const float4*>(src + s * slice);
      const float4 hi = *reinterpret_cast<const float4*>(src + s * slice + 4);
      acc[0] += lo.x; acc[1] += lo.y; acc[2] += lo.z; acc[3] += lo.w;
      acc[4] += hi.x; acc[5] += hi.y; acc[6] += hi.z; acc[7] += hi.w;
    }
    const float mul = is_v ? 1.f : p.scale;
    Pack<T> out;
#pragma unroll
    for (int e = 0; e < 8; ++e) out.v[e] = from_float<T>(acc[e] * mul);
    const TensorRef& t = is_v ? p.dv : p.dk;
    T* dst = static_cast<T*>(t.ptr) + b * t.batch_stride + h * t.head_stride + r * t.row_stride + c * 8;
    store_pack(dst, out);
  }
}

}  // namespace

cudaError_t flash_bwd_preprocess(const FlashBwdParams& p, cudaStream_t stream) {
  const int sq_pad = (p.sq + kBwdRowPad - 1) / kBwdRowPad * kBwdRowPad;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.hq * sq_pad;
  if (rows == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(rows, kPrepThreads / 32);
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  return ATTN_DTYPE_SWITCH(p.dtype, T, [&] {
    flash_bwd_preprocess_kernel<T><<<static_cast<unsigned>(blocks), kPrepThreads, 0, stream>>>(p, sq_pad);
    return cudaGetLastError();
  });
}

cudaError_t flash_bwd_convert_dq(const FlashBwdParams& p, cudaStream_t stream) {
  const int64_t total = q_rows(p) * (p.d / 8);
  if (total == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kPrepThreads), 32LL * num_sms());
  return ATTN_DTYPE_SWITCH(p.dtype, T, [&] {
    flash_bwd_convert_dq_kernel<T><<<static_cast<unsigned>(blocks), kPrepThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t flash_bwd_convert_dkv(const FlashBwdParams& p, cudaStream_t stream) {
  const int64_t total = 2 * kv_rows(p) * (p.d / 8);
  if (total == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kPrepThreads), 32LL * num_sms());
  return ATTN_DTYPE_SWITCH(p.dtype, T, [&] {
    flash_bwd_convert_dkv_kernel<T><<<static_cast<unsigned>(blocks), kPrepThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace attn
}  // namespace gptk
