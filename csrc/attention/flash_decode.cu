// flash_decode.cu: attention for a few query rows over a long KV cache (decoding), flash-decoding
// style: the keys are split over many CTAs, each producing a partial (max, sum, output) per row,
// and a combine kernel merges the splits. Forward only (out, lse), same semantics as flash_fwd.
//
// Design
// - Memory-bound: every K/V byte of the cache (up to kv_len) is read once per CTA row group. A
//   CTA = (batch, K/V head, group of kRows query rows, key split); the rows are the (query head of
//   the GQA group, query position) pairs sharing that K/V head, so K/V is read once for them all.
// - 128 threads = 16 key slots of 8 lanes. A slot takes one key at a time; each lane holds 8 (d=64)
//   or 16 (d=128) of its dimensions: 16-byte loads, a warp reads 4 whole K rows per instruction.
//   kUnroll keys per slot are loaded before any math (several 16-byte loads in flight per thread).
//   Scores: per-lane partial dot products reduced over the 8 lanes with 3 shuffles.
// - Online softmax per slot (exp2 with the scale folded into q), then the 16 slots are merged:
//   shuffles inside a warp, shared memory across the 4 warps.
// - Keys past kv_len are never read (a static cache may hold anything there); rows that see no
//   key give zeros and lse = -inf (also per split: the combine gives such splits zero weight).
// - num_splits == 1 writes the final output directly; otherwise fp32 partial outputs (already
//   normalised) and their lse go to a workspace and flash_decode_combine_kernel merges them:
//   out = sum_s exp(lse_s - lse) * o_s with lse = log sum_s exp(lse_s).
#include <algorithm>
#include <climits>

#include "attention/flash.h"
#include "attention/mma.cuh"
#include "device.cuh"
#include "static_switch.h"

namespace gptk {
namespace attn {
namespace {

constexpr int kDecThreads = 128;
constexpr int kDecSlots = kDecThreads / 8;  // keys in flight per CTA step (one per 8-lane slot)
constexpr int kDecRows = 4;                 // query rows per CTA
constexpr float kDecLog2e = 1.4426950408889634f;
constexpr float kDecLn2 = 0.6931471805599453f;

template <int kHeadDim>
struct DecodeConfig {
  static constexpr int kChunks = (kHeadDim + 63) / 64;        // 16-byte chunks per lane
  static constexpr int kElems = kChunks * 8;                  // dims per lane
  static constexpr int kWidth = kChunks * 64;                 // dims the 8 lanes of a slot cover
  static constexpr int kUnroll = kChunks == 1 ? 4 : 2;        // keys per slot per step
  static constexpr int kKeysPerStep = kDecSlots * kUnroll;
};

struct DecodeGeometry {
  int row_groups;   // ceil(G * Sq / kDecRows)
  int split_keys;   // keys per split (a multiple of kKeysPerStep)
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kDecThreads) flash_decode_kernel(const FlashFwdParams p, DecodeGeometry geo) {
  using Cfg = DecodeConfig<kHeadDim>;
  constexpr int kE = Cfg::kElems, kU = Cfg::kUnroll;
  __shared__ float s_m[4][kDecRows], s_l[4][kDecRows];
  __shared__ float s_o[4][kDecRows][Cfg::kWidth];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slot = tid >> 3, l8 = lane & 7;
  const int split = blockIdx.x % p.num_splits;
  const int rest = blockIdx.x / p.num_splits;
  const int rg = rest % geo.row_groups;
  const int bh = rest / geo.row_groups;
  const int hk = bh % p.hkv, b = bh / p.hkv;
  const int group = p.hq / p.hkv;
  const int rows_total = group * p.sq;
  int kv_len = p.sk;
  if (p.kv_lens != nullptr) kv_len = min(max(p.kv_lens[b], 0), p.sk);
  const int offset = kv_len - p.sq;
  const int k_begin = split * geo.split_keys;
  const int k_end = min(k_begin + geo.split_keys, kv_len);
  const int d_chunks = p.d / 8;
  const float qscale = p.scale * kDecLog2e;

  // Query rows of this CTA: q pre-scaled so that scores come out in log2 units.
  float q[kDecRows][kE];
  int row_limit[kDecRows];  // keys [0, row_limit) are visible to the row (0 for padding rows)
#pragma unroll
  for (int r = 0; r < kDecRows; ++r) {
    const int rr = rg * kDecRows + r;
    const bool valid = rr < rows_total;
    const int g = valid ? rr / p.sq : 0, s = valid ? rr % p.sq : 0;
    row_limit[r] = !valid ? 0 : (p.causal ? min(max(s + offset + 1, 0), kv_len) : kv_len);
    const T* qp = static_cast<const T*>(p.q.ptr) + b * p.q.batch_stride + (hk * group + g) * p.q.head_stride +
                  s * p.q.row_stride;
#pragma unroll
    for (int c = 0; c < Cfg::kChunks; ++c) {
      const int chunk = l8 + 8 * c;
      Pack<T> v;
      if (valid && chunk < d_chunks) {
        v = load_pack(qp + chunk * 8);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v.v[j] = from_float<T>(0.f);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) q[r][c * 8 + j] = to_float(v.v[j]) * qscale;
    }
  }

  float m[kDecRows], l[kDecRows], o[kDecRows][kE];
#pragma unroll
  for (int r = 0; r < kDecRows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < kE; ++e) o[r][e] = 0.f;
  }

