// flash_api.cu: the attention entry points declared in flash.h and the choice of implementation.
//
// - select_impl: the one place that picks an implementation for an op and a device, from the
//   table below (first matching row wins; opt-in rows only when GPTKERNELS_ATTENTION_IMPL names
//   them). The binding calls it with the tensors' device and puts the result in params.impl.
// - flash_fwd / flash_bwd / flash_decode: check the problem (attention_limits.h: problem_error),
//   then switch on params.impl, dtype and head dim (ATTN_DTYPE_SWITCH, HEADDIM_SWITCH) to a launcher.
// The Hopper forward and backward (Impl::kSm90: wgmma + TMA + warp specialisation) have their row in
// kImpls and `case Impl::kSm90:` in flash_fwd / flash_bwd; their launchers are in csrc/attention/sm90/, compiled for sm_90a
// only and only when 90a is built (setup.py then defines GPTK_HAVE_SM90=1 for every file). Without
// them the row stays in the table, so that GPTKERNELS_ATTENTION_IMPL=sm90 is a known name, but
// serves nothing.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention/flash.h"
#include "static_switch.h"
#if GPTK_HAVE_SM90
#include "attention/sm90/flash_bwd_sm90.h"
#include "attention/sm90/flash_fwd_sm90.h"
#endif

