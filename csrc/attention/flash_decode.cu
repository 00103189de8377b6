// flash_decode.cu: the split-KV forward (flash-decoding): a few query rows over a long KV cache
// (decoding, chunked prefill, speculative decoding), with the keys split over many CTAs that each
// produce a partial (output, lse) per row, merged by a combine kernel. Forward only (out, lse),
// the same semantics as flash_fwd.
//
// Two engines, chosen per call by flash_decode:
// - Up to kDecodeMaxRows query rows per K/V head (Sq * Hq/Hkv, e.g. one token of GQA decoding):
//   flash_decode_kernel below, on CUDA cores (a tensor-core tile would be mostly padding).
// - More rows: the tensor-core forward (flash_fwd_kernel.cuh) with its key blocks split over
//   num_splits CTAs, used when one CTA per query tile would leave SMs idle (Sq = 64, B = 1, H = 32
//   is 32 CTAs); num_splits == 1 is the plain forward.
//
// flash_decode_kernel
// - A CTA = (batch, K/V head, group of kDecRows query rows, key split); the rows are the (query head
//   of the GQA group, query position) pairs sharing that K/V head, so K/V is read once for them all.
// - Split ranges come from the real length: each CTA reads kv_lens[b] and the causal limit of its
//   rows, cuts that many keys into stages of kStageKeys, and takes an equal share of the stages.
//   The host sizes num_splits from the cache capacity (it cannot see kv_lens without a sync), so a
//   cache filled to 1 of 4096 runs a few busy splits of one stage each and the rest exit at once
//   (the combine gives them zero weight: lse = -inf).
// - 128 threads; a key is read by kLanes = d/8 lanes holding one 16-byte chunk each, so a pass
//   covers 128/kLanes keys and a stage kUnroll passes. K and V stages are copied with cp.async into
//   a kDecStages-deep ring in shared memory, kDecStages - 1 stages ahead of the math. Each thread
//   copies exactly the chunks it later reads, so the ring needs no barrier: cp.async.wait_group
//   alone makes a thread's own copies visible to it.
// - Scores: per-lane partial dot products reduced over the kLanes lanes with shuffles; an online
//   softmax per row (exp2, the scale folded into q) updated once per stage; the key slots and the
//   4 warps are merged at the end (shuffles, then shared memory).
// - Keys past kv_len are never read (zero-filled by cp.async; a static cache may hold anything
//   there); rows that see no key give zeros and lse = -inf.
// - Variants (flash.h): a sliding window narrows a CTA's key range to [first key its rows' windows
//   reach, last) before it is cut into splits (cost proportional to the window); each key is kept
//   for a row when key - (row + offset) lies in [-wl, wr]. Softcap: score = cap * tanh(score / cap)
//   (in log2 units). Varlen: the sequence's rows from cu_seqlens (seq_bounds), a CTA past its
//   sequence's rows exits at once.
// - num_splits == 1 writes the output directly; otherwise fp32 partial outputs (normalised) and
//   their lse go to a workspace and flash_decode_combine_kernel merges them:
//   out = sum_s exp(lse_s - lse) * o_s with lse = log sum_s exp(lse_s).
#include <algorithm>
#include <climits>

#include "attention/flash.h"
#include "attention/mask.cuh"
#include "attention/mma.cuh"
#include "device.cuh"
#include "static_switch.h"

