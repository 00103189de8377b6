// layer_norm.cu: LayerNorm over the last dimension (optionally fused with the residual add of a
// GPT block), forward and backward, at memory speed.
//
// Design
// - Memory-bound: the forward reads x (and the residual) once and writes y (and s once); the
//   backward reads x and dy (and ds) once and writes dx once. Everything else (weight, bias,
//   per-row statistics, parameter-gradient partials) is small next to that.
// - A row is split into units of 8 elements (one 16-byte load for bf16/fp16, two for fp32) and
//   handled by a "row group" of TPR threads (a multiple of 32): thread t of the group holds units
//   t, t + TPR, ..., t + (VPT-1) * TPR of the row in registers (VPT = units per thread, a template
//   argument in 1..4). Rows up to 1024 elements get one warp (768 in the fp32 backward), so
//   the reductions are shuffles only; wider rows get several warps, reduced through shared
//   memory. A block holds 256 / TPR row groups (or one group of TPR > 256 threads), so small
//   rows still fill 8 warps. Loaded data is held as raw words (words.cuh): half the registers of
//   fp32 for bf16/fp16.
// - Statistics are two-pass over the registers (mean, then the sum of squared deviations), of the
//   row shifted by its first element, so a large common offset (1e4 + randn) costs no precision
//   to cancellation or to the size of the sums. All math in fp32. (The backward uses the stored
//   fp32 mean, as torch does: there xhat carries the mean's rounding, |mean| * 2^-24 * rstd.)
// - Vectorised path: 16-byte loads and stores when cols % 8 == 0 and every pointer is 16-byte
//   aligned. General path (any cols, any element alignment): the same layout, element loads
//   with bounds checks.
// - Forward: one row per row group, blocks in a grid-stride loop (rows are 64-bit).
// - Backward: a persistent grid (as many blocks as fit on the GPU); each thread always owns the
//   same columns. Per row the group reduces sum(g) and sum(g * xhat) (g = dy * weight, the
//   weight re-read from L1) and writes dx; x and dy stay in registers as raw words across the
//   reduction and are converted again after it. dweight/dbias partials accumulate in
//   fp32 in shared memory, one slice per row group, each thread touching only its own columns
//   (no atomics, no races). At the end the block adds its row groups' slices in a fixed order
//   and writes one fp32 partial row; a second kernel adds the blocks' rows in a fixed order.
//   The result is deterministic (run to run, on the same GPU).
// - The fused residual: forward s = residual + x is rounded to the storage type, written, and the
//   statistics are taken of the rounded s (what the backward reads back). Backward takes the
//   gradient that reaches s directly (ds) and adds it to dx in the same pass.
#include <climits>
#include <type_traits>

#include "device.cuh"
#include "layernorm/layer_norm.h"
#include "static_switch.h"
#include "words.cuh"