  const T* kp = static_cast<const T*>(p.k.ptr) + b * p.k.batch_stride + hk * p.k.head_stride;
  const T* vp = static_cast<const T*>(p.v.ptr) + b * p.v.batch_stride + hk * p.v.head_stride;
  for (int kb = k_begin; kb < k_end; kb += Cfg::kKeysPerStep) {
    Pack<T> kv[kU][Cfg::kChunks], vv[kU][Cfg::kChunks];
    int key[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      key[u] = kb + u * kDecSlots + slot;
#pragma unroll
      for (int c = 0; c < Cfg::kChunks; ++c) {
        const int chunk = l8 + 8 * c;
        if (key[u] < k_end && chunk < d_chunks) {
          kv[u][c] = load_pack(kp + key[u] * p.k.row_stride + chunk * 8);
          vv[u][c] = load_pack(vp + key[u] * p.v.row_stride + chunk * 8);
        } else {
#pragma unroll
          for (int j = 0; j < 8; ++j) kv[u][c].v[j] = vv[u][c].v[j] = from_float<T>(0.f);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kDecRows; ++r) {
      float sc[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        float acc = 0.f;
#pragma unroll
        for (int c = 0; c < Cfg::kChunks; ++c)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc = fmaf(q[r][c * 8 + j], to_float(kv[u][c].v[j]), acc);
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        acc += __shfl_xor_sync(0xffffffffu, acc, 4);
        sc[u] = key[u] < k_end && key[u] < row_limit[r] ? acc : -INFINITY;
      }
      float mx = m[r];
#pragma unroll
      for (int u = 0; u < kU; ++u) mx = fmaxf(mx, sc[u]);
      if (mx == -INFINITY) continue;  // nothing visible yet for this row in this slot
      const float corr = fast_exp2(m[r] - mx);  // 0 when m was -inf
      m[r] = mx;
      float pu[kU], psum = 0.f;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        pu[u] = fast_exp2(sc[u] - mx);
        psum += pu[u];
      }
      l[r] = l[r] * corr + psum;
#pragma unroll
      for (int c = 0; c < Cfg::kChunks; ++c)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          float acc = o[r][c * 8 + j] * corr;
#pragma unroll
          for (int u = 0; u < kU; ++u) acc = fmaf(pu[u], to_float(vv[u][c].v[j]), acc);
          o[r][c * 8 + j] = acc;
        }
    }
  }

  // Merge the 4 slots of each warp (lanes differing in bits 3 and 4), then the 4 warps.
#pragma unroll
  for (int r = 0; r < kDecRows; ++r) {
#pragma unroll
    for (int sh = 8; sh <= 16; sh <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[r], sh);
      const float l2 = __shfl_xor_sync(0xffffffffu, l[r], sh);
      const float mx = fmaxf(m[r], m2);
      const float c1 = mx == -INFINITY ? 0.f : fast_exp2(m[r] - mx);
      const float c2 = mx == -INFINITY ? 0.f : fast_exp2(m2 - mx);
      l[r] = l[r] * c1 + l2 * c2;
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const float o2 = __shfl_xor_sync(0xffffffffu, o[r][e], sh);
        o[r][e] = o[r][e] * c1 + o2 * c2;
      }
      m[r] = mx;
    }
  }
  if (lane < 8) {
#pragma unroll
    for (int r = 0; r < kDecRows; ++r) {
      if (lane == 0) {
        s_m[warp][r] = m[r];
        s_l[warp][r] = l[r];
      }
#pragma unroll
      for (int c = 0; c < Cfg::kChunks; ++c)
#pragma unroll
        for (int j = 0; j < 8; ++j) s_o[warp][r][(l8 + 8 * c) * 8 + j] = o[r][c * 8 + j];
    }
  }
  __syncthreads();

  // Final: thread t handles dims e of row r for (r, e) = t, t + 128, ...
  for (int idx = tid; idx < kDecRows * kHeadDim; idx += kDecThreads) {
    const int r = idx / kHeadDim, e = idx % kHeadDim;
    const int rr = rg * kDecRows + r;
    if (rr >= rows_total || e >= p.d) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < 4; ++w) mx = fmaxf(mx, s_m[w][r]);
    float lsum = 0.f, acc = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float c = fast_exp2(s_m[w][r] - mx);
        lsum += s_l[w][r] * c;
        acc += s_o[w][r][e] * c;
      }
    }
    const bool any = lsum > 0.f;
    const float out = any ? acc / lsum : 0.f;
    const float lse = any ? (mx + log2f(lsum)) * kDecLn2 : -INFINITY;
    const int g = rr / p.sq, s = rr % p.sq, h = hk * group + g;
    const int64_t row_global = (static_cast<int64_t>(b) * p.hq + h) * p.sq + s;
    if (p.num_splits == 1) {
      T* op = static_cast<T*>(p.o.ptr) + b * p.o.batch_stride + h * p.o.head_stride + s * p.o.row_stride;
      op[e] = from_float<T>(out);
      if (e == 0) p.lse[row_global] = lse;
    } else {
      const int64_t srow = static_cast<int64_t>(split) * p.batch * p.hq * p.sq + row_global;
      p.o_accum[srow * p.d + e] = out;
      if (e == 0) p.lse_accum[srow] = lse;
    }
  }
}

