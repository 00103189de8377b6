// attention_binding.cpp: torch ops gptkernels::flash_attn_fwd / flash_attn_bwd / flash_attn_decode (and
// attention_impl: which implementation an op would use on a given GPU).
//
// Variants (issue 16; semantics in flash.h): every op takes window_left / window_right / softcap
// (trailing, defaulted: older calls keep working), and flash_attn_varlen_{fwd,bwd,decode} take packed
// sequences (q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_seqlens int32 [B + 1]). Here: the tensor
// facts and value ranges of the arguments; the values inside cu_seqlens are Python's to check (that
// needs a host sync), the kernels only clamp them so that they never read out of bounds.
//
// flash_attn_decode is the split-KV forward (flash_decode.cu; no autograd): gptkernels.ops.flash_attention
// routes every call that needs no gradient to it, and it splits the keys when too few CTAs would run.
//
// Tensors arrive in the caller's layout ("bhsd" = (B, H, S, D) or "bshd" = (B, S, H, D)); the kernels
// see (B, H, S, D) views with arbitrary batch/head/row strides, so nothing is transposed or copied
// unless a tensor breaks the kernels' alignment rules (last dim contiguous, 16-byte aligned base
// and strides in multiples of 8 elements), in which case a contiguous copy is made here.
// Outputs are contiguous in the caller's layout (a bshd output views as (B, S, H*D) for free).
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>

#include "attention/flash.h"
#include "binding.h"

