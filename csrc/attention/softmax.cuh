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

template <int MT>
struct OnlineSoftmax {
  float row_max[MT * 2];  // running max of the raw scores (-inf while nothing is visible)
  float row_sum[MT * 2];  // this thread's partial sum of exp2(...) (quad-reduced at the end)

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int r = 0; r < MT * 2; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // s: this block's scores (masked entries -inf), overwritten by the unnormalised probabilities.
  // o: the output accumulator, rescaled to the new running max.
  template <int NT, int DT>
  __device__ __forceinline__ void update(float (&s)[MT][NT][4], float (&o)[MT][DT][4], float scale_log2) {
    float corr[MT * 2];
    exp_scores(s, scale_log2, corr);
    rescale(o, corr);
  }

  // update() in two halves, for kernels whose o is still being accumulated by an asynchronous MMA
  // while the next block's scores are exponentiated (the sm90 forward): exp_scores updates the
  // running max and sums and returns each row's correction factor; rescale applies it to o later.
  template <int NT>
  __device__ __forceinline__ void exp_scores(float (&s)[MT][NT][4], float scale_log2, float (&corr)[MT * 2]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = mt * 2 + h;
        float mx = row_max[r];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        mx = quad_max(mx);
        const float m_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
        corr[r] = fast_exp2(row_max[r] * scale_log2 - m_scaled);  // 0 when the old max was -inf
        row_max[r] = mx;
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
        row_sum[r] = row_sum[r] * corr[r] + sum;
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
  __device__ __forceinline__ void finalize(float (&o)[MT][DT][4], float scale_log2, float (&lse)[MT * 2]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = mt * 2 + h;
        const float sum = quad_sum(row_sum[r]);
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