namespace gptk {
namespace attn {
namespace {

constexpr int kDecThreads = 128;
constexpr int kDecWarps = kDecThreads / 32;
constexpr int kDecRows = 4;     // query rows per CTA
constexpr int kDecStages = 3;   // cp.async ring depth: two stages in flight while one is consumed
constexpr float kDecLog2e = 1.4426950408889634f;
constexpr float kDecLn2 = 0.6931471805599453f;

constexpr int pow2_at_least(int x) { return x <= 1 ? 1 : 2 * pow2_at_least((x + 1) / 2); }

template <int kHeadDim>
struct DecodeConfig {
  // lanes per key, one 16-byte chunk each (a power of two: lanes past d/8 hold zeros)
  static constexpr int kLanes = pow2_at_least(kHeadDim / 8);
  static_assert(kLanes <= 32, "a key's chunks fit in one warp (head dims up to 256)");
  static constexpr int kWidth = kLanes * 8;                    // dims the lanes of a key cover (>= d)
  static constexpr int kKeysPerPass = kDecThreads / kLanes;    // 16 (d=64) or 8 (d=128)
  static constexpr int kUnroll = 2;                            // passes per stage
  static constexpr int kStageKeys = kKeysPerPass * kUnroll;
  static constexpr int kKBytes = kUnroll * kDecThreads * 16;   // one stage of K (= of V): 4 KB
  static_assert(kKBytes == kStageKeys * kWidth * 2, "a stage is whole keys");
};

// kSoftcap: the kernel for params.softcap > 0 (compile-time, so that the other keeps its registers).
template <typename T, int kHeadDim, bool kSoftcap>
__global__ void __launch_bounds__(kDecThreads, 4) flash_decode_kernel(const FlashFwdParams p) {
  using Cfg = DecodeConfig<kHeadDim>;
  constexpr int kL = Cfg::kLanes, kU = Cfg::kUnroll, kStageKeys = Cfg::kStageKeys;
  // The ring (3 x 8 KB); reused after the loop for the cross-warp merge.
  __shared__ __align__(16) char s_ring[kDecStages][2 * Cfg::kKBytes];
  constexpr int kW = Cfg::kWidth;
  static_assert(sizeof(float) * kDecWarps * kDecRows * (kW + 2) <= sizeof(s_ring), "merge fits the ring");
  float (*s_o)[kDecRows][kW] = reinterpret_cast<float (*)[kDecRows][kW]>(&s_ring[0][0]);
  float (*s_ml)[kDecRows][2] =
      reinterpret_cast<float (*)[kDecRows][2]>(&s_ring[0][0] + sizeof(float) * kDecWarps * kDecRows * kW);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slot = tid / kL, l = tid % kL;
  const int group = p.hq / p.hkv;
  const int row_groups = (group * p.sq + kDecRows - 1) / kDecRows;  // (the grid's: Sq the maximum)
  const int split = blockIdx.x % p.num_splits;
  const int rest = blockIdx.x / p.num_splits;
  const int rg = rest % row_groups;
  const int bh = rest / row_groups;
  const int hk = bh % p.hkv, b = bh / p.hkv;
  const SeqBounds sb = seq_bounds(p, b);
  const int sq = sb.sq;
  const int rows_total = group * sq;
  const int row0 = rg * kDecRows;
  if (row0 >= rows_total) return;  // varlen: past this sequence's rows
  const int nrows = min(kDecRows, rows_total - row0);  // valid rows of this CTA (uniform)
  int kv_len = sb.sk;
  if (p.kv_lens != nullptr) kv_len = min(max(p.kv_lens[b], 0), p.sk);
  const int d_chunks = p.d / 8;
  const MaskInfo mask{kv_len, kv_len - sq, p.causal, p.window_left, p.window_right};
  // Row r sees the keys j < kv_len with j - row_pos[r] in [-wl, wr] (mask.cuh); this CTA's rows
  // see keys [n_begin, n_end).
  const int wl = p.window_left < 0 ? INT_MAX : p.window_left, wr = p.window_right < 0 ? INT_MAX : p.window_right;
  int row_pos[kDecRows];
  int n_begin = kv_len, n_end = 0;
#pragma unroll
  for (int r = 0; r < kDecRows; ++r) {
    const int s = (row0 + r) % sq;
    row_pos[r] = s + mask.offset;
    if (r < nrows && mask.start(s) < mask.limit(s)) {
      n_begin = min(n_begin, mask.start(s));
      n_end = max(n_end, mask.limit(s));
    }
  }
  // This split's share of the stages that hold visible keys.
  const int st_begin = n_begin < n_end ? n_begin / kStageKeys : 0;
  const int n_stages = max((n_end + kStageKeys - 1) / kStageKeys - st_begin, 0);
  const int per = (n_stages + p.num_splits - 1) / p.num_splits;
  const int st_lo = st_begin + split * per, st_hi = min(st_lo + per, st_begin + n_stages);
  const int k_end = min(st_hi * kStageKeys, n_end);

  auto out_row = [&](int r, int& h, int& s) {
    const int rr = row0 + r;
    h = hk * group + rr / sq;
    s = rr % sq;
  };
  if (st_lo >= st_hi) {  // no key for this CTA: out = 0 and lse = -inf (a split's share: lse = -inf)
    for (int idx = tid; idx < nrows * p.d; idx += kDecThreads) {
      const int r = idx / p.d, e = idx % p.d;
      int h, s;
      out_row(r, h, s);
      const int64_t row_global = q_row(p, b, h, sb.q_off, s);
      if (p.num_splits == 1) {
        static_cast<T*>(p.o.ptr)[b * p.o.batch_stride + h * p.o.head_stride + (sb.q_off + s) * p.o.row_stride + e] =
            from_float<T>(0.f);
        if (e == 0) p.lse[row_global] = -INFINITY;
      } else if (e == 0) {
        p.lse_accum[split * q_rows(p) + row_global] = -INFINITY;
      }
    }
    return;
  }

  const T* kp = static_cast<const T*>(p.k.ptr) + b * p.k.batch_stride + hk * p.k.head_stride +
                sb.k_off * p.k.row_stride;
  const T* vp = static_cast<const T*>(p.v.ptr) + b * p.v.batch_stride + hk * p.v.head_stride +
                sb.k_off * p.v.row_stride;
  const uint32_t ring = smem_u32(&s_ring[0][0]) + tid * 16;
  // Issue the copies of stage st into ring slot st % kDecStages (none past st_hi), then commit
  // (always, so that the group count stays in step with the stages).
  auto issue = [&](int st) {
    if (st < st_hi) {
      const uint32_t dst = ring + (st % kDecStages) * (2 * Cfg::kKBytes);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int key = st * kStageKeys + u * Cfg::kKeysPerPass + slot;
        const bool ok = key < k_end && l < d_chunks;
        cp_async_16(dst + u * kDecThreads * 16, ok ? kp + key * p.k.row_stride + l * 8 : kp, ok);
        cp_async_16(dst + Cfg::kKBytes + u * kDecThreads * 16, ok ? vp + key * p.v.row_stride + l * 8 : vp, ok);
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int i = 0; i < kDecStages - 1; ++i) issue(st_lo + i);

  // Query rows: q pre-scaled so that scores come out in log2 units (chunk l of each row).
  float q[kDecRows][8];
  const float qscale = kSoftcap ? p.scale / p.softcap * (2.f * kDecLog2e) : p.scale * kDecLog2e;
#pragma unroll
  for (int r = 0; r < kDecRows; ++r) {
    int h, s;
    out_row(r, h, s);
    Pack<T> v;
    if (r < nrows && l < d_chunks) {
      v = load_pack(static_cast<const T*>(p.q.ptr) + b * p.q.batch_stride + h * p.q.head_stride +
                    (sb.q_off + s) * p.q.row_stride + l * 8);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) v.v[j] = from_float<T>(0.f);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) q[r][j] = to_float(v.v[j]) * qscale;
  }

  float m[kDecRows], lsum[kDecRows], o[kDecRows][8];
#pragma unroll
  for (int r = 0; r < kDecRows; ++r) {
    m[r] = -INFINITY;
    lsum[r] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) o[r][j] = 0.f;
  }

