// softmax.cuh: online softmax over mma accumulator tiles (device code, shared by the kernels).
//
// A thread holds MT*2 query rows of a warp tile (rows g and g+8 of each of its MT m-tiles, g =
// lane/4); the four threads of a quad (lanes 4g..4g+3) share those rows. Scores stay unscaled in
// the accumulators; exponentials are taken base 2 with the scale folded in:
// p = exp2(s * scale*log2(e) - m * scale*log2(e)), one FFMA + one EX2 per score.
//
// -inf handling: a row whose scores so far are all masked has max -inf; its "scaled max" is taken
// as 0 so exp2(-inf - 0) = 0 (never -inf - -inf = NaN), and its running sum stays 0. At the end a
// row with sum 0 outputs zeros and lse = -inf. The scale must be > 0 (the callers check).
#pragma once

#include <cuda_runtime.h>

#include "attention/mma.cuh"

namespace gptk {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// lo + hi of a register of two 16-bit values (pack2's inverse, summed).
template <typename T>
__device__ __forceinline__ float unpack_sum2(uint32_t w);
template <>
__device__ __forceinline__ float unpack_sum2<__nv_bfloat16>(uint32_t w) {
  return __uint_as_float(w << 16) + __uint_as_float(w & 0xffff0000u);
}
template <>
__device__ __forceinline__ float unpack_sum2<__half>(uint32_t w) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
  return f.x + f.y;
}

// Row state: the running max in registers; the running sums (this thread's partial sums of
// exp2(...), quad-reduced at the end) in shared memory, slot r of this thread at sum[r * kStride]:
// they are touched once per key block, and 2*MT registers next to the accumulators are what decides
// whether the forward's 192 fp32 accumulators fit in 255 registers without spills.
template <int MT, int kStride>
struct OnlineSoftmax {
  float row_max[MT * 2];  // running max of the raw scores (-inf while nothing is visible)

  __device__ __forceinline__ void init(float* sum) {
#pragma unroll
    for (int r = 0; r < MT * 2; ++r) {
      row_max[r] = -INFINITY;
      sum[r * kStride] = 0.f;
    }
  }

  // Row r = 2 mt + h takes this block's scores into its running max; returns the new max times
  // scale_log2 (0 while the row has seen only -inf) and sets corr, the factor that rescales what was
  // accumulated under the old max (0 when the old max was -inf).
  template <int NT>
  __device__ __forceinline__ float new_max(const float (&s)[MT][NT][4], int mt, int h, float scale_log2,
                                           float& corr) {
    const int r = mt * 2 + h;
    float mx = row_max[r];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
    mx = quad_max(mx);
    const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
    corr = fast_exp2(row_max[r] * scale_log2 - m_scaled);
    row_max[r] = mx;
    return m_scaled;
  }

  // s: this block's scores (masked entries -inf). P = the unnormalised probabilities, rounded to T
  // and packed as the A operand of P V wants them: pk[mt][nt][h] = (P[row h][2t], P[row h][2t+1]) of
  // n-tile nt (so an m16k16 A fragment of k-step ks is pk[mt][2ks][0..1], pk[mt][2ks+1][0..1]). Each
  // score is packed as soon as it is exponentiated, so the fp32 scores die one by one instead of all
  // staying live next to the packed copy. o: the output accumulator, rescaled to the new running max.
  template <typename T, int NT, int DT>
  __device__ __forceinline__ void update(float (&s)[MT][NT][4], float (&o)[MT][DT][4], float scale_log2,
                                         uint32_t (&pk)[MT][NT][2], float* row_sum) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = mt * 2 + h;
        float corr;
        const float m_scaled = new_max(s, mt, h, scale_log2, corr);
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          pk[mt][nt][h] = pack2<T>(fast_exp2(fmaf(s[mt][nt][2 * h], scale_log2, -m_scaled)),
                                   fast_exp2(fmaf(s[mt][nt][2 * h + 1], scale_log2, -m_scaled)));
          sum += unpack_sum2<T>(pk[mt][nt][h]);
        }
        row_sum[r * kStride] = row_sum[r * kStride] * corr + sum;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          o[mt][dt][2 * h] *= corr;
          o[mt][dt][2 * h + 1] *= corr;
        }
      }
    }
  }

  // update() in two halves without the packing, for a kernel whose o is still being accumulated by
  // an asynchronous MMA while the next block's scores are exponentiated (the sm90 forward):
  // exp_scores overwrites s with the unnormalised probabilities, updates the running max and sums
  // and returns each row's correction factor; rescale applies it to o later.
  template <int NT>
  __device__ __forceinline__ void exp_scores(float (&s)[MT][NT][4], float scale_log2, float (&corr)[MT * 2],
                                             float* row_sum) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = mt * 2 + h;
        const float m_scaled = new_max(s, mt, h, scale_log2, corr[r]);
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float p = fast_exp2(fmaf(s[mt][nt][2 * h + j], scale_log2, -m_scaled));
            s[mt][nt][2 * h + j] = p;
            sum += p;
          }
        }
        row_sum[r * kStride] = row_sum[r * kStride] * corr[r] + sum;
      }
    }
  }

  template <int DT>
  __device__ __forceinline__ void rescale(float (&o)[MT][DT][4], const float (&corr)[MT * 2]) const {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[mt][dt][0] *= corr[mt * 2];
        o[mt][dt][1] *= corr[mt * 2];
        o[mt][dt][2] *= corr[mt * 2 + 1];
        o[mt][dt][3] *= corr[mt * 2 + 1];
      }
    }
  }

  // Normalise o by the row sums; lse[r] = natural-log log-sum-exp of the scaled scores of row r
  // (-inf for a row that saw no key, whose output is then 0).
  template <int DT>
  __device__ __forceinline__ void finalize(float (&o)[MT][DT][4], float scale_log2, float (&lse)[MT * 2],
                                           const float* row_sum) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = mt * 2 + h;
        const float sum = quad_sum(row_sum[r * kStride]);
        const bool any = sum > 0.f;
        const float inv = any ? 1.f / sum : 0.f;
        lse[r] = any ? (row_max[r] * scale_log2 + log2f(sum)) * kLn2 : -INFINITY;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          o[mt][dt][2 * h] *= inv;
          o[mt][dt][2 * h + 1] *= inv;
        }
      }
    }
  }
};

}  // namespace attn
}  // namespace gptk
