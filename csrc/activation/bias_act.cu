// bias_act.cu: y = act(x + bias) (GELU tanh / GELU erf / ReLU) and its backward.
//
// Design
// - Memory-bound: read x once, write y once. Each thread moves 16-byte packs when the row
//   length is a multiple of the pack and the pointers are 16-byte aligned; otherwise a scalar
//   path. All math in fp32; 64-bit indexing throughout (tensors over 2^31 elements work).
// - Backward: a 2-D grid. blockIdx.x owns a strip of columns (32 threads x one pack each),
//   blockIdx.y a band of rows. Each thread writes dx for its pack in every 8th row of the band and
//   keeps fp32 column sums; the 8 row-threads of a column are summed in shared memory and the
//   block writes one fp32 partial row per band. A second kernel adds the bands in order, so
//   dbias is deterministic (no atomics).
#include "activation/bias_act.h"
#include "device.cuh"
#include "static_switch.h"

namespace gptk {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoef = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

template <Activation A>
__device__ __forceinline__ float act_fwd(float u) {
  if constexpr (A == Activation::kReLU) {
    return u > 0.f ? u : 0.f;
  } else if constexpr (A == Activation::kGeluTanh) {
    return 0.5f * u * (1.f + tanhf(kSqrt2OverPi * (u + kGeluCoef * u * u * u)));
  } else {
    return 0.5f * u * (1.f + erff(u * kInvSqrt2));
  }
}

// d act(u) / du
template <Activation A>
__device__ __forceinline__ float act_grad(float u) {
  if constexpr (A == Activation::kReLU) {
    return u > 0.f ? 1.f : 0.f;
  } else if constexpr (A == Activation::kGeluTanh) {
    const float t = tanhf(kSqrt2OverPi * (u + kGeluCoef * u * u * u));
    return 0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluCoef * u * u);
  } else {
    return 0.5f * (1.f + erff(u * kInvSqrt2)) + u * kInvSqrt2Pi * __expf(-0.5f * u * u);
  }
}

// ---- forward -------------------------------------------------------------------------------

template <typename T, Activation A>
__global__ void bias_act_forward_vec_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* y, int64_t rows,
                                            int64_t cols) {
  constexpr int N = Pack<T>::N;
  const int64_t packs_per_row = cols / N, total = rows * packs_per_row;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = (i % packs_per_row) * N;
    Pack<T> xv = load_pack(x + i * N), bv = load_pack(bias + c), yv;
#pragma unroll
    for (int j = 0; j < N; ++j) yv.v[j] = from_float<T>(act_fwd<A>(to_float(xv.v[j]) + to_float(bv.v[j])));
    store_pack(y + i * N, yv);
  }
}

template <typename T, Activation A>
__global__ void bias_act_forward_scalar_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* y, int64_t rows,
                                               int64_t cols) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    y[i] = from_float<T>(act_fwd<A>(to_float(x[i]) + to_float(bias[i % cols])));
  }
}

// ---- backward ------------------------------------------------------------------------------

constexpr int kBwdRowThreads = 8;  // threadIdx.y
constexpr int kBwdColThreads = 32;  // threadIdx.x

