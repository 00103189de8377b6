// cross_entropy.cu: softmax cross-entropy over rows of logits, loss and logits gradient in one kernel.
//
// Design
// - Memory-bound: at V = 50304, N = 16384 the logits are 1.65 GB in bf16, so the kernel must read
//   them once and write the gradient once (0.77 ms at the H200's 4.27 TB/s copy rate) and spend no
//   other pass over them. The gradient for an upstream gradient of 1 is written in the forward;
//   backward only rescales it, and skips rows whose factor is exactly 1 (scale_rows).
// - One 512-thread CTA per row, two CTAs per SM (__launch_bounds__(512, 2): <= 64 registers).
//   Pass 1 loads the row in 16-byte packs. The first kCached packs of each thread stay in
//   registers (8 packs x 512 threads = 32768 bf16 / 16384 fp32 elements); longer rows stream the
//   rest and re-read it in pass 2, when it is still in L2 (2 CTAs x 132 SMs in flight).
//   Pass 1 gives each thread (max, sum of exp) over its elements (the cached ones in two register
//   sweeps, the streamed ones with the online rescaling); a fixed-order block reduction combines
//   them. Pass 2 writes grad = exp(x - lse) * scale - scale * [i == target] from the same
//   registers. All math fp32, exponentials as ex2.approx in base 2 (x * log2 e folded in an FFMA).
// - Any row alignment: each row is split into a scalar head (up to the first 16-byte boundary),
//   16-byte packs and a scalar tail, so odd vocabularies (50257) keep 128-bit loads. Gradient stores
//   are 128-bit when the gradient row has the logits row's alignment (always, when they share a
//   buffer or both start 16-byte aligned), else scalar.
// - grad may be the logits buffer itself (in place): every element is read by the thread that later
//   writes it, the target logit is read by all threads before the block reduction (a barrier) that
//   precedes the first write, and loads are plain (not the read-only .nc path).
// - Ignored rows (target == ignore_index) and rows with an out-of-range target are never read:
//   loss 0 (ignored) or NaN (out of range), gradient row 0. cross_entropy_prepare counts both
//   beforehand (integer atomics: deterministic) so "mean" needs no host sync, and the binding can
//   report bad targets with a clear error instead of a device assert.
// - 64-bit row offsets (rows * ld may exceed 2^31); a row itself has < 2^31 elements.
#include "device.cuh"
#include "loss/cross_entropy.h"
#include "static_switch.h"

namespace gptk {
namespace {

constexpr int kCeThreads = 512;
constexpr int kCeWarps = kCeThreads / 32;
constexpr int kCeCached = 8;  // 16-byte packs per thread kept in registers between the passes
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float fast_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ int64_t load_target(const void* t, bool is64, int64_t row) {
  return is64 ? static_cast<const int64_t*>(t)[row] : static_cast<int64_t>(static_cast<const int32_t*>(t)[row]);
}

// Plain (coherent) 16-byte load: the gradient may be written into the same buffer.
template <typename T>
__device__ __forceinline__ Pack<T> load16(const T* p) {
  Pack<T> r;
  *reinterpret_cast<int4*>(&r) = *reinterpret_cast<const int4*>(p);
  return r;
}

// Hide a cached pack's value from the optimiser: without this it keeps the fp32 conversions of pass 1
// alive until pass 2 (8 floats per pack instead of 4 registers) and spills. Costs no instruction.
template <typename T>
__device__ __forceinline__ void opaque(Pack<T>& p) {
  uint32_t* w = reinterpret_cast<uint32_t*>(&p);
  asm volatile("" : "+r"(w[0]), "+r"(w[1]), "+r"(w[2]), "+r"(w[3]));
}

// (m, s): max of a set of logits and sum of exp(x - m) over it. Combine two such pairs.
__device__ __forceinline__ void combine(float& m, float& s, float om, float os) {
  const float nm = fmaxf(m, om);
  if (nm == -INFINITY) return;  // both empty
  s = s * fast_ex2((m - nm) * kLog2e) + os * fast_ex2((om - nm) * kLog2e);
  m = nm;
}

// Elements of one row: [0, head) scalars, then nbody packs of VEC, then `tail` scalars.
template <typename T>
struct RowSplit {
  static constexpr int VEC = Pack<T>::N;
  int head, tail, nbody, tail0;  // a row has < 2^31 elements
  __device__ RowSplit(const T* row, int n) {
    const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(row) / sizeof(T)) % VEC);
    head = mis ? VEC - mis : 0;
    if (head > n) head = n;
    nbody = (n - head) / VEC;
    tail0 = head + nbody * VEC;
    tail = n - tail0;
  }
};