namespace gptk {
namespace {

using attn::TensorRef;

bool parse_layout(const std::string& layout) {
  TORCH_CHECK(layout == "bhsd" || layout == "bshd", "layout: expected 'bhsd' or 'bshd', got '", layout, "'");
  return layout == "bshd";
}

// The window / softcap arguments into params (after the tensors' checks): the values checked here
// with a message naming the argument, then canonical (flash.h) so that select_impl sees the final form.
template <typename Params>
void set_variants(Params& p, int64_t window_left, int64_t window_right, double softcap) {
  const std::string why = attn::variant_error(window_left, window_right, softcap, p.causal);
  TORCH_CHECK(why.empty(), "gptkernels attention: ", why);
  // (a side wider than any sequence reaches every key: canonical_variants drops it)
  p.window_left = static_cast<int>(std::min<int64_t>(window_left, attn::kMaxSeqLen + 1));
  p.window_right = static_cast<int>(std::min<int64_t>(window_right, attn::kMaxSeqLen + 1));
  p.softcap = static_cast<float>(softcap);
  attn::canonical_variants(p);
}

// (B, H, S, D) view of a tensor given in the caller's layout.
at::Tensor bhsd_view(const at::Tensor& t, bool bshd) { return bshd ? t.transpose(1, 2) : t; }

// Last dim contiguous, 16-byte aligned base, other strides multiples of 8 elements (4-D (B, H, S, D)
// views, or 3-D (total, H, D) varlen tensors).
bool kernel_friendly(const at::Tensor& t) {
  const int last = static_cast<int>(t.dim()) - 1;
  if (t.stride(last) != 1 && t.size(last) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int i = 0; i < last; ++i)
    if (t.stride(i) % 8 != 0 && t.size(i) != 1) return false;
  return true;
}

// The tensor itself when the kernels can read it in place, else a contiguous copy (same layout).
at::Tensor prepare(const at::Tensor& t, bool bshd) {
  return kernel_friendly(bhsd_view(t, bshd)) ? t : t.contiguous();
}

// A varlen tensor (total, H, D): rows are the packed tokens (the kernels add cu_seqlens offsets),
// no batch stride.
TensorRef varlen_ref(const at::Tensor& t) {
  TensorRef r;
  r.ptr = t.data_ptr();
  r.head_stride = t.size(1) == 1 ? 0 : t.stride(1);
  r.row_stride = t.size(0) == 1 ? 0 : t.stride(0);
  return r;
}

at::Tensor prepare_varlen(const at::Tensor& t) { return kernel_friendly(t) ? t : t.contiguous(); }

TensorRef ref_of(const at::Tensor& t_user, bool bshd) {
  const at::Tensor t = bhsd_view(t_user, bshd);
  TensorRef r;
  r.ptr = t.data_ptr();
  r.batch_stride = t.size(0) == 1 ? 0 : t.stride(0);
  r.head_stride = t.size(1) == 1 ? 0 : t.stride(1);
  r.row_stride = t.size(2) == 1 ? 0 : t.stride(2);
  return r;
}

// GPTKERNELS_ATTENTION_IMPL: "auto" (default) or an implementation's name (flash_api.cu).
const char* requested_impl() {
  const char* r = std::getenv("GPTKERNELS_ATTENTION_IMPL");
  const char* known = attn::unknown_impl_error(r);
  TORCH_CHECK(known == nullptr, "GPTKERNELS_ATTENTION_IMPL=", r, ": expected one of ", known);
  return r;
}

// The implementation that runs `op` on the tensors' device (select_impl, from its compute capability;
// implementations that refuse the call -- forward or backward params -- are passed over).
template <typename Params>
attn::Impl impl_for(attn::AttnOp op, const at::Tensor& t, const Params* call) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(t.device().index());
  const int cc = prop->major * 10 + prop->minor;
  const attn::Impl impl = attn::select_impl(op, cc, requested_impl(), call);
  TORCH_CHECK(impl != attn::Impl::kNone, "gptkernels attention: no kernel for this GPU (compute capability ",
              prop->major, ".", prop->minor, "); the kernels need sm_80 or newer");
  return impl;
}

struct Shapes {
  int64_t b, hq, hkv, sq, sk, d;
};

// Checks the tensor facts of q, k, v (given in the caller's layout) and the problem against the
// kernels' limits (attention_limits.h); returns the (B, H, S, D) sizes.
Shapes check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool bshd, double scale) {
  check_cuda(q, "q");
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  check_same_dtype(k, q, "k", "q");
  check_same_dtype(v, q, "v", "q");
  const DType dtype = to_dtype(q, "q");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v: expected 4-D tensors, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  const at::Tensor qb = bhsd_view(q, bshd), kb = bhsd_view(k, bshd), vb = bhsd_view(v, bshd);
  Shapes s{qb.size(0), qb.size(1), kb.size(1), qb.size(2), kb.size(2), qb.size(3)};
  TORCH_CHECK(kb.sizes() == vb.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(kb.size(0) == s.b, "k: batch ", kb.size(0), " does not match q's batch ", s.b);
  TORCH_CHECK(kb.size(3) == s.d, "k: head dim ", kb.size(3), " does not match q's head dim ", s.d);
  const std::string why = attn::problem_error(s.b, s.hq, s.hkv, s.sq, s.sk, s.d, scale, dtype);
  TORCH_CHECK(why.empty(), "gptkernels attention: ", why, " (use the PyTorch paths otherwise)");
  return s;
}

std::optional<at::Tensor> prepare_kv_lens(const std::optional<at::Tensor>& kv_lens, const at::Tensor& q, int64_t b) {
  if (!kv_lens.has_value()) return std::nullopt;
  const at::Tensor& kl = *kv_lens;
  check_same_device(kl, q, "kv_lens", "q");
  TORCH_CHECK(kl.dim() == 1 && kl.size(0) == b, "kv_lens: expected shape [", b, "], got ", kl.sizes());
  TORCH_CHECK(kl.scalar_type() == at::kInt || kl.scalar_type() == at::kLong, "kv_lens: expected int32 or int64, got ",
              kl.scalar_type());
  return kl.to(at::kInt).contiguous();
}

// The problem-size fields FlashFwdParams and FlashBwdParams share.
template <typename Params>
void set_problem(Params& p, const Shapes& s, bool causal, double scale) {
  p.batch = static_cast<int>(s.b);
  p.hq = static_cast<int>(s.hq);
  p.hkv = static_cast<int>(s.hkv);
  p.sq = static_cast<int>(s.sq);
  p.sk = static_cast<int>(s.sk);
  p.d = static_cast<int>(s.d);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
}

attn::FlashFwdParams fwd_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, const Shapes& s, bool bshd, bool causal, double scale,
                                const std::optional<at::Tensor>& kv_lens) {
  attn::FlashFwdParams p;
  p.q = ref_of(q, bshd);
  p.k = ref_of(k, bshd);
  p.v = ref_of(v, bshd);
  p.o = ref_of(out, bshd);
  p.lse = lse.data_ptr<float>();
  p.kv_lens = kv_lens.has_value() ? kv_lens->data_ptr<int>() : nullptr;
  set_problem(p, s, causal, scale);
  p.dtype = to_dtype(q, "q");
  return p;
}