namespace gptk {
namespace attn {
namespace {

struct ImplRow {
  Impl impl;
  const char* name;                // what GPTKERNELS_ATTENTION_IMPL calls it
  const char* what[3];             // per AttnOp (fwd, bwd, decode); nullptr: does not serve that op
  int min_cc, max_cc;              // devices it runs on (major * 10 + minor)
  bool opt_in;                     // chosen only when requested by name: not yet verified on a GPU
  bool built;                      // its sources are in this build (sm90/: only when 90a is built)
  // Forward calls it refuses (within problem_error's limits): a reason, or nullptr when it takes the
  // call. nullptr: takes every call. select_impl then moves on to the next row that serves the op.
  const char* (*refuses)(const FlashFwdParams&);
  const char* (*refuses_bwd)(const FlashBwdParams&);  // the same for backward calls
};

#if GPTK_HAVE_SM90
constexpr bool kHaveSm90 = true;
// The Hopper kernels implement none of the variants (window other than causal, softcap, varlen).
const char* sm90_refuses(const FlashFwdParams& p) {
  if (uses_variant(p)) return "attention variant (sliding window, softcap or varlen)";
  return flash_fwd_sm90_unsupported(p);
}
const char* sm90_refuses_bwd(const FlashBwdParams& p) {
  if (uses_variant(p)) return "attention variant (sliding window, softcap or varlen)";
  return flash_bwd_sm90_unsupported(p);
}
constexpr const char* (*kSm90Refuses)(const FlashFwdParams&) = sm90_refuses;
constexpr const char* (*kSm90RefusesBwd)(const FlashBwdParams&) = sm90_refuses_bwd;
#else
constexpr bool kHaveSm90 = false;
constexpr const char* (*kSm90Refuses)(const FlashFwdParams&) = nullptr;
constexpr const char* (*kSm90RefusesBwd)(const FlashBwdParams&) = nullptr;
#endif

// In order of preference (among the rows that are not opt-in). The sm90 forward and backward are opt-in
// until they have run on a GPU: in the change that records a green device run (CUDA tests of both implementations
// and the benchmark in benchmarks/results/), set its opt_in = false and move it above sm80; "auto"
// then picks it on compute capability 9.0 (sm_90a code runs there only).
constexpr ImplRow kImpls[] = {
    {Impl::kSm80, "sm80", {"mma.sync kernel", "mma.sync kernel", "split-KV decode kernel"}, 80, 1000, false, true,
     nullptr, nullptr},
    {Impl::kSm90, "sm90", {"wgmma/TMA kernel", "wgmma/TMA kernel", nullptr}, 90, 90, true, kHaveSm90, kSm90Refuses,
     kSm90RefusesBwd},
};

const ImplRow* find_row(Impl impl) {
  for (const ImplRow& r : kImpls)
    if (r.impl == impl) return &r;
  return nullptr;
}

// Whether the row's kernel exists for `op` on a device of compute capability `cc` (built or not).
bool covers(const ImplRow& r, AttnOp op, int cc) {
  return r.what[static_cast<int>(op)] != nullptr && cc >= r.min_cc && cc <= r.max_cc;
}

bool serves(const ImplRow& r, AttnOp op, int cc, const FlashFwdParams* call, const FlashBwdParams* bwd = nullptr) {
  return r.built && covers(r, op, cc) && (call == nullptr || r.refuses == nullptr || r.refuses(*call) == nullptr) &&
         (bwd == nullptr || r.refuses_bwd == nullptr || r.refuses_bwd(*bwd) == nullptr);
}


bool is_auto(const char* requested) {
  return requested == nullptr || requested[0] == '\0' || std::strcmp(requested, "auto") == 0;
}

}  // namespace

namespace {
Impl select_row(AttnOp op, int cc, const char* requested, const FlashFwdParams* call, const FlashBwdParams* bwd) {
  if (!is_auto(requested))
    for (const ImplRow& r : kImpls)
      if (std::strcmp(r.name, requested) == 0 && serves(r, op, cc, call, bwd)) return r.impl;
  for (const ImplRow& r : kImpls)
    if (!r.opt_in && serves(r, op, cc, call, bwd)) return r.impl;
  return Impl::kNone;
}
}  // namespace

Impl select_impl(AttnOp op, int cc, const char* requested, const FlashFwdParams* call) {
  return select_row(op, cc, requested, call, nullptr);
}

Impl select_impl(AttnOp op, int cc, const char* requested, const FlashBwdParams* call) {
  return select_row(op, cc, requested, nullptr, call);
}

const char* unknown_impl_error(const char* requested) {
  if (is_auto(requested)) return nullptr;
  for (const ImplRow& r : kImpls)
    if (std::strcmp(r.name, requested) == 0) return nullptr;
  static const std::string names = [] {
    std::string s = "auto";
    for (const ImplRow& r : kImpls) s += std::string(", ") + r.name;
    return s;
  }();
  return names.c_str();
}

const char* impl_name(Impl impl) {
  const ImplRow* r = find_row(impl);
  return r ? r->name : "none";
}

std::string impl_description(Impl impl, AttnOp op) {
  const ImplRow* r = find_row(impl);
  if (r == nullptr || r->what[static_cast<int>(op)] == nullptr) return {};
  return std::string(r->name) + " " + r->what[static_cast<int>(op)];
}

std::string impl_summary(AttnOp op, int cc, const char* requested) {
  const Impl chosen = select_impl(op, cc, requested);
  std::string s = impl_description(chosen, op);
  if (s.empty()) return s;
  const ImplRow& c = *find_row(chosen);
  if (c.opt_in) s += " (opt-in, not verified on a GPU)";
  if (op == AttnOp::kBwd ? c.refuses_bwd != nullptr : c.refuses != nullptr)
    s += "; calls it refuses: " + impl_description(select_impl(op, cc, "auto"), op);
  // The other rows that exist for this op and device, under "auto" or when requested by name.
  for (const ImplRow& r : kImpls) {
    if (r.impl == chosen || !covers(r, op, cc) || !(is_auto(requested) || std::strcmp(r.name, requested) == 0))
      continue;
    const std::string other = impl_description(r.impl, op);
    if (!r.built)
      s += "; " + other + ": not in this build (no sm_90a)";
    else if (r.opt_in)
      s += "; opt-in: " + other + " (not verified on a GPU), GPTKERNELS_ATTENTION_IMPL=" + r.name;
  }
  return s;
}

cudaError_t flash_fwd(FlashFwdParams p, cudaStream_t stream) {
  if (!problem_error(p).empty()) return cudaErrorInvalidValue;
  canonical_variants(p);
  if (p.batch == 0 || p.sq == 0) return cudaSuccess;
  switch (p.impl) {
    case Impl::kSm80:
      return ATTN_DTYPE_SWITCH(p.dtype, T, [&] {
        return HEADDIM_SWITCH(p.d, kHeadDim, [&] {
          return BOOL_SWITCH(p.softcap > 0.f, kSoftcap, [&] { return run_flash_fwd_sm80<T, kHeadDim, kSoftcap>(p, stream); });
        });
      });
#if GPTK_HAVE_SM90
    case Impl::kSm90:  // select_impl chose it for this call (its row's refuses() let it through)
      if (uses_variant(p)) return cudaErrorNotSupported;
      return run_flash_fwd_sm90(p, stream);
#endif
    default:
      return cudaErrorInvalidValue;
  }
}

namespace {
size_t align256(size_t n) { return (n + 255) / 256 * 256; }
}  // namespace

int flash_bwd_head_splits(const FlashBwdParams& p, int num_sms) {
  // The query heads of a GQA group are shared by hs CTAs per key block when one CTA per (key block,
  // K/V head) leaves the GPU partly idle: the smallest divisor hs of the group whose grid fills
  // the last wave to >= 85% (the backward runs one CTA per SM), else the one that fills it best.
  // More slices cost fp32 partial dK/dV traffic (flash_bwd_convert_dkv).
  const int group = p.hkv > 0 ? p.hq / p.hkv : 1;
  const int64_t base = (p.sk + kBwdBlockN - 1) / kBwdBlockN * static_cast<int64_t>(p.batch) * p.hkv;
  if (group <= 1 || base <= 0 || num_sms <= 0) return 1;
  int best = 1;
  double best_eff = 0.0;
  for (int hs = 1; hs <= group; ++hs) {
    if (group % hs != 0) continue;
    const double waves = static_cast<double>(base * hs) / num_sms;
    const double eff = waves / std::ceil(waves);
    if (eff >= 0.85) return hs;
    if (eff > best_eff + 1e-9) best = hs, best_eff = eff;
  }
  return best;
}

int flash_bwd_dq_splits(const FlashBwdParams& p, int num_sms) {
  if (!p.deterministic) return 1;
  const int64_t num_n = (p.sk + kBwdBlockN - 1) / kBwdBlockN;
  const int64_t ctas = static_cast<int64_t>(p.batch) * p.hkv * std::max(p.head_splits, 1);
  int64_t splits = ctas > 0 ? (2LL * num_sms + ctas - 1) / ctas : 1;  // about two CTAs per SM
  splits = std::min<int64_t>(std::min<int64_t>(splits, num_n), 16);
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

size_t flash_bwd_workspace_bytes(const FlashBwdParams& p, int dq_splits) {
  const int64_t sq_pad = (p.sq + kBwdRowPad - 1) / kBwdRowPad * kBwdRowPad;
  const size_t rows = static_cast<size_t>(p.batch) * p.hq * sq_pad;
  const size_t dq = static_cast<size_t>(dq_splits) * q_rows(p) * p.d;
  const size_t dkv = p.head_splits > 1 ? static_cast<size_t>(p.head_splits) * kv_rows(p) * p.d : 0;
  return 2 * align256(rows * sizeof(float)) + align256(dq * sizeof(float)) + 2 * align256(dkv * sizeof(float));
}

cudaError_t flash_bwd(FlashBwdParams p, void* workspace, int dq_splits, cudaStream_t stream) {
  if (!problem_error(p).empty() || dq_splits < 1 || p.head_splits < 1 || (p.hq / p.hkv) % p.head_splits != 0)
    return cudaErrorInvalidValue;
  canonical_variants(p);
  if (p.batch == 0) return cudaSuccess;
  if (p.impl != Impl::kSm80 && p.impl != Impl::kSm90) return cudaErrorInvalidValue;
  const int64_t sq_pad = (p.sq + kBwdRowPad - 1) / kBwdRowPad * kBwdRowPad;
  const size_t rows = static_cast<size_t>(p.batch) * p.hq * sq_pad;
  char* ws = static_cast<char*>(workspace);
  p.lse_log2 = reinterpret_cast<float*>(ws);
  p.delta = reinterpret_cast<float*>(ws + align256(rows * sizeof(float)));
  p.dq_accum = reinterpret_cast<float*>(ws + 2 * align256(rows * sizeof(float)));
  p.dq_splits = dq_splits;
  const size_t dq_bytes = static_cast<size_t>(dq_splits) * q_rows(p) * p.d * sizeof(float);
  const size_t dkv_bytes = static_cast<size_t>(p.head_splits) * kv_rows(p) * p.d * sizeof(float);
  if (p.head_splits > 1) {
    p.dk_accum = reinterpret_cast<float*>(ws + 2 * align256(rows * sizeof(float)) + align256(dq_bytes));
    p.dv_accum = reinterpret_cast<float*>(reinterpret_cast<char*>(p.dk_accum) + align256(dkv_bytes));
  }
  cudaError_t err = dq_bytes ? cudaMemsetAsync(p.dq_accum, 0, dq_bytes, stream) : cudaSuccess;
  if (err != cudaSuccess) return err;
  if ((err = flash_bwd_preprocess(p, stream)) != cudaSuccess) return err;
  switch (p.impl) {
    case Impl::kSm80:
      err = ATTN_DTYPE_SWITCH(p.dtype, T, [&] {
        return HEADDIM_SWITCH(p.d, kHeadDim, [&] {
          return BOOL_SWITCH(p.softcap > 0.f, kSoftcap, [&] { return run_flash_bwd_sm80<T, kHeadDim, kSoftcap>(p, stream); });
        });
      });
      break;
#if GPTK_HAVE_SM90
    case Impl::kSm90:  // select_impl chose it for this call (its row's refuses_bwd() let it through)
      err = run_flash_bwd_sm90(p, stream);
      break;
#endif
    default:
      err = cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  if (p.head_splits > 1 && (err = flash_bwd_convert_dkv(p, stream)) != cudaSuccess) return err;
  return flash_bwd_convert_dq(p, stream);
}

cudaError_t flash_decode(FlashFwdParams p, void* workspace, int num_splits, cudaStream_t stream) {
  if (!problem_error(p).empty() || num_splits < 1 || (num_splits > 1 && workspace == nullptr))
    return cudaErrorInvalidValue;
  canonical_variants(p);
  if (p.batch == 0 || p.sq == 0) return cudaSuccess;
  p.num_splits = num_splits;
  if (num_splits > 1) {
    const size_t rows = static_cast<size_t>(num_splits) * q_rows(p);
    p.o_accum = static_cast<float*>(workspace);
    p.lse_accum = reinterpret_cast<float*>(static_cast<char*>(workspace) + align256(rows * p.d * sizeof(float)));
  }
  switch (p.impl) {
    case Impl::kSm80:
      return ATTN_DTYPE_SWITCH(p.dtype, T, [&] {
        return HEADDIM_SWITCH(p.d, kHeadDim, [&] { return run_flash_decode_sm80<T, kHeadDim>(p, stream); });
      });
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace attn
}  // namespace gptk