template <typename T>
__device__ __forceinline__ void store_row_pack(T* g, bool vec, const Pack<T>& v) {
  if (vec) {
    store_pack(g, v);
  } else {
#pragma unroll
    for (int e = 0; e < Pack<T>::N; ++e) g[e] = v.v[e];
  }
}

template <typename T>
__global__ void __launch_bounds__(kCeThreads, 2) cross_entropy_rows_kernel(CrossEntropyRows p) {
  constexpr int VEC = Pack<T>::N;
  __shared__ float red_m[kCeWarps], red_s[kCeWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int V = static_cast<int>(p.vocab);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* xr = static_cast<const T*>(p.logits) + row * p.ld;
    T* gr = p.grad ? static_cast<T*>(p.grad) + row * p.grad_ld : nullptr;
    const RowSplit<T> sp(xr, V);
    const bool gvec = gr && ((reinterpret_cast<uintptr_t>(gr) & 15) == (reinterpret_cast<uintptr_t>(xr) & 15));
    const int64_t t = load_target(p.target, p.target_int64, row);
    const T* xb = xr + sp.head;
    // Issue the cached loads before branching on the target, so the target's latency overlaps theirs
    // (ignored rows pay a read they do not need; they are rare).
    Pack<T> cache[kCeCached];
#pragma unroll
    for (int j = 0; j < kCeCached; ++j) {
      const int q = tid + j * kCeThreads;
      if (q < sp.nbody) cache[j] = load16(xb + q * VEC);
    }
#pragma unroll
    for (int j = 0; j < kCeCached; ++j) opaque(cache[j]);  // keeps the compiler from sinking the loads
    const bool ignored = t == p.ignore_index;
    if (ignored || t < 0 || t >= V) {  // uniform across the block
      if (tid == 0) p.losses[row] = ignored ? 0.f : __int_as_float(0x7fc00000);
      if (gr) {
        Pack<T> z;
#pragma unroll
        for (int e = 0; e < VEC; ++e) z.v[e] = from_float<T>(0.f);
        for (int q = tid; q < sp.nbody; q += kCeThreads) store_row_pack(gr + sp.head + q * VEC, gvec, z);
        if (tid < sp.head) gr[tid] = from_float<T>(0.f);
        if (tid < sp.tail) gr[sp.tail0 + tid] = from_float<T>(0.f);
      }
      continue;  // in place too: each thread zeroes only the packs it loaded itself, after loading them
    }
    const int ti = static_cast<int>(t);
    const float x_target = to_float(xr[ti]);  // read before the barrier that precedes any in-place write

    // ---- pass 1: (max, sum exp) of this thread's elements ----
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kCeCached; ++j) {
      const int q = tid + j * kCeThreads;
      if (q < sp.nbody) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) m = fmaxf(m, to_float(cache[j].v[e]));
      }
    }
    const float x_head = tid < sp.head ? to_float(xr[tid]) : -INFINITY;
    const float x_tail = tid < sp.tail ? to_float(xr[sp.tail0 + tid]) : -INFINITY;
    m = fmaxf(m, fmaxf(x_head, x_tail));
#pragma unroll
    for (int j = 0; j < kCeCached; ++j) opaque(cache[j]);
    float s = 0.f;
    {
      const float m2 = m == -INFINITY ? 0.f : m * kLog2e;
#pragma unroll
      for (int j = 0; j < kCeCached; ++j) {
        const int q = tid + j * kCeThreads;
        if (q < sp.nbody) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) s += fast_ex2(fmaf(to_float(cache[j].v[e]), kLog2e, -m2));
        }
      }
      s += fast_ex2(fmaf(x_head, kLog2e, -m2)) + fast_ex2(fmaf(x_tail, kLog2e, -m2));  // -inf -> 0
    }