namespace gptk {
namespace {

constexpr int kUnit = 8;          // elements per unit
constexpr int kMaxVpt = 4;        // units per thread, at most
constexpr int kMaxTpr = 512;      // threads per row, at most (kMaxTpr * kMaxVpt * kUnit = layernorm::kMaxCols)
constexpr int kBlockTarget = 256;  // threads per block when a row needs fewer
constexpr int kMaxWarps = kMaxTpr / 32;
static_assert(kMaxTpr * kMaxVpt * kUnit == layernorm::kMaxCols, "layernorm::kMaxCols must match the launch limits");

// ---- units of 8 elements ----------------------------------------------------------------------

template <typename T>
using Unit = Words<T, kUnit>;  // 8 elements as raw words (words.cuh)

// What a thread holds of a unit: the raw words on the vectorised path; fp32 values on the general
// path (its element loads would otherwise be reassembled into words).
template <typename T, bool kVec>
using Held = std::conditional_t<kVec, Unit<T>, Words<float, kUnit>>;

// The unit starting at column `col` of a row (p points at that column). The general path reads
// only the columns < cols and leaves 0 in the rest.
template <typename T, bool kVec>
__device__ __forceinline__ Held<T, kVec> load_unit_raw(const T* p, int col, int cols) {
  if constexpr (kVec) {
    return load_words<T, kUnit>(p);
  } else {
    Words<float, kUnit> r;
#pragma unroll
    for (int j = 0; j < kUnit; ++j) r.w[j] = __float_as_uint(col + j < cols ? to_float(p[j]) : 0.f);
    return r;
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void load_unit(const T* p, int col, int cols, float (&f)[kUnit]) {
  to_floats(load_unit_raw<T, kVec>(p, col, cols), f);
}

template <typename T, bool kVec>
__device__ __forceinline__ void store_unit(T* p, int col, int cols, const float (&f)[kUnit]) {
  if constexpr (kVec) {
    store_words(p, from_floats<T, kUnit>(f));
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j)
      if (col + j < cols) p[j] = from_float<T>(f[j]);
  }
}

// The weight of a unit (1 where there is none, 0 past the row).
template <typename T, bool kVec>
__device__ __forceinline__ void load_weight(const T* weight, int col, int cols, float (&w)[kUnit]) {
  if (weight != nullptr && col < cols) {
    load_unit<T, kVec>(weight + col, col, cols, w);
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j) w[j] = col < cols ? 1.f : 0.f;
  }
}

// ---- row-group reduction ----------------------------------------------------------------------

// Sums NV values over the `wpg` warps of each row group; every thread of the group gets the sums.
// Every thread of the block must call it (it synchronises the block when wpg > 1). `red` holds
// kMaxWarps * NV floats; callers alternate two buffers so that one barrier per call suffices.
template <int NV>
__device__ __forceinline__ void group_sum(float (&v)[NV], int wpg, float* red) {
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = warp_sum(v[i]);
  if (wpg == 1) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) red[warp * NV + i] = v[i];
  }
  __syncthreads();
  const int first = warp - warp % wpg;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    float s = 0.f;
#pragma unroll 1
    for (int w = 0; w < wpg; ++w) s += red[(first + w) * NV + i];  // fixed order: deterministic
    v[i] = s;
  }
}

// ---- forward --------------------------------------------------------------------------------

struct FwdParams {
  const void* x;
  const void* residual;  // null: plain LayerNorm
  const void* weight;    // null: no scale
  const void* bias;      // null: no shift
  void* y;
  void* s;               // residual + x, written when residual is not null
  float* mean;
  float* rstd;
  int64_t rows;
  int cols;
  int tpr;               // threads per row (multiple of 32)
  float eps;
};