  for (int st = st_lo; st < st_hi; ++st) {
    issue(st + kDecStages - 1);
    cp_async_wait<kDecStages - 1>();  // this thread's copies of stage st landed
    const char* buf = &s_ring[st % kDecStages][0] + tid * 16;
    float sc[kU][kDecRows];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const Pack<T> kc = *reinterpret_cast<const Pack<T>*>(buf + u * kDecThreads * 16);
      float kf[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) kf[j] = to_float(kc.v[j]);
      const int key = st * kStageKeys + u * Cfg::kKeysPerPass + slot;
#pragma unroll
      for (int r = 0; r < kDecRows; ++r) {
        if (r >= nrows) break;
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc = fmaf(q[r][j], kf[j], acc);
#pragma unroll
        for (int sh = 1; sh < kL; sh <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, sh);
        if constexpr (kSoftcap) {  // acc = 2 x log2(e), x = score / cap (q's scale): cap tanh(x) in log2 units
          const float cap = p.softcap * kDecLog2e;
          acc = cap - __fdividef(2.f * cap, fast_exp2(acc) + 1.f);  // softcap_tanh, written out
        }
        const int rel = key - row_pos[r];
        sc[u][r] = key < k_end && rel <= wr && rel >= -wl ? acc : -INFINITY;
      }
    }
    float vf[kU][8];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const Pack<T> vc = *reinterpret_cast<const Pack<T>*>(buf + Cfg::kKBytes + u * kDecThreads * 16);
#pragma unroll
      for (int j = 0; j < 8; ++j) vf[u][j] = to_float(vc.v[j]);
    }
#pragma unroll
    for (int r = 0; r < kDecRows; ++r) {
      if (r >= nrows) break;
      float mx = m[r];
#pragma unroll
      for (int u = 0; u < kU; ++u) mx = fmaxf(mx, sc[u][r]);
      if (mx == -INFINITY) continue;  // nothing visible yet for this row in this slot
      const float corr = fast_exp2(m[r] - mx);  // 0 when m was -inf
      m[r] = mx;
      float pu[kU], psum = 0.f;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        pu[u] = fast_exp2(sc[u][r] - mx);
        psum += pu[u];
      }
      lsum[r] = lsum[r] * corr + psum;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float acc = o[r][j] * corr;
#pragma unroll
        for (int u = 0; u < kU; ++u) acc = fmaf(pu[u], vf[u][j], acc);
        o[r][j] = acc;
      }
    }
  }
  cp_async_wait<0>();  // (only empty groups are left; nothing may be in flight into the ring)

  // Merge the key slots of each warp (lanes with the same chunk), then the warps.