#pragma unroll 2
    for (int q = tid + kCeCached * kCeThreads; q < sp.nbody; q += kCeThreads) {
      const Pack<T> v = load16(xb + q * VEC);
      float pm = -INFINITY;
#pragma unroll
      for (int e = 0; e < VEC; ++e) pm = fmaxf(pm, to_float(v.v[e]));
      if (pm > m) {
        s *= fast_ex2((m - pm) * kLog2e);
        m = pm;
      }
      const float m2 = m == -INFINITY ? 0.f : m * kLog2e;
#pragma unroll
      for (int e = 0; e < VEC; ++e) s += fast_ex2(fmaf(to_float(v.v[e]), kLog2e, -m2));
    }

    // ---- block reduction of (m, s), fixed order ----
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, m, o), os = __shfl_xor_sync(0xffffffffu, s, o);
      combine(m, s, om, os);
    }
    if (lane == 0) {
      red_m[warp] = m;
      red_s[warp] = s;
    }
    __syncthreads();
    m = lane < kCeWarps ? red_m[lane] : -INFINITY;
    s = lane < kCeWarps ? red_s[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, m, o), os = __shfl_xor_sync(0xffffffffu, s, o);
      combine(m, s, om, os);
    }
    __syncthreads();  // red_m / red_s are reused by the next row
    // loss = logsumexp - x[t] = (m - x[t]) + ln(s)
    const float log2_s = __log2f(s);
    if (tid == 0) p.losses[row] = (m - x_target) + log2_s * kLn2;
    if (!gr) continue;

    // ---- pass 2: grad = exp(x - lse) * scale - scale * [i == t] ----
    float scale = 1.f, log2_scale = 0.f;
    if (p.reduction == CeReduction::kMean) {
      const float n_valid = static_cast<float>(p.status[0]);  // >= 1: this row is valid
      scale = 1.f / n_valid;
      log2_scale = -__log2f(n_valid);
    }
    const float c = m * kLog2e + log2_s - log2_scale;  // grad_i + [i == t] scale = 2^(x_i log2e - c)
    const int t_body = ti - sp.head;  // the target's index relative to the packs
#pragma unroll
    for (int j = 0; j < kCeCached; ++j) opaque(cache[j]);
    T* gb = gr + sp.head;
#pragma unroll
    for (int j = 0; j < kCeCached; ++j) {
      const int q = tid + j * kCeThreads;
      if (q < sp.nbody) {
        Pack<T> o;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          float g = fast_ex2(fmaf(to_float(cache[j].v[e]), kLog2e, -c));
          if (q * VEC + e == t_body) g -= scale;
          o.v[e] = from_float<T>(g);
        }
        store_row_pack(gb + q * VEC, gvec, o);
      }
    }
    if (tid < sp.head) gr[tid] = from_float<T>(fast_ex2(fmaf(x_head, kLog2e, -c)) - (tid == ti ? scale : 0.f));
    if (tid < sp.tail) {
      const int i = sp.tail0 + tid;
      gr[i] = from_float<T>(fast_ex2(fmaf(x_tail, kLog2e, -c)) - (i == ti ? scale : 0.f));
    }
#pragma unroll 2
    for (int q = tid + kCeCached * kCeThreads; q < sp.nbody; q += kCeThreads) {
      const Pack<T> v = load16(xb + q * VEC);  // from L2: read in pass 1 moments ago
      Pack<T> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        float g = fast_ex2(fmaf(to_float(v.v[e]), kLog2e, -c));
        if (q * VEC + e == t_body) g -= scale;
        o.v[e] = from_float<T>(g);
      }
      store_row_pack(gb + q * VEC, gvec, o);
    }
  }
}

// ---- target counting ---------------------------------------------------------------------------

constexpr int kPrepThreads = 256;

__global__ void __launch_bounds__(kPrepThreads) cross_entropy_prepare_kernel(const void* target, bool is64,
                                                                             int64_t rows, int64_t vocab,
                                                                             int64_t ignore_index,
                                                                             unsigned long long* status) {
  unsigned long long n_valid = 0, n_bad = 0, first = 0;
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows; r += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = load_target(target, is64, r);
    if (t == ignore_index) continue;
    if (t < 0 || t >= vocab) {
      ++n_bad;
      const unsigned long long f = static_cast<unsigned long long>(rows - r);
      first = f > first ? f : first;
    } else {
      ++n_valid;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    n_valid += __shfl_xor_sync(0xffffffffu, n_valid, o);
    n_bad += __shfl_xor_sync(0xffffffffu, n_bad, o);
    const unsigned long long f = __shfl_xor_sync(0xffffffffu, first, o);
    first = f > first ? f : first;
  }
  if ((threadIdx.x & 31) == 0) {
    if (n_valid) atomicAdd(&status[0], n_valid);
    if (n_bad) {
      atomicAdd(&status[1], n_bad);
      atomicMax(&status[2], first);
    }
  }
}