template <typename T, int VPT, bool kVec>
__global__ void __launch_bounds__(kMaxTpr, kVec && VPT < 4 ? 2 : 1) layer_norm_forward_kernel(const FwdParams p) {
  __shared__ float red[2][kMaxWarps];
  const int tpr = p.tpr, wpg = tpr >> 5, cols = p.cols;
  const int groups = blockDim.x / tpr, g = threadIdx.x / tpr, t = threadIdx.x - g * tpr;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ res = static_cast<const T*>(p.residual);
  const T* __restrict__ weight = static_cast<const T*>(p.weight);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ y = static_cast<T*>(p.y);
  T* __restrict__ s_out = static_cast<T*>(p.s);

  // Block-uniform loop (every thread reaches every barrier), one row per group per pass.
  for (int64_t row0 = (int64_t)blockIdx.x * groups; row0 < p.rows; row0 += (int64_t)gridDim.x * groups) {
    const int64_t row = row0 + g;
    const bool row_ok = row < p.rows;
    const int64_t base = row * cols;
    // The row is shifted by its first element before any sum: the sums are then of values of the
    // size of the spread, not of the mean, and a large common offset costs no precision.
    float pivot = 0.f;
    if (row_ok) {
      pivot = to_float(x[base]);
      if (res != nullptr) pivot = to_float(from_float<T>(pivot + to_float(res[base])));
    }
    float v[VPT][kUnit];  // s - pivot (0 outside the row)
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int col = (t + k * tpr) * kUnit;
      if (row_ok && col < cols) {
        load_unit<T, kVec>(x + base + col, col, cols, v[k]);
        if (res != nullptr) {
          float r[kUnit];
          load_unit<T, kVec>(res + base + col, col, cols, r);
#pragma unroll
          for (int j = 0; j < kUnit; ++j) r[j] += v[k][j];
          // s is rounded to the storage type: the statistics below and the backward see the same s.
          to_floats(from_floats<T, kUnit>(r), v[k]);
          store_unit<T, kVec>(s_out + base + col, col, cols, v[k]);
        }
#pragma unroll
        for (int j = 0; j < kUnit; ++j)
          if (kVec || col + j < cols) v[k][j] -= pivot;
      } else {
#pragma unroll
        for (int j = 0; j < kUnit; ++j) v[k][j] = 0.f;
      }
    }

    float sum[1] = {0.f};
#pragma unroll
    for (int k = 0; k < VPT; ++k)
#pragma unroll
      for (int j = 0; j < kUnit; ++j) sum[0] += v[k][j];
    group_sum<1>(sum, wpg, red[0]);
    const float mean = sum[0] / (float)cols;  // of s - pivot

    float sq[1] = {0.f};
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int col = (t + k * tpr) * kUnit;
      if (col < cols) {
#pragma unroll
        for (int j = 0; j < kUnit; ++j) {
          const float d = v[k][j] - mean;
          if (kVec || col + j < cols) sq[0] += d * d;
        }
      }
    }
    group_sum<1>(sq, wpg, red[1]);
    const float rstd = rsqrtf(sq[0] / (float)cols + p.eps);

    if (row_ok) {
      if (t == 0) {
        p.mean[row] = pivot + mean;
        p.rstd[row] = rstd;
      }
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int col = (t + k * tpr) * kUnit;
        if (col < cols) {
          float w[kUnit], b[kUnit], o[kUnit];
          if (weight != nullptr) {
            load_unit<T, kVec>(weight + col, col, cols, w);
          } else {
#pragma unroll
            for (int j = 0; j < kUnit; ++j) w[j] = 1.f;
          }
          if (bias != nullptr) {
            load_unit<T, kVec>(bias + col, col, cols, b);
          } else {
#pragma unroll
            for (int j = 0; j < kUnit; ++j) b[j] = 0.f;
          }
#pragma unroll
          for (int j = 0; j < kUnit; ++j) o[j] = (v[k][j] - mean) * rstd * w[j] + b[j];
          store_unit<T, kVec>(y + base + col, col, cols, o);
        }
      }
    }
  }
}

// ---- backward -------------------------------------------------------------------------------

struct BwdParams {
  const void* dy;
  const void* x;
  const void* weight;  // null: g = dy
  const float* mean;
  const float* rstd;
  const void* ds;      // null: nothing reaches s directly
  void* dx;
  float* partial;      // [2][gridDim.x][cols] fp32 (dweight rows, then dbias rows); null: none wanted
  int64_t rows;
  int cols;
  int tpr;
};