#pragma unroll
  for (int r = 0; r < kDecRows; ++r) {
#pragma unroll
    for (int sh = kL; sh < 32; sh <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[r], sh);
      const float l2 = __shfl_xor_sync(0xffffffffu, lsum[r], sh);
      const float mx = fmaxf(m[r], m2);
      const float c1 = mx == -INFINITY ? 0.f : fast_exp2(m[r] - mx);
      const float c2 = mx == -INFINITY ? 0.f : fast_exp2(m2 - mx);
      lsum[r] = lsum[r] * c1 + l2 * c2;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float o2 = __shfl_xor_sync(0xffffffffu, o[r][j], sh);
        o[r][j] = o[r][j] * c1 + o2 * c2;
      }
      m[r] = mx;
    }
  }
  __syncthreads();  // every thread is done with its ring slots: the merge reuses them
  if (lane < kL) {
#pragma unroll
    for (int r = 0; r < kDecRows; ++r) {
      if (lane == 0) {
        s_ml[warp][r][0] = m[r];
        s_ml[warp][r][1] = lsum[r];
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) s_o[warp][r][l * 8 + j] = o[r][j];
    }
  }
  __syncthreads();

  // Final: thread t handles dims e of row r for (r, e) = t, t + 128, ... (the sequence's bounds
  // re-read rather than kept live across the loop)
  const SeqBounds se = seq_bounds(p, static_cast<int>(opaque(static_cast<uint32_t>(b))));
  for (int idx = tid; idx < nrows * kW; idx += kDecThreads) {
    const int r = idx / kW, e = idx % kW;
    if (e >= p.d) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecWarps; ++w) mx = fmaxf(mx, s_ml[w][r][0]);
    float ls = 0.f, acc = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kDecWarps; ++w) {
        const float c = fast_exp2(s_ml[w][r][0] - mx);
        ls += s_ml[w][r][1] * c;
        acc += s_o[w][r][e] * c;
      }
    }
    const bool any = ls > 0.f;
    const float out = any ? acc / ls : 0.f;
    const float lse = any ? (mx + log2f(ls)) * kDecLn2 : -INFINITY;
    const int h = hk * group + (row0 + r) / se.sq, s = (row0 + r) % se.sq;
    const int64_t row_global = q_row(p, b, h, se.q_off, s);
    if (p.num_splits == 1) {
      T* op = static_cast<T*>(p.o.ptr) + b * p.o.batch_stride + h * p.o.head_stride + (se.q_off + s) * p.o.row_stride;
      op[e] = from_float<T>(out);
      if (e == 0) p.lse[row_global] = lse;
    } else {
      const int64_t srow = split * q_rows(p) + row_global;
      p.o_accum[srow * p.d + e] = out;
      if (e == 0) p.lse_accum[srow] = lse;
    }
  }
}