// What the forward and the decode path share: checked inputs, outputs and the kernel params.
// Construct under a CUDAGuard on q's device.
struct ForwardCall {
  at::Tensor q, k, v, out, lse;
  std::optional<at::Tensor> kv_lens;
  attn::FlashFwdParams p;
  ForwardCall(attn::AttnOp op, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, bool causal,
              double scale, const std::string& layout, const std::optional<at::Tensor>& kv_lens_in,
              int64_t window_left, int64_t window_right, double softcap) {
    const bool bshd = parse_layout(layout);
    const Shapes s = check_qkv(q_in, k_in, v_in, bshd, scale);
    q = prepare(q_in, bshd);
    k = prepare(k_in, bshd);
    v = prepare(v_in, bshd);
    kv_lens = prepare_kv_lens(kv_lens_in, q, s.b);
    out = at::empty(q.sizes(), q.options());
    lse = at::empty({s.b, s.hq, s.sq}, q.options().dtype(at::kFloat));
    p = fwd_params(q, k, v, out, lse, s, bshd, causal, scale, kv_lens);
    set_variants(p, window_left, window_right, softcap);
    p.impl = impl_for(op, q, &p);
  }
  // Varlen: q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_seqlens int32 [B + 1].
  ForwardCall(attn::AttnOp op, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
              const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
              double scale, int64_t window_left, int64_t window_right, double softcap);
};

// The checks of a varlen call's q, k, v and cu_seqlens (tensor facts only: no host sync); fills the
// problem fields of params (batch = sequences, sq / sk = the maxima, totals, cu_seqlens pointers).
template <typename Params>
void check_varlen(Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                  const at::Tensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale) {
  check_cuda(q, "q");
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  check_same_dtype(k, q, "k", "q");
  check_same_dtype(v, q, "v", "q");
  const DType dtype = to_dtype(q, "q");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "q, k, v: varlen expects 3-D (total, heads, head_dim) tensors, got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "v: expected the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.size(2) == q.size(2), "k: head dim ", k.size(2), " does not match q's head dim ", q.size(2));
  const struct {
    const at::Tensor& t;
    const char* name;
  } cus[] = {{cu_q, "cu_seqlens_q"}, {cu_k, "cu_seqlens_k"}};
  for (const auto& c : cus) {
    check_same_device(c.t, q, c.name, "q");
    TORCH_CHECK(c.t.scalar_type() == at::kInt, c.name, ": expected int32, got ", c.t.scalar_type());
    TORCH_CHECK(c.t.dim() == 1 && c.t.size(0) >= 1, c.name, ": expected a 1-D tensor of batch + 1 >= 1 entries, got ",
                c.t.sizes());
    TORCH_CHECK(c.t.is_contiguous(), c.name, ": expected a contiguous tensor");
  }
  TORCH_CHECK(cu_k.size(0) == cu_q.size(0), "cu_seqlens_k: expected ", cu_q.size(0),
              " entries (as cu_seqlens_q), got ", cu_k.size(0));
  TORCH_CHECK(max_seqlen_q >= 0, "max_seqlen_q: expected >= 0, got ", max_seqlen_q);
  TORCH_CHECK(max_seqlen_k >= 0, "max_seqlen_k: expected >= 0, got ", max_seqlen_k);
  const int64_t b = cu_q.size(0) - 1;
  const std::string why = attn::problem_error(b, q.size(1), k.size(1), max_seqlen_q, max_seqlen_k, q.size(2), scale, dtype);
  TORCH_CHECK(why.empty(), "gptkernels attention: ", why, " (use the PyTorch paths otherwise)");
  TORCH_CHECK(q.size(0) <= attn::kMaxSeqLen && k.size(0) <= attn::kMaxSeqLen, "q, k: varlen takes at most ",
              attn::kMaxSeqLen, " packed rows, got ", q.size(0), ", ", k.size(0));
  p.batch = static_cast<int>(b);
  p.hq = static_cast<int>(q.size(1));
  p.hkv = static_cast<int>(k.size(1));
  p.sq = static_cast<int>(max_seqlen_q);
  p.sk = static_cast<int>(max_seqlen_k);
  p.d = static_cast<int>(q.size(2));
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.dtype = dtype;
  p.total_q = static_cast<int>(q.size(0));
  p.total_k = static_cast<int>(k.size(0));
  p.cu_seqlens_q = cu_q.data_ptr<int>();
  p.cu_seqlens_k = cu_k.data_ptr<int>();
}