template <typename T, int VPT, bool kVec>
__global__ void __launch_bounds__(kMaxTpr) layer_norm_backward_kernel(const BwdParams p) {
  // Dynamic shared memory: dweight then dbias accumulators, each [groups][tpr * VPT * kUnit].
  extern __shared__ float4 smem4[];
  __shared__ float red[2][kMaxWarps * 2];
  const int tpr = p.tpr, wpg = tpr >> 5, cols = p.cols;
  const int groups = blockDim.x / tpr, g = threadIdx.x / tpr, t = threadIdx.x - g * tpr;
  const int slice = tpr * VPT * kUnit;  // floats per row-group slice
  const bool accumulate = p.partial != nullptr;
  float* acc_w = reinterpret_cast<float*>(smem4) + g * slice;
  float* acc_b = acc_w + groups * slice;
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ weight = static_cast<const T*>(p.weight);
  const T* __restrict__ ds = static_cast<const T*>(p.ds);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  const float inv_cols = 1.f / (float)cols;
  constexpr bool kReloadX = sizeof(T) == 4 && VPT == 4 && kVec;

#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    if (accumulate) {
      float4* a4 = reinterpret_cast<float4*>(acc_w + (t + k * tpr) * kUnit);
      float4* b4 = reinterpret_cast<float4*>(acc_b + (t + k * tpr) * kUnit);
      a4[0] = a4[1] = b4[0] = b4[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }

  int parity = 0;
  for (int64_t row0 = (int64_t)blockIdx.x * groups; row0 < p.rows; row0 += (int64_t)gridDim.x * groups) {
    const int64_t row = row0 + g;
    const bool row_ok = row < p.rows;
    const int64_t base = row * cols;
    // x and dy stay in the storage type across the reduction (half the registers of fp32 for
    // bf16/fp16); the weight is re-read from L1 where it is needed.
    Held<T, kVec> xr[VPT], dyr[VPT];
    const float mean = row_ok ? p.mean[row] : 0.f;
    const float rstd = row_ok ? p.rstd[row] : 0.f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int col = (t + k * tpr) * kUnit;
      if (row_ok && col < cols) {
        xr[k] = load_unit_raw<T, kVec>(x + base + col, col, cols);
        dyr[k] = load_unit_raw<T, kVec>(dy + base + col, col, cols);
      } else {
#pragma unroll
        for (int i = 0; i < Held<T, kVec>::kWords; ++i) xr[k].w[i] = dyr[k].w[i] = 0u;  // 0 in every dtype
      }
    }
    // Columns past the row (and rows past the end) have dy = 0, so they add nothing below.
    float sums[2] = {0.f, 0.f};  // sum(g), sum(g * xhat)
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int col = (t + k * tpr) * kUnit;
      float w[kUnit], xf[kUnit], df[kUnit];
      load_weight<T, kVec>(weight, col, cols, w);
      to_floats(xr[k], xf);
      to_floats(dyr[k], df);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        const float xh = (xf[j] - mean) * rstd;
        const float gj = df[j] * w[j];
        sums[0] += gj;
        sums[1] += gj * xh;
      }
    }
    group_sum<2>(sums, wpg, red[parity]);
    parity ^= 1;
    const float a = sums[0] * inv_cols, b = sums[1] * inv_cols;

    if (row_ok) {
#pragma unroll
      for (int k = 0; k < VPT; ++k) {
        const int col = (t + k * tpr) * kUnit;
        if (col < cols) {
          float o[kUnit], w[kUnit], d[kUnit], xh[kUnit];
          // fp32 rows of 4 units per thread (vectorised, wider than 12288): holding x and dy
          // in registers across the reduction spilled; x is read again instead (an L1/L2 hit).
          if constexpr (kReloadX) xr[k] = load_unit_raw<T, kVec>(x + base + col, col, cols);
          load_weight<T, kVec>(weight, col, cols, w);
          if (ds != nullptr) {
            load_unit<T, kVec>(ds + base + col, col, cols, o);
          } else {
#pragma unroll
            for (int j = 0; j < kUnit; ++j) o[j] = 0.f;
          }
          // Converted again (not kept live in fp32 across the reduction: see words.cuh).
          to_floats_opaque(dyr[k], d);
          to_floats_opaque(xr[k], xh);
#pragma unroll
          for (int j = 0; j < kUnit; ++j) {
            xh[j] = (xh[j] - mean) * rstd;
            o[j] += rstd * (d[j] * w[j] - a - xh[j] * b);
          }
          store_unit<T, kVec>(dx + base + col, col, cols, o);
          if (accumulate) {
            float4* a4 = reinterpret_cast<float4*>(acc_w + (t + k * tpr) * kUnit);
            float4* b4 = reinterpret_cast<float4*>(acc_b + (t + k * tpr) * kUnit);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float4 aw = a4[h], ab = b4[h];
              const float* q = d + 4 * h;
              const float* z = xh + 4 * h;
              aw.x += q[0] * z[0]; aw.y += q[1] * z[1]; aw.z += q[2] * z[2]; aw.w += q[3] * z[3];
              ab.x += q[0]; ab.y += q[1]; ab.z += q[2]; ab.w += q[3];
              a4[h] = aw;
              b4[h] = ab;
            }
          }
        }
      }
    }
  }

  if (!accumulate) return;
  __syncthreads();
  // Add the row groups' slices in a fixed order; one fp32 partial row per block.
  const float* all_w = reinterpret_cast<const float*>(smem4);
  const float* all_b = all_w + groups * slice;
  float* part_w = p.partial + (int64_t)blockIdx.x * cols;
  float* part_b = p.partial + ((int64_t)gridDim.x + blockIdx.x) * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    float sw = 0.f, sb = 0.f;