// One warp per output row: merge the splits' partial outputs by their lse (splits that saw no key
// have lse = -inf and weigh nothing; their partial output is never read).
template <typename T>
__global__ void __launch_bounds__(128) flash_decode_combine_kernel(const FlashFwdParams p) {
  const int64_t rows = q_rows(p);
  const int seq = p.cu_seqlens_q != nullptr ? p.total_q : p.sq;  // rows per (batch, head); varlen: one batch
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  float mx = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) mx = fmaxf(mx, p.lse_accum[s * rows + row]);
  float wsum = 0.f;
  if (mx != -INFINITY)
    for (int s = 0; s < p.num_splits; ++s) wsum += __expf(p.lse_accum[s * rows + row] - mx);
  const int sidx = static_cast<int>(row % seq);
  const int64_t bh = row / seq;
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

// The CUDA-core kernel for up to kDecodeMaxRows rows per K/V head, else the tensor-core forward.
bool uses_decode_kernel(const FlashFwdParams& p) {
  return static_cast<int64_t>(p.hq / p.hkv) * p.sq <= kDecodeMaxRows;
}

}  // namespace

// One dtype and head dim; flash_decode() has checked the problem and carved the workspace into
// params (num_splits, o_accum, lse_accum). The CUDA-core kernel or the tensor-core forward, then
// the combine when split.
template <typename T, int kHeadDim>
cudaError_t run_flash_decode_sm80(const FlashFwdParams& p, cudaStream_t stream) {
  cudaError_t err;
  if (uses_decode_kernel(p)) {
    const int64_t row_groups = ceil_div(static_cast<int64_t>(p.hq / p.hkv) * p.sq, kDecRows);
    const int64_t grid = static_cast<int64_t>(p.num_splits) * row_groups * p.batch * p.hkv;
    if (grid > INT_MAX) return cudaErrorInvalidConfiguration;
    if (p.softcap > 0.f)
      flash_decode_kernel<T, kHeadDim, true><<<static_cast<unsigned>(grid), kDecThreads, 0, stream>>>(p);
    else
      flash_decode_kernel<T, kHeadDim, false><<<static_cast<unsigned>(grid), kDecThreads, 0, stream>>>(p);
    err = cudaGetLastError();
  } else {
    err = p.softcap > 0.f ? run_flash_fwd_sm80<T, kHeadDim, true>(p, stream)
                          : run_flash_fwd_sm80<T, kHeadDim, false>(p, stream);
  }
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = q_rows(p);
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

int flash_decode_num_splits(const FlashFwdParams& p_in, int num_sms) {
  FlashFwdParams p = p_in;  // (the window in canonical form, as the launchers see it)
  if (problem_error(p).empty()) canonical_variants(p);
  // Sized from the cache capacity p.sk: the kernels cut the real length (kv_lens) into equal shares
  // themselves, and splits beyond it exit at once.
  int64_t ctas, per_sm, min_keys;
  if (uses_decode_kernel(p)) {
    ctas = static_cast<int64_t>(p.batch) * p.hkv * ceil_div(static_cast<int64_t>(p.hq / p.hkv) * p.sq, kDecRows);
    per_sm = 4;      // ~100 registers and 24 KB of shared memory per CTA: four or more CTAs per SM
    min_keys = 64;   // a few stages per split at least
  } else {
    ctas = static_cast<int64_t>(p.batch) * p.hq * ceil_div(p.sq, kFwdBlockM);
    per_sm = 2;      // 255 registers per thread: two CTAs per SM
    min_keys = 128;  // one or two key blocks per split at least
  }
  if (ctas <= 0 || ctas >= per_sm * num_sms) return 1;
  const int64_t by_sms = ceil_div(per_sm * num_sms, ctas);
  // A window bounded on both sides (canonical: causal is right side 0) caps the keys a CTA's rows
  // see at wl + wr + Sq: no more splits than those keys fill.
  int64_t keys = p.sk;
  if (p.window_left >= 0 && p.window_right >= 0)
    keys = std::min<int64_t>(keys, static_cast<int64_t>(p.window_left) + p.window_right + p.sq);
  const int64_t by_keys = ceil_div(keys, min_keys);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::min(by_sms, by_keys), 64)));
}

size_t flash_decode_workspace_bytes(const FlashFwdParams& p, int num_splits) {
  if (num_splits <= 1) return 0;
  const size_t rows = static_cast<size_t>(num_splits) * q_rows(p);
  return (rows * p.d * sizeof(float) + 255) / 256 * 256 + rows * sizeof(float);
}

}  // namespace attn
}  // namespace gptk