ForwardCall::ForwardCall(attn::AttnOp op, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                         bool causal, double scale, int64_t window_left, int64_t window_right, double softcap) {
  check_varlen(p, q_in, k_in, v_in, cu_q, cu_k, max_seqlen_q, max_seqlen_k, causal, scale);
  q = prepare_varlen(q_in);
  k = prepare_varlen(k_in);
  v = prepare_varlen(v_in);
  out = at::empty(q.sizes(), q.options());
  lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  p.q = varlen_ref(q);
  p.k = varlen_ref(k);
  p.v = varlen_ref(v);
  p.o = varlen_ref(out);
  p.lse = lse.data_ptr<float>();
  set_variants(p, window_left, window_right, softcap);
  p.impl = impl_for(op, q, &p);
}

std::tuple<at::Tensor, at::Tensor> run_fwd(ForwardCall& c) {
  if (c.out.numel() == 0) return {c.out, c.lse};
  check_launch(attn::flash_fwd(c.p, current_stream(c.q)), "flash_attn_fwd");
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor> run_decode(ForwardCall& c) {
  if (c.out.numel() == 0) return {c.out, c.lse};
  const int splits = attn::flash_decode_num_splits(c.p, num_sms());
  const size_t bytes = attn::flash_decode_workspace_bytes(c.p, splits);
  at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, c.q.options().dtype(at::kByte));
  check_launch(attn::flash_decode(c.p, bytes ? ws.data_ptr() : nullptr, splits, current_stream(c.q)),
               "flash_attn_decode");
  return {c.out, c.lse};
}

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, bool causal, double scale,
                                                  const std::string& layout, const std::optional<at::Tensor>& kv_lens,
                                                  bool deterministic, int64_t window_left, int64_t window_right,
                                                  double softcap) {
  (void)deterministic;  // used by the backward only
  c10::cuda::CUDAGuard guard(q_in.device());
  ForwardCall c(attn::AttnOp::kFwd, q_in, k_in, v_in, causal, scale, layout, kv_lens, window_left, window_right,
                softcap);
  return run_fwd(c);
}

std::tuple<at::Tensor, at::Tensor> flash_attn_decode(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, bool causal, double scale,
                                                     const std::string& layout,
                                                     const std::optional<at::Tensor>& kv_lens, int64_t window_left,
                                                     int64_t window_right, double softcap) {
  c10::cuda::CUDAGuard guard(q_in.device());
  ForwardCall c(attn::AttnOp::kDecode, q_in, k_in, v_in, causal, scale, layout, kv_lens, window_left, window_right,
                softcap);
  return run_decode(c);
}

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                         int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                                         double scale, int64_t window_left, int64_t window_right,
                                                         double softcap, bool deterministic) {
  (void)deterministic;  // used by the backward only
  c10::cuda::CUDAGuard guard(q.device());
  ForwardCall c(attn::AttnOp::kFwd, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                window_left, window_right, softcap);
  return run_fwd(c);
}