#pragma unroll 1
    for (int r = 0; r < groups; ++r) {
      sw += all_w[r * slice + c];
      sb += all_b[r * slice + c];
    }
    part_w[c] = sw;
    part_b[c] = sb;
  }
}

// out[c] = sum over the `nblocks` partial rows, in a fixed order: thread row ty adds rows
// ty, ty + 32, ...; then the 32 thread rows are added in order. blockIdx.y: 0 dweight, 1 dbias.
template <typename T>
__global__ void __launch_bounds__(1024) layer_norm_param_grad_kernel(const float* __restrict__ partial, int nblocks,
                                                                     int cols, T* dweight, T* dbias) {
  __shared__ float red[32][33];
  T* out = blockIdx.y == 0 ? dweight : dbias;
  if (out == nullptr) return;  // uniform over the block
  const float* src = partial + (int64_t)blockIdx.y * nblocks * cols;
  const int c = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < cols) {
#pragma unroll 4
    for (int b = threadIdx.y; b < nblocks; b += 32) s += src[(int64_t)b * cols + c];
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) total += red[i][threadIdx.x];
    out[c] = from_float<T>(total);
  }
}

// ---- launch configuration -------------------------------------------------------------------

struct Config {
  int vpt;    // units per thread
  int tpr;    // threads per row
  int block;  // threads per block (a multiple of tpr)
};

// Rows of up to 32 * vpt_pref units get one warp (vpt = what the row needs); wider rows get
// enough warps for vpt_pref units each (vpt_max when vpt_pref would need more than kMaxTpr).
Config choose_config(int cols, int vpt_pref) {
  const int units = (int)ceil_div(cols, kUnit);
  Config c;
  if (units <= 32 * vpt_pref) {
    c.tpr = 32;
  } else {
    c.tpr = (int)ceil_div(ceil_div(units, vpt_pref), 32) * 32;
    if (c.tpr > kMaxTpr) c.tpr = (int)ceil_div(ceil_div(units, kMaxVpt), 32) * 32;
  }
  c.vpt = (int)ceil_div(units, c.tpr);
  c.block = c.tpr >= kBlockTarget ? c.tpr : c.tpr * (kBlockTarget / c.tpr);
  return c;
}

// Units per thread the forward and backward aim for (rows up to 32 * that many units get one
// warp). The backward keeps x and dy live across its reduction: in fp32 that is twice the
// registers of bf16/fp16, so fp32 gets 3 units (4 would spill).
constexpr int kFwdVpt = 4;
inline int bwd_vpt(DType dtype) { return dtype == DType::kFloat32 ? 3 : 4; }

template <typename F>
cudaError_t vpt_switch(int vpt, F&& f) {
  switch (vpt) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
  }
  return cudaErrorInvalidValue;
}

bool use_vec(int cols, std::initializer_list<const void*> ptrs) {
  if (cols % kUnit != 0) return false;
  for (const void* q : ptrs)
    if (q != nullptr && !is_aligned16(q)) return false;
  return true;
}

size_t bwd_smem_bytes(const Config& c) { return (size_t)2 * c.block * c.vpt * kUnit * sizeof(float); }

// Blocks of the persistent backward: as many as are resident at once, at most one per pass of rows.
template <typename T, int VPT, bool kVec>
cudaError_t bwd_grid(const Config& c, int64_t rows, size_t smem, int* grid) {
  auto kernel = layer_norm_backward_kernel<T, VPT, kVec>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, c.block, smem);
  if (err != cudaSuccess) return err;
  const int64_t want = ceil_div(rows, c.block / c.tpr);
  const int64_t fit = (int64_t)num_sms() * (per_sm > 0 ? per_sm : 1);
  *grid = (int)(want < fit ? want : fit);
  return cudaSuccess;
}

}  // namespace