// VEC: elements per thread along the row (Pack<T>::N on the vector path, 1 on the scalar one).
template <typename T, Activation A, int VEC>
__global__ void __launch_bounds__(kBwdRowThreads* kBwdColThreads)
    bias_act_backward_kernel(const T* dy, const T* __restrict__ x, const T* __restrict__ bias, T* dx,
                             float* __restrict__ partial, int64_t rows, int64_t cols, int64_t rows_per_band) {
  __shared__ float sums[kBwdRowThreads][kBwdColThreads * VEC];
  const int64_t c0 = (blockIdx.x * (int64_t)kBwdColThreads + threadIdx.x) * VEC;
  const int64_t r_begin = blockIdx.y * rows_per_band;
  const int64_t r_end = r_begin + rows_per_band < rows ? r_begin + rows_per_band : rows;
  float acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.f;
  if (c0 < cols) {
    float b[VEC];
    if constexpr (VEC > 1) {
      Pack<T> bv = load_pack(bias + c0);
#pragma unroll
      for (int j = 0; j < VEC; ++j) b[j] = to_float(bv.v[j]);
    } else {
      b[0] = to_float(bias[c0]);
    }
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kBwdRowThreads) {
      const int64_t off = r * cols + c0;
      if constexpr (VEC > 1) {
        Pack<T> xv = load_pack(x + off), dyv = load_pack(dy + off), dxv;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float g = to_float(dyv.v[j]) * act_grad<A>(to_float(xv.v[j]) + b[j]);
          dxv.v[j] = from_float<T>(g);
          acc[j] += g;
        }
        store_pack(dx + off, dxv);
      } else {
        const float g = to_float(dy[off]) * act_grad<A>(to_float(x[off]) + b[0]);
        dx[off] = from_float<T>(g);
        acc[0] += g;
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

template <typename T>
__global__ void sum_bands_kernel(const float* __restrict__ partial, T* __restrict__ out, int64_t bands, int64_t cols) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0.f;
  for (int64_t b = 0; b < bands; ++b) s += partial[b * cols + c];
  out[c] = from_float<T>(s);
}

// Bands of rows for the backward: enough blocks to fill the GPU a few times over, each band
// at least 64 rows so the partial sums stay a small fraction of the traffic.
int64_t backward_bands(int64_t rows, int64_t col_blocks) {
  const int64_t want = (int64_t)num_sms() * 4;
  int64_t bands = ceil_div(want, col_blocks);
  const int64_t max_bands = ceil_div(rows, 64);
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

}  // namespace

cudaError_t bias_act_forward(const void* x, const void* bias, void* y, int64_t rows, int64_t cols, DType dtype,
                             Activation act, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  return DTYPE_SWITCH(dtype, T, [&] {
    return act_switch(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      const int threads = 256;
      const bool vec = use_vec<T>(cols, {x, bias, y});
      const int64_t work = vec ? rows * cols / Pack<T>::N : rows * cols;
      const int64_t max_blocks = (int64_t)num_sms() * 16;
      const int blocks = (int)(ceil_div(work, threads) < max_blocks ? ceil_div(work, threads) : max_blocks);
      if (vec)
        bias_act_forward_vec_kernel<T, A><<<blocks, threads, 0, stream>>>((const T*)x, (const T*)bias, (T*)y, rows, cols);
      else
        bias_act_forward_scalar_kernel<T, A>
            <<<blocks, threads, 0, stream>>>((const T*)x, (const T*)bias, (T*)y, rows, cols);
      return cudaGetLastError();
    });
  });
}

size_t bias_act_backward_workspace(int64_t rows, int64_t cols) {
  // backward_bands() never exceeds either bound, whatever the column blocking.
  int64_t bands = ceil_div(rows, 64);
  if (bands > (int64_t)num_sms() * 4) bands = (int64_t)num_sms() * 4;
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
      const int vec_n = vec ? Pack<T>::N : 1;
      const int64_t col_blocks = ceil_div(cols, (int64_t)kBwdColThreads * vec_n);
      const int64_t bands = backward_bands(rows, col_blocks);
      const int64_t rows_per_band = ceil_div(rows, bands);
      dim3 grid((unsigned)col_blocks, (unsigned)bands), block(kBwdColThreads, kBwdRowThreads);
      float* partial = static_cast<float*>(workspace);
      if (vec)
        bias_act_backward_kernel<T, A, Pack<T>::N><<<grid, block, 0, stream>>>(
            (const T*)dy, (const T*)x, (const T*)bias, (T*)dx, partial, rows, cols, rows_per_band);
      else
        bias_act_backward_kernel<T, A, 1><<<grid, block, 0, stream>>>((const T*)dy, (const T*)x, (const T*)bias,
                                                                      (T*)dx, partial, rows, cols, rows_per_band);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      sum_bands_kernel<T><<<(unsigned)ceil_div(cols, 256), 256, 0, stream>>>(partial, (T*)dbias, bands, cols);
      return cudaGetLastError();
    });
  });
}

}  // namespace gptk