// One warp per output row: merge the splits' partial outputs by their lse.
template <typename T>
__global__ void __launch_bounds__(128) flash_decode_combine_kernel(const FlashFwdParams p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.hq * p.sq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_accum[s * rows + row]);
  float wsum = 0.f;
  if (mx != -INFINITY)
    for (int s = 0; s < p.num_splits; ++s) wsum += __expf(p.lse_accum[s * rows + row] - mx);
  const int sidx = static_cast<int>(row % p.sq);
  const int64_t bh = row / p.sq;
  const int h = static_cast<int>(bh % p.hq), b = static_cast<int>(bh / p.hq);
  T* op = static_cast<T*>(p.o.ptr) + b * p.o.batch_stride + h * p.o.head_stride + sidx * p.o.row_stride;
  for (int e = lane; e < p.d; e += 32) {
    float acc = 0.f;
    if (wsum > 0.f) {
      for (int s = 0; s < p.num_splits; ++s) {
        const float ls = p.lse_accum[s * rows + row];
        if (ls != -INFINITY) acc += __expf(ls - mx) * p.o_accum[(s * rows + row) * p.d + e];
      }
      acc /= wsum;
    }
    op[e] = from_float<T>(acc);
  }
  if (lane == 0) p.lse[row] = wsum > 0.f ? mx + logf(wsum) : -INFINITY;
}

// Row groups per (batch, K/V head); they do not depend on the head dim, so neither does the split count.
int decode_row_groups(const FlashFwdParams& p) {
  return static_cast<int>(ceil_div(static_cast<int64_t>(p.hq / p.hkv) * p.sq, kDecRows));
}

template <int kHeadDim>
DecodeGeometry decode_geometry(const FlashFwdParams& p, int num_splits) {
  constexpr int keys_per_step = DecodeConfig<kHeadDim>::kKeysPerStep;
  DecodeGeometry geo;
  geo.row_groups = decode_row_groups(p);
  const int64_t per_split = ceil_div(p.sk, std::max(num_splits, 1));
  geo.split_keys = static_cast<int>(std::max<int64_t>(ceil_div(per_split, keys_per_step) * keys_per_step, 1));
  return geo;
}

}  // namespace

int flash_decode_num_splits(const FlashFwdParams& p, int num_sms) {
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.hkv * decode_row_groups(p);
  if (ctas <= 0) return 1;
  const int64_t by_sms = ceil_div(2LL * num_sms, ctas);   // about two CTAs per SM
  const int64_t by_keys = ceil_div(p.sk, 128);             // at least 128 keys per split
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::min(by_sms, by_keys), 64)));
}

size_t flash_decode_workspace_bytes(const FlashFwdParams& p, int num_splits) {
  if (num_splits <= 1) return 0;
  const size_t rows = static_cast<size_t>(num_splits) * p.batch * p.hq * p.sq;
  return (rows * p.d * sizeof(float) + 255) / 256 * 256 + rows * sizeof(float);
}

// The decode kernel (and, when split, the combine) for one dtype and head dim; flash_decode()
// (flash_api.cu) has checked the problem and carved the workspace into params.
template <typename T, int kHeadDim>
cudaError_t run_flash_decode_sm80(const FlashFwdParams& p, cudaStream_t stream) {
  const DecodeGeometry geo = decode_geometry<kHeadDim>(p, p.num_splits);
  const int64_t grid = static_cast<int64_t>(p.num_splits) * geo.row_groups * p.batch * p.hkv;
  if (grid > INT_MAX) return cudaErrorInvalidConfiguration;
  flash_decode_kernel<T, kHeadDim><<<static_cast<unsigned>(grid), kDecThreads, 0, stream>>>(p, geo);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.hq * p.sq;
  const int64_t blocks = ceil_div(rows, 4);
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  flash_decode_combine_kernel<T><<<static_cast<unsigned>(blocks), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

// One instantiation per (dtype, head dim) of attention_limits.h (the decode kernels are small: no
// per-file split as for the forward and backward).
#define GPTK_DECODE_INST_HD_(HD, CTYPE) \
  template cudaError_t run_flash_decode_sm80<CTYPE, HD>(const FlashFwdParams&, cudaStream_t);
#define GPTK_DECODE_INST_(SUFFIX, ENUM, CTYPE) GPTK_ATTN_HEAD_DIMS(GPTK_DECODE_INST_HD_, CTYPE)
GPTK_ATTN_DTYPES(GPTK_DECODE_INST_)
#undef GPTK_DECODE_INST_
#undef GPTK_DECODE_INST_HD_

}  // namespace attn
}  // namespace gptk
