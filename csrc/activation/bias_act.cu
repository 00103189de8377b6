// bias_act.cu: y = act(x + bias) (GELU tanh / GELU erf / ReLU) and its backward.
//
// Design
// - Memory-bound: read x once, write y once (backward: read x and dy, write dx). 16-byte packs
//   when the row length is a multiple of the pack and the pointers are 16-byte aligned;
//   otherwise a scalar path with the same structure. All math in fp32; 64-bit indexing
//   throughout (tensors over 2^31 elements work).
// - Forward: a grid-stride loop over packs, kUnroll packs per thread per pass, all loaded before
//   any is computed or stored (64 bytes in flight per thread). The column of a pack is stepped
//   incrementally (one 64-bit division per thread, not one per pack). The grid is what fits on
//   the GPU at once.
// - Math: bf16/fp16 outputs use GELU-tanh in its sigmoid form, 0.5u(1 + tanh z) = u / (1 + e^-2z),
//   with the hardware exp2 and reciprocal (relative error ~1e-6, far below the 2^-9 / 2^-12 of
//   the output rounding), so the kernel stays memory-bound; fp32 outputs use the accurate tanhf
//   (and erff, for the exact GELU, in every dtype).
// - Backward: a 2-D grid. blockIdx.x owns a strip of columns (32 threads x one pack each),
//   blockIdx.y a band of rows. Each thread handles rows ty, ty + 8, ... of its band, kUnroll rows
//   per pass (loads first), writes dx and keeps fp32 column sums; the 8 row-threads of a column
//   are summed in shared memory in a fixed order, one fp32 partial row per band. A second kernel
//   adds the bands in a fixed order (32 threads per column, then a fixed tree), so dbias is
//   deterministic (no atomics). Bands are chosen so the grid fills the GPU.
#include "activation/bias_act.h"
#include "device.cuh"
#include "static_switch.h"
#include "words.cuh"

#include <type_traits>

namespace gptk {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoef = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kUnroll = 4;

// sigmoid(2z) = 0.5 (1 + tanh z) with the hardware exp2 and reciprocal (a few ulp). Past
// 2^126 (z < -43.7) it is exactly 0, as 1 + tanh z is in fp32, so u * sigmoid stays -0 for
// very negative u (and NaN for u = -inf, as torch's formula gives).
__device__ __forceinline__ float sigmoid2_fast(float z) {
  const float a = -2.f * kLog2e * z;
  return a > 126.f ? 0.f : __fdividef(1.f, 1.f + exp2f(a));
}

template <Activation A, bool kFast>
__device__ __forceinline__ float act_fwd(float u) {
  if constexpr (A == Activation::kReLU) {
    return u > 0.f ? u : 0.f;
  } else if constexpr (A == Activation::kGeluTanh) {
    const float z = kSqrt2OverPi * u * (1.f + kGeluCoef * u * u);
    if constexpr (kFast) return u * sigmoid2_fast(z);
    return 0.5f * u * (1.f + tanhf(z));
  } else {
    return 0.5f * u * (1.f + erff(u * kInvSqrt2));
  }
}

// d act(u) / du
template <Activation A, bool kFast>
__device__ __forceinline__ float act_grad(float u) {
  if constexpr (A == Activation::kReLU) {
    return u > 0.f ? 1.f : 0.f;
  } else if constexpr (A == Activation::kGeluTanh) {
    const float z = kSqrt2OverPi * u * (1.f + kGeluCoef * u * u);
    const float dz = kSqrt2OverPi * (1.f + 3.f * kGeluCoef * u * u);
    if constexpr (kFast) {
      // 0.5 (1 + t) + 0.5 u (1 - t^2) dz with s = 0.5 (1 + t): 1 - t^2 = 4 s (1 - s).
      const float s = sigmoid2_fast(z);
      return s + 2.f * u * s * (1.f - s) * dz;
    }
    const float t = tanhf(z);
    return 0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * dz;
  } else {
    return 0.5f * (1.f + erff(u * kInvSqrt2)) + u * kInvSqrt2Pi * __expf(-0.5f * u * u);
  }
}

// The fast tanh form for bf16/fp16 outputs only; fp32 outputs keep tanhf.
template <typename T>
constexpr bool kFastMath = !std::is_same_v<T, float>;

// VEC elements of T at p: one 16-byte load (VEC = Pack<T>::N) or one scalar, held as raw words
// until used (words.cuh).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[VEC]) {
  to_floats(load_words<T, VEC>(p), f);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[VEC]) {
  store_words(p, from_floats<T, VEC>(f));
}