cudaError_t layer_norm_forward(const void* x, const void* residual, const void* weight, const void* bias, void* y,
                               void* s_out, float* mean, float* rstd, int64_t rows, int64_t cols, float eps,
                               DType dtype, cudaStream_t stream) {
  if (!layernorm::problem_error(cols, dtype).empty() || (residual != nullptr && s_out == nullptr))
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const Config c = choose_config((int)cols, kFwdVpt);
  FwdParams p{x, residual, weight, bias, y, s_out, mean, rstd, rows, (int)cols, c.tpr, eps};
  const bool vec = use_vec((int)cols, {x, residual, weight, bias, y, s_out});
  const int64_t blocks = ceil_div(rows, c.block / c.tpr);
  const unsigned grid = (unsigned)(blocks < INT_MAX ? blocks : INT_MAX);
  return DTYPE_SWITCH(dtype, T, [&] {
    return vpt_switch(c.vpt, [&](auto v) {
      constexpr int VPT = decltype(v)::value;
      return BOOL_SWITCH(vec, kVec, [&] {
        layer_norm_forward_kernel<T, VPT, kVec><<<grid, c.block, 0, stream>>>(p);
        return cudaGetLastError();
      });
    });
  });
}

size_t layer_norm_backward_workspace(int64_t rows, int64_t cols, DType dtype, bool param_grads) {
  if (!param_grads || rows == 0 || !layernorm::problem_error(cols, dtype).empty()) return 0;
  const Config c = choose_config((int)cols, bwd_vpt(dtype));
  const size_t smem = bwd_smem_bytes(c);
  // The vectorised and general kernels may differ in occupancy: size for the larger grid.
  int a = 1, b = 1;
  DTYPE_SWITCH(dtype, T, [&] {
    return vpt_switch(c.vpt, [&](auto v) {
      constexpr int VPT = decltype(v)::value;
      cudaError_t err = bwd_grid<T, VPT, true>(c, rows, smem, &a);
      return err != cudaSuccess ? err : bwd_grid<T, VPT, false>(c, rows, smem, &b);
    });
  });
  const int grid = a > b ? a : b;
  return (size_t)2 * (size_t)(grid > 0 ? grid : 1) * (size_t)cols * sizeof(float);
}

cudaError_t layer_norm_backward(const void* dy, const void* x, const void* weight, const float* mean,
                                const float* rstd, const void* ds, void* dx, void* dweight, void* dbias, int64_t rows,
                                int64_t cols, DType dtype, void* workspace, cudaStream_t stream) {
  if (!layernorm::problem_error(cols, dtype).empty()) return cudaErrorInvalidValue;
  const bool param_grads = dweight != nullptr || dbias != nullptr;
  return DTYPE_SWITCH(dtype, T, [&] {
    if (rows == 0) {  // the parameter gradients of an empty batch are zero
      cudaError_t err = cudaSuccess;
      if (dweight != nullptr) err = cudaMemsetAsync(dweight, 0, cols * sizeof(T), stream);
      if (err == cudaSuccess && dbias != nullptr) err = cudaMemsetAsync(dbias, 0, cols * sizeof(T), stream);
      return err;
    }
    if (param_grads && workspace == nullptr) return cudaErrorInvalidValue;
    const Config c = choose_config((int)cols, bwd_vpt(dtype));
    const bool vec = use_vec((int)cols, {dy, x, weight, ds, dx});
    const size_t smem = param_grads ? bwd_smem_bytes(c) : 0;
    return vpt_switch(c.vpt, [&](auto v) {
      constexpr int VPT = decltype(v)::value;
      return BOOL_SWITCH(vec, kVec, [&] {
        // The grid is computed with the parameter-gradient shared memory whether or not it is
        // used, so it never exceeds what layer_norm_backward_workspace sized.
        int grid = 1;
        cudaError_t err = bwd_grid<T, VPT, kVec>(c, rows, bwd_smem_bytes(c), &grid);
        if (err != cudaSuccess) return err;
        BwdParams p{dy, x, weight, mean, rstd, ds, dx, param_grads ? static_cast<float*>(workspace) : nullptr,
                    rows, (int)cols, c.tpr};
        layer_norm_backward_kernel<T, VPT, kVec><<<grid, c.block, smem, stream>>>(p);
        err = cudaGetLastError();
        if (err != cudaSuccess || !param_grads) return err;
        dim3 rgrid((unsigned)ceil_div(cols, 32), 2), rblock(32, 32);
        layer_norm_param_grad_kernel<T><<<rgrid, rblock, 0, stream>>>(static_cast<const float*>(workspace), grid,
                                                                      (int)cols, (T*)dweight, (T*)dbias);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace gptk