std::tuple<at::Tensor, at::Tensor> flash_attn_varlen_decode(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                            const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                            int64_t max_seqlen_k, bool causal, double scale,
                                                            int64_t window_left, int64_t window_right, double softcap) {
  c10::cuda::CUDAGuard guard(q.device());
  ForwardCall c(attn::AttnOp::kDecode, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                scale, window_left, window_right, softcap);
  return run_decode(c);
}

// The backward's checks of out / dout / lse / dlse against q (shapes as the forward returned them).
void check_bwd_extras(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                      const std::optional<at::Tensor>& dlse, at::IntArrayRef lse_shape) {
  check_same_device(out, q, "out", "q");
  check_same_device(dout, q, "dout", "q");
  check_same_device(lse, q, "lse", "q");
  check_same_dtype(out, q, "out", "q");
  check_same_dtype(dout, q, "dout", "q");
  TORCH_CHECK(out.sizes() == q.sizes(), "out: expected the shape of q ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout: expected the shape of q ", q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == lse_shape, "lse: expected a float32 tensor of shape ",
              lse_shape, ", got ", lse.scalar_type(), " ", lse.sizes());
  if (dlse.has_value()) {
    check_same_device(*dlse, q, "dlse", "q");
    TORCH_CHECK(dlse->sizes() == lse.sizes(), "dlse: expected the shape of lse ", lse.sizes(), ", got ",
                dlse->sizes());
  }
}