// ---- loss reduction ----------------------------------------------------------------------------

constexpr int kReduceThreads = 1024;

__global__ void __launch_bounds__(kReduceThreads) cross_entropy_reduce_kernel(const float* __restrict__ losses,
                                                                              int64_t rows,
                                                                              const int64_t* __restrict__ status,
                                                                              bool mean, float* __restrict__ out) {
  __shared__ float shared[kReduceThreads / 32];
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < rows; i += kReduceThreads) acc += losses[i];
  const float sum = block_sum(acc, shared);
  if (threadIdx.x == 0) out[0] = mean ? sum / static_cast<float>(status[0]) : sum;  // 0/0 = NaN, as torch
}

// ---- backward: rescale the stored gradient -----------------------------------------------------

constexpr int kScaleThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kScaleThreads) scale_rows_kernel(T* g, int64_t ld, int64_t rows, int64_t cols,
                                                                   const float* __restrict__ scale, bool per_row) {
  constexpr int VEC = Pack<T>::N;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float s = scale[per_row ? row : 0];
    if (s == 1.f) continue;  // uniform across the block
    T* gr = g + row * ld;
    const RowSplit<T> sp(gr, static_cast<int>(cols));
    T* gb = gr + sp.head;
    for (int q = threadIdx.x; q < sp.nbody; q += kScaleThreads) {
      Pack<T> v = load16(gb + q * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v.v[e] = from_float<T>(to_float(v.v[e]) * s);
      store_pack(gb + q * VEC, v);
    }
    if (threadIdx.x < sp.head) gr[threadIdx.x] = from_float<T>(to_float(gr[threadIdx.x]) * s);
    if (threadIdx.x < sp.tail) gr[sp.tail0 + threadIdx.x] = from_float<T>(to_float(gr[sp.tail0 + threadIdx.x]) * s);
  }
}

unsigned grid_for_rows(int64_t rows, int64_t cap) {
  const int64_t g = rows < cap ? rows : cap;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

}  // namespace

cudaError_t cross_entropy_prepare(const void* target, bool target_int64, int64_t rows, int64_t vocab,
                                  int64_t ignore_index, int64_t* status, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(status, 0, 3 * sizeof(int64_t), stream);
  if (err != cudaSuccess || rows == 0) return err;
  const int64_t blocks = ceil_div(rows, kPrepThreads);
  const int64_t cap = (int64_t)num_sms() * 4;
  cross_entropy_prepare_kernel<<<(unsigned)(blocks < cap ? blocks : cap), kPrepThreads, 0, stream>>>(
      target, target_int64, rows, vocab, ignore_index, reinterpret_cast<unsigned long long*>(status));
  return cudaGetLastError();
}

cudaError_t cross_entropy_rows(const CrossEntropyRows& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (p.vocab <= 0 || p.ld < p.vocab || (p.grad && p.grad_ld < p.vocab)) return cudaErrorInvalidValue;
  return DTYPE_SWITCH(p.dtype, T, [&] {
    cross_entropy_rows_kernel<T><<<grid_for_rows(p.rows, 0x7fffffff), kCeThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t cross_entropy_reduce(const float* losses, int64_t rows, const int64_t* status, bool mean, float* out,
                                 cudaStream_t stream) {
  cross_entropy_reduce_kernel<<<1, kReduceThreads, 0, stream>>>(losses, rows, status, mean, out);
  return cudaGetLastError();
}

cudaError_t scale_rows(void* g, int64_t ld, int64_t rows, int64_t cols, const float* scale, bool per_row,
                       DType dtype, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  return DTYPE_SWITCH(dtype, T, [&] {
    scale_rows_kernel<T><<<grid_for_rows(rows, (int64_t)num_sms() * 8), kScaleThreads, 0, stream>>>(
        static_cast<T*>(g), ld, rows, cols, scale, per_row);
    return cudaGetLastError();
  });
}

}  // namespace gptk