// ---- forward -------------------------------------------------------------------------------

// VEC: elements per access (Pack<T>::N on the vector path, 1 on the scalar one). A "pack" below
// is VEC elements; a row has cols / VEC of them.
template <typename T, Activation A, int VEC>
__global__ void __launch_bounds__(256, 4) bias_act_forward_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                                               T* __restrict__ y, int64_t rows, int64_t cols) {
  constexpr bool kFast = kFastMath<T>;
  const int64_t P = cols / VEC, total = rows * P;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  int64_t c = i % P;             // this pack's column (in packs), stepped below
  const int64_t step = stride % P;
  for (; i < total; i += kUnroll * stride) {
    Words<T, VEC> v[kUnroll], b[kUnroll];
    int64_t idx[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      idx[u] = i + u * stride;
      if (idx[u] < total) {
        v[u] = load_words<T, VEC>(x + idx[u] * VEC);
        b[u] = load_words<T, VEC>(bias + c * VEC);
      }
      c += step;
      if (c >= P) c -= P;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (idx[u] < total) {
        float o[VEC], xf[VEC], bf[VEC];
        to_floats(v[u], xf);
        to_floats(b[u], bf);
#pragma unroll
        for (int j = 0; j < VEC; ++j) o[j] = act_fwd<A, kFast>(xf[j] + bf[j]);
        store_vec<T, VEC>(y + idx[u] * VEC, o);
      }
    }
  }
}

// ---- backward ------------------------------------------------------------------------------

constexpr int kBwdRowThreads = 8;   // threadIdx.y
constexpr int kBwdColThreads = 32;  // threadIdx.x

template <typename T, Activation A, int VEC>
__global__ void __launch_bounds__(kBwdRowThreads* kBwdColThreads, 3)
    bias_act_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ bias,
                             T* __restrict__ dx, float* __restrict__ partial, int64_t rows, int64_t cols,
                             int64_t rows_per_band) {
  constexpr bool kFast = kFastMath<T>;
  __shared__ float sums[kBwdRowThreads][kBwdColThreads * VEC];
  const int64_t c0 = (blockIdx.x * (int64_t)kBwdColThreads + threadIdx.x) * VEC;
  const int64_t r_begin = blockIdx.y * rows_per_band;
  const int64_t r_end = r_begin + rows_per_band < rows ? r_begin + rows_per_band : rows;
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  if (c0 < cols) {
    float b[VEC];
    load_vec<T, VEC>(bias + c0, b);
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kUnroll * kBwdRowThreads) {
      Words<T, VEC> xv[kUnroll], gv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t ru = r + u * kBwdRowThreads;
        if (ru < r_end) {
          xv[u] = load_words<T, VEC>(x + ru * cols + c0);
          gv[u] = load_words<T, VEC>(dy + ru * cols + c0);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t ru = r + u * kBwdRowThreads;
        if (ru < r_end) {
          float o[VEC], xf[VEC], gf[VEC];
          to_floats(xv[u], xf);
          to_floats(gv[u], gf);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            o[j] = gf[j] * act_grad<A, kFast>(xf[j] + b[j]);
            acc[j] += o[j];
          }
          store_vec<T, VEC>(dx + ru * cols + c0, o);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) sums[threadIdx.y][threadIdx.x * VEC + j] = acc[j];
  __syncthreads();
  // Sum the 8 row-threads of each column in a fixed order; one fp32 partial row per band.
  const int tid = threadIdx.y * kBwdColThreads + threadIdx.x;
  for (int k = tid; k < kBwdColThreads * VEC; k += kBwdRowThreads * kBwdColThreads) {
    const int64_t c = blockIdx.x * (int64_t)kBwdColThreads * VEC + k;
    if (c < cols) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < kBwdRowThreads; ++i) s += sums[i][k];
      partial[blockIdx.y * cols + c] = s;
    }
  }
}

// out[c] = sum of the `bands` partial rows: thread row ty adds bands ty, ty + 32, ...; the 32
// thread rows are then added in order (fixed order: deterministic).
template <typename T>
__global__ void __launch_bounds__(1024) sum_bands_kernel(const float* __restrict__ partial, T* __restrict__ out,
                                                         int64_t bands, int64_t cols) {
  __shared__ float red[32][33];
  const int64_t c = blockIdx.x * 32LL + threadIdx.x;
  float s = 0.f;
  if (c < cols) {
#pragma unroll 4
    for (int64_t b = threadIdx.y; b < bands; b += 32) s += partial[b * cols + c];
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) t += red[i][threadIdx.x];
    out[c] = from_float<T>(t);
  }
}