// Workspace, launch and outputs of a backward whose params hold everything but the workspace.
void run_bwd(attn::FlashBwdParams& p, const at::Tensor& q) {
  p.impl = impl_for(attn::AttnOp::kBwd, q, &p);
  p.head_splits = attn::flash_bwd_head_splits(p, num_sms());
  const int splits = attn::flash_bwd_dq_splits(p, num_sms());
  at::Tensor ws = at::empty({static_cast<int64_t>(attn::flash_bwd_workspace_bytes(p, splits))},
                            q.options().dtype(at::kByte));
  check_launch(attn::flash_bwd(p, ws.data_ptr(), splits, current_stream(q)), "flash_attn_bwd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& dlse_in, bool causal,
    double scale, const std::string& layout, bool deterministic, int64_t window_left, int64_t window_right,
    double softcap) {
  const bool bshd = parse_layout(layout);
  const Shapes s = check_qkv(q_in, k_in, v_in, bshd, scale);
  check_bwd_extras(dout_in, q_in, out_in, lse_in, dlse_in, {s.b, s.hq, s.sq});
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = prepare(q_in, bshd), k = prepare(k_in, bshd), v = prepare(v_in, bshd);
  const at::Tensor out = prepare(out_in, bshd), dout = prepare(dout_in, bshd);
  const at::Tensor lse = lse_in.contiguous();
  const std::optional<at::Tensor> dlse =
      dlse_in.has_value() ? std::optional<at::Tensor>(dlse_in->to(at::kFloat).contiguous()) : std::nullopt;
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());

  attn::FlashBwdParams p;
  p.q = ref_of(q, bshd);
  p.k = ref_of(k, bshd);
  p.v = ref_of(v, bshd);
  p.o = ref_of(out, bshd);
  p.dout = ref_of(dout, bshd);
  p.dq = ref_of(dq, bshd);
  p.dk = ref_of(dk, bshd);
  p.dv = ref_of(dv, bshd);
  p.lse = lse.data_ptr<float>();
  p.dlse = dlse.has_value() ? dlse->data_ptr<float>() : nullptr;
  set_problem(p, s, causal, scale);
  p.deterministic = deterministic;
  p.dtype = to_dtype(q, "q");
  set_variants(p, window_left, window_right, softcap);
  if (s.b == 0 || (dq.numel() == 0 && dk.numel() == 0)) return {dq, dk, dv};
  run_bwd(p, q);
  return {dq, dk, dv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_varlen_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& dlse_in,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    bool causal, double scale, int64_t window_left, int64_t window_right, double softcap, bool deterministic) {
  attn::FlashBwdParams p;
  check_varlen(p, q_in, k_in, v_in, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale);
  check_bwd_extras(dout_in, q_in, out_in, lse_in, dlse_in, {q_in.size(1), q_in.size(0)});
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = prepare_varlen(q_in), k = prepare_varlen(k_in), v = prepare_varlen(v_in);
  const at::Tensor out = prepare_varlen(out_in), dout = prepare_varlen(dout_in);
  const at::Tensor lse = lse_in.contiguous();
  const std::optional<at::Tensor> dlse =
      dlse_in.has_value() ? std::optional<at::Tensor>(dlse_in->to(at::kFloat).contiguous()) : std::nullopt;
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  p.q = varlen_ref(q);
  p.k = varlen_ref(k);
  p.v = varlen_ref(v);
  p.o = varlen_ref(out);
  p.dout = varlen_ref(dout);
  p.dq = varlen_ref(dq);
  p.dk = varlen_ref(dk);
  p.dv = varlen_ref(dv);
  p.lse = lse.data_ptr<float>();
  p.dlse = dlse.has_value() ? dlse->data_ptr<float>() : nullptr;
  p.deterministic = deterministic;
  set_variants(p, window_left, window_right, softcap);
  if (p.batch == 0 || (dq.numel() == 0 && dk.numel() == 0)) {
    dk.zero_();  // keys outside every sequence get no gradient (none when there are no sequences)
    dv.zero_();
    return {dq, dk, dv};
  }
  run_bwd(p, q);
  return {dq, dk, dv};
}

// For `gptkernels info` and tests: the implementation `op` ("fwd", "bwd" or "decode") would use on a
// device of compute capability `capability` (e.g. 90), "" when none; honours GPTKERNELS_ATTENTION_IMPL.
// Also names the other implementations for that device: opt-in ones and ones not in this build
// (attn::impl_summary), e.g. "sm80 mma.sync kernel; opt-in: sm90 wgmma/TMA kernel (...)".
std::string attention_impl(const std::string& op, int64_t capability) {
  attn::AttnOp o;
  if (op == "fwd") o = attn::AttnOp::kFwd;
  else if (op == "bwd") o = attn::AttnOp::kBwd;
  else if (op == "decode") o = attn::AttnOp::kDecode;
  else TORCH_CHECK(false, "op: expected 'fwd', 'bwd' or 'decode', got '", op, "'");
  return attn::impl_summary(o, static_cast<int>(capability), requested_impl());
}

}  // namespace
}  // namespace gptk

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def("attention_impl(str op, int capability) -> str", &gptk::attention_impl);
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, str layout, Tensor? kv_lens, "
      "bool deterministic, int window_left=-1, int window_right=-1, float softcap=0.0) -> (Tensor, Tensor)");
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, bool causal, "
      "float scale, str layout, bool deterministic, int window_left=-1, int window_right=-1, "
      "float softcap=0.0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "flash_attn_decode(Tensor q, Tensor k, Tensor v, bool causal, float scale, str layout, Tensor? kv_lens, "
      "int window_left=-1, int window_right=-1, float softcap=0.0) -> (Tensor, Tensor)");
  m.def(
      "flash_attn_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left, int window_right, "
      "float softcap, bool deterministic) -> (Tensor, Tensor)");
  m.def(
      "flash_attn_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, "
      "int window_left, int window_right, float softcap, bool deterministic) -> (Tensor, Tensor, Tensor)");
  m.def(
      "flash_attn_varlen_decode(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left, int window_right, "
      "float softcap) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) {
  m.impl("flash_attn_fwd", &gptk::flash_attn_fwd);
  m.impl("flash_attn_bwd", &gptk::flash_attn_bwd);
  m.impl("flash_attn_decode", &gptk::flash_attn_decode);
  m.impl("flash_attn_varlen_fwd", &gptk::flash_attn_varlen_fwd);
  m.impl("flash_attn_varlen_bwd", &gptk::flash_attn_varlen_bwd);
  m.impl("flash_attn_varlen_decode", &gptk::flash_attn_varlen_decode);
}
