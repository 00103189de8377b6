// words.cuh: N elements of bf16/fp16/fp32 held as the raw 32-bit words they were loaded as, and
// their conversions to and from fp32 (.cu files only).
//
// Why: memory-bound kernels keep loaded data in registers while more loads are in flight or
// across a reduction. As plain words, bf16/fp16 take half the registers of fp32, and the
// compiler does not unpack them early (arrays of __nv_bfloat16 objects measurably raised register
// use and caused spills). Unpack where the values are used:
//   Words<T, 8> w = load_words<T, 8>(p);   // one 16-byte load (two for fp32)
//   float f[8]; to_floats(w, f);
//   store_words(q, from_floats<T, 8>(f));
// `to_floats_opaque` is the same conversion in a form the compiler cannot merge with an earlier
// identical one: use it to convert again after a reduction instead of keeping fp32 copies live.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace gptk {

template <typename T, int N>
struct Words {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  static_assert(N == 1 || (N * sizeof(T)) % 16 == 0, "N elements are whole 16-byte packs, or one element");
  static constexpr int kWords = N * sizeof(T) >= 4 ? N * (int)sizeof(T) / 4 : 1;
  uint32_t w[kWords];
};

// ---- loads and stores ----------------------------------------------------------------------

// N contiguous elements at p (16-byte aligned when N > 1), through the read-only path.
template <typename T, int N>
__device__ __forceinline__ Words<T, N> load_words(const T* p) {
  Words<T, N> r;
  if constexpr (N == 1) {
    if constexpr (sizeof(T) == 2) r.w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
    else r.w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  } else {
#pragma unroll
    for (int h = 0; h < Words<T, N>::kWords / 4; ++h) {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(p) + h);
      r.w[4 * h] = q.x, r.w[4 * h + 1] = q.y, r.w[4 * h + 2] = q.z, r.w[4 * h + 3] = q.w;
    }
  }
  return r;
}

// The first `valid` of N elements at p (any element alignment); the rest read as 0.
template <typename T, int N>
__device__ __forceinline__ Words<T, N> load_words_guarded(const T* p, int valid) {
  Words<T, N> r;
#pragma unroll
  for (int i = 0; i < Words<T, N>::kWords; ++i) r.w[i] = 0u;
  if constexpr (sizeof(T) == 2) {
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < valid) r.w[j / 2] |= (uint32_t)__ldg(q + j) << (16 * (j % 2));
  } else {
    const unsigned int* q = reinterpret_cast<const unsigned int*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < valid) r.w[j] = __ldg(q + j);
  }
  return r;
}

template <typename T, int N>
__device__ __forceinline__ void store_words(T* p, const Words<T, N>& r) {
  if constexpr (N == 1) {
    if constexpr (sizeof(T) == 2) *reinterpret_cast<unsigned short*>(p) = (unsigned short)r.w[0];
    else *reinterpret_cast<unsigned int*>(p) = r.w[0];
  } else {
#pragma unroll
    for (int h = 0; h < Words<T, N>::kWords / 4; ++h)
      reinterpret_cast<uint4*>(p)[h] = make_uint4(r.w[4 * h], r.w[4 * h + 1], r.w[4 * h + 2], r.w[4 * h + 3]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_words_guarded(T* p, const Words<T, N>& r, int valid) {
  if constexpr (sizeof(T) == 2) {
    unsigned short* q = reinterpret_cast<unsigned short*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < valid) q[j] = (unsigned short)(r.w[j / 2] >> (16 * (j % 2)));
  } else {
    unsigned int* q = reinterpret_cast<unsigned int*>(p);
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < valid) q[j] = r.w[j];
  }
}

// ---- conversions ---------------------------------------------------------------------------

template <typename T, int N>
__device__ __forceinline__ void to_floats(const Words<T, N>& r, float (&f)[N]) {
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int j = 0; j < N; ++j) f[j] = __uint_as_float(r.w[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const uint32_t w = r.w[j / 2];
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // bf16 is the top half of an fp32
        f[j] = __uint_as_float(j % 2 ? (w & 0xffff0000u) : (w << 16));
      } else {
        f[j] = __half2float(__ushort_as_half((unsigned short)(j % 2 ? w >> 16 : w & 0xffffu)));
      }
    }
  }
}

template <typename T, int N>
__device__ __forceinline__ void to_floats_opaque(const Words<T, N>& r, float (&f)[N]) {
  if constexpr (std::is_same_v<T, float>) {
    to_floats(r, f);  // nothing to save: fp32 words are the values
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const uint32_t w = r.w[j / 2];
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        if (j % 2) asm volatile("and.b32 %0, %1, 0xffff0000;" : "=f"(f[j]) : "r"(w));
        else asm volatile("shl.b32 %0, %1, 16;" : "=f"(f[j]) : "r"(w));
      } else {
        if (j % 2) asm volatile("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, %1; cvt.f32.f16 %0, hi; }" : "=f"(f[j]) : "r"(w));
        else asm volatile("{ .reg .b16 lo, hi; mov.b32 {lo, hi}, %1; cvt.f32.f16 %0, lo; }" : "=f"(f[j]) : "r"(w));
      }
    }
  }
}

// Round N fp32 values to T (round to nearest even), packed as words.
template <typename T, int N>
__device__ __forceinline__ Words<T, N> from_floats(const float (&f)[N]) {
  Words<T, N> r;
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int j = 0; j < N; ++j) r.w[j] = __float_as_uint(f[j]);
  } else if constexpr (N == 1) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) r.w[0] = __bfloat16_as_ushort(__float2bfloat16_rn(f[0]));
    else r.w[0] = __half_as_ushort(__float2half_rn(f[0]));
  } else {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
        r.w[i] = *reinterpret_cast<const uint32_t*>(&h);
      } else {
        const __half2 h = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
        r.w[i] = *reinterpret_cast<const uint32_t*>(&h);
      }
    }
  }
  return r;
}

}  // namespace gptk