// Bands of rows for the backward: enough blocks for `per_sm` resident blocks on every SM, each
// band at least kMinBandRows rows (so every row-thread gets a full unrolled pass).
constexpr int64_t kMinBandRows = kBwdRowThreads * kUnroll;

int64_t backward_bands(int64_t rows, int64_t col_blocks, int per_sm) {
  const int64_t want = (int64_t)num_sms() * (per_sm > 0 ? per_sm : 1);
  int64_t bands = ceil_div(want, col_blocks);
  const int64_t max_bands = ceil_div(rows, kMinBandRows);
  if (bands > max_bands) bands = max_bands;
  return bands < 1 ? 1 : bands;
}

template <typename F>
cudaError_t act_switch(Activation act, F&& f) {
  switch (act) {
    case Activation::kReLU: return f(std::integral_constant<Activation, Activation::kReLU>{});
    case Activation::kGeluTanh: return f(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kGeluErf: return f(std::integral_constant<Activation, Activation::kGeluErf>{});
  }
  return cudaErrorInvalidValue;
}

template <typename T>
bool use_vec(int64_t cols, std::initializer_list<const void*> ptrs) {
  if (cols % Pack<T>::N != 0) return false;
  for (const void* p : ptrs)
    if (!is_aligned16(p)) return false;
  return true;
}

template <typename Kernel>
int blocks_per_sm(Kernel kernel, int threads) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0) != cudaSuccess || n < 1) n = 1;
  return n;
}

}  // namespace

cudaError_t bias_act_forward(const void* x, const void* bias, void* y, int64_t rows, int64_t cols, DType dtype,
                             Activation act, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  return DTYPE_SWITCH(dtype, T, [&] {
    return act_switch(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      const int threads = 256;
      const bool vec = use_vec<T>(cols, {x, bias, y});
      return BOOL_SWITCH(vec, kVec, [&] {
        constexpr int VEC = kVec ? Pack<T>::N : 1;
        auto kernel = bias_act_forward_kernel<T, A, VEC>;
        const int64_t work = ceil_div(rows * (cols / VEC), (int64_t)threads * kUnroll);
        const int64_t fit = (int64_t)num_sms() * blocks_per_sm(kernel, threads);
        const int blocks = (int)(work < fit ? work : fit);
        kernel<<<blocks, threads, 0, stream>>>((const T*)x, (const T*)bias, (T*)y, rows, cols);
        return cudaGetLastError();
      });
    });
  });
}

size_t bias_act_backward_workspace(int64_t rows, int64_t cols) {
  // backward_bands() never exceeds either bound (at most 2048 / 256 = 8 resident blocks per SM).
  int64_t bands = ceil_div(rows, kMinBandRows);
  if (bands > (int64_t)num_sms() * 8) bands = (int64_t)num_sms() * 8;
  return (size_t)(bands < 1 ? 1 : bands) * (size_t)cols * sizeof(float);
}

cudaError_t bias_act_backward(const void* dy, const void* x, const void* bias, void* dx, void* dbias, int64_t rows,
                              int64_t cols, DType dtype, Activation act, void* workspace, cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  return DTYPE_SWITCH(dtype, T, [&] {
    if (rows == 0) {  // dbias of an empty batch is zero
      return cudaMemsetAsync(dbias, 0, cols * sizeof(T), stream);
    }
    return act_switch(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      const bool vec = use_vec<T>(cols, {dy, x, bias, dx});
      return BOOL_SWITCH(vec, kVec, [&] {
        constexpr int VEC = kVec ? Pack<T>::N : 1;
        auto kernel = bias_act_backward_kernel<T, A, VEC>;
        const int threads = kBwdColThreads * kBwdRowThreads;
        const int64_t col_blocks = ceil_div(cols, (int64_t)kBwdColThreads * VEC);
        const int64_t bands = backward_bands(rows, col_blocks, blocks_per_sm(kernel, threads));
        const int64_t rows_per_band = ceil_div(rows, bands);
        dim3 grid((unsigned)col_blocks, (unsigned)bands), block(kBwdColThreads, kBwdRowThreads);
        float* partial = static_cast<float*>(workspace);
        kernel<<<grid, block, 0, stream>>>((const T*)dy, (const T*)x, (const T*)bias, (T*)dx, partial, rows, cols,
                                           rows_per_band);
        cudaError_t err = cudaGetLastError();
        if (err != cudaSuccess) return err;
        sum_bands_kernel<T><<<(unsigned)ceil_div(cols, 32), dim3(32, 32), 0, stream>>>(partial, (T*)dbias, bands, cols);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace gptk
