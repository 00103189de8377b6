// mlp_binding.cpp: torch ops for fused linear layers and the GPT feed-forward block (CUDA).
//
//   linear_act_fwd / linear_act_bwd   y = act(x W^T + b), act in none / gelu_tanh / gelu / relu
//   mlp_fwd / mlp_bwd                 y = act(x W1^T + b1) W2^T + b2 (the FFN), one op each way
//
// The GEMMs run on cuBLASLt (gemm/lt_gemm.cpp) with torch's handle and workspace; the activation
// lives in the GEMM epilogues where cuBLASLt has one, in our bias_act kernels where it does not.
// What each activation saves for backward (`pre`) and how the backward applies its derivative:
//
//   gelu_tanh  fwd GELU_AUX_BIAS: h and pre = u = x W1^T + b1 in one GEMM
//              bwd DGELU_BGRAD on the dX GEMM of layer 2: du = (dy W2) * gelu'(u), db1 = sum du
//   gelu (erf) cuBLASLt's GELU is the tanh form, so: fwd GEMM -> pre = z = x W1^T (no bias), then
//              bias_act (h = gelu(z + b1)); bwd plain dX GEMM -> bias_act_bwd (du, db1)
//   relu       fwd RELU_AUX_BIAS with pre = the ReLU bit mask ([n, H/8] bytes) when H % 128 == 0
//              (cuBLASLt's bit-mask leading dimension), bwd DRELU_BGRAD. Other widths: fwd RELU_BIAS
//              with no aux, bwd plain GEMM -> bias_act_bwd on h (relu'(u) = [h > 0]).
//   always     dW2 and db2 from one GEMM with BGRADB; dW1 and dX plain GEMMs.
// When the forward runs without autograd (save_for_backward=false) no aux is written at all.
//
// Fallback (gemm/lt_torch.h): when cuBLASLt has no algorithm for a fused epilogue, the same result
// comes from a plain GEMM and the epilogue applied separately: a bias add, column sums (BGRADB), or
// our bias_act kernels for the activation and its derivative (from u, z or h as above). The ReLU bit
// mask is cuBLASLt's own format, so a forward that falls back cannot write it: it zeroes `pre` and
// every later backward applies relu' from h instead (a process-wide flag; h is saved anyway).
#include <ATen/ops/zeros.h>

#include <atomic>
#include <optional>

#include "activation/bias_act.h"
#include "binding.h"
#include "gemm/lt_gemm.h"
#include "gemm/lt_torch.h"
#include "mlp/mlp_limits.h"

namespace gptk {
namespace {

enum class LinAct { kNone, kGeluTanh, kGeluErf, kReLU };

LinAct parse_act(const std::string& name, bool allow_none) {
  if (name == "gelu_tanh") return LinAct::kGeluTanh;
  if (name == "gelu") return LinAct::kGeluErf;
  if (name == "relu") return LinAct::kReLU;
  if (name == "none" && allow_none) return LinAct::kNone;
  TORCH_CHECK(false, "activation: expected 'gelu', 'gelu_tanh', 'relu'", allow_none ? " or 'none'" : "", ", got '",
              name, "'");
}

// Set once a forward could not write the ReLU bit mask (see the fallback above).
std::atomic<bool> g_relu_mask_unusable{false};

void check_operand(const at::Tensor& t, const at::Tensor& x, const char* name, int64_t rows, int64_t cols) {
  check_cuda(t, name);
  check_same_device(t, x, name, "x");
  check_same_dtype(t, x, name, "x");
  check_contiguous(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, ": expected shape [", rows, ", ", cols,
              "], got ", t.sizes());
}

void check_vector(const std::optional<at::Tensor>& t, const at::Tensor& x, const char* name, int64_t n) {
  if (!t.has_value()) return;
  check_cuda(*t, name);
  check_same_device(*t, x, name, "x");
  check_same_dtype(*t, x, name, "x");
  check_contiguous(*t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, name, ": expected shape [", n, "], got ", t->sizes());
}

// A bias pointer cuBLASLt and bias_act can read with 16-byte loads: the tensor itself, or an
// aligned copy when it is a view at an odd offset. Undefined when there is no bias.
at::Tensor aligned(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return at::Tensor();
  return (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0) ? *t : t->clone();
}

// The bias, or zeros of `n` features (what bias_act reads when there is none).
at::Tensor bias_or_zeros(const at::Tensor& b, int64_t n, const at::Tensor& x) {
  return b.defined() ? b : at::zeros({n}, x.options());
}

void run_bias_act_fwd(const at::Tensor& z, const at::Tensor& bias, const at::Tensor& h, Activation act) {
  const int64_t cols = z.size(1), rows = z.size(0);
  check_launch(bias_act_forward(z.data_ptr(), bias.data_ptr(), h.data_ptr(), rows, cols, to_dtype(z, "x"), act,
                                current_stream(z)),
               "bias_act_forward");
}

// du = dy * act'(src + bias), dbias = sum over rows of du.
void run_bias_act_bwd(const at::Tensor& dy, const at::Tensor& src, const at::Tensor& bias, const at::Tensor& du,
                      const at::Tensor& dbias, Activation act) {
  const int64_t cols = src.size(1), rows = src.size(0);
  at::Tensor ws = at::empty({(int64_t)bias_act_backward_workspace(rows, cols)}, src.options().dtype(at::kByte));
  check_launch(bias_act_backward(dy.data_ptr(), src.data_ptr(), bias.data_ptr(), du.data_ptr(), dbias.data_ptr(), rows,
                                 cols, to_dtype(src, "x"), act, ws.data_ptr(), current_stream(src)),
               "bias_act_backward");
}

// ---- the three building blocks (fused epilogue, or the fallback) -----------------------------

// h [n, out] = act(x W^T + b) (b undefined: no bias). `pre`, when not empty, receives what the
// backward reads: u = x W^T + b (gelu_tanh), z = x W^T (gelu), the ReLU bit mask (relu).
void linear_act_forward(const LtContext& ctx, DType dt, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                        const at::Tensor& h, const at::Tensor& pre, LinAct act, const char* what) {
  const int64_t n = x.size(0), in = x.size(1), out = w.size(0);
  const bool save = pre.numel() > 0, bias = b.defined();
  auto gemm = [&](void* dst, const LtEpilogue& e) {
    return lt_linear_forward(ctx, dt, x.data_ptr(), w.data_ptr(), dst, n, in, out, out, e);
  };
  auto plain = [&](const at::Tensor& dst) { check_lt(gemm(dst.data_ptr(), LtEpilogue()), what,
                                                     CUBLASLT_EPILOGUE_DEFAULT, n, in, out); };
  LtEpilogue e;
  e.bias = bias ? b.data_ptr() : nullptr;
  switch (act) {
    case LinAct::kNone:
      e.op = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
      if (lt_try_fused(e.op, what, n, in, out, [&] { return gemm(h.data_ptr(), e); })) return;
      plain(h);
      h.add_(b);
      return;
    case LinAct::kGeluTanh: {
      e.op = bias ? (save ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_BIAS)
                  : (save ? CUBLASLT_EPILOGUE_GELU_AUX : CUBLASLT_EPILOGUE_GELU);
      if (save) {
        e.aux = pre.data_ptr();
        e.aux_ld = out;
      }
      if (lt_try_fused(e.op, what, n, in, out, [&] { return gemm(h.data_ptr(), e); })) return;
      const at::Tensor z = save ? pre : at::empty_like(h);
      plain(z);
      run_bias_act_fwd(z, bias_or_zeros(b, out, x), h, Activation::kGeluTanh);
      if (save && bias) pre.add_(b);  // u = z + b, as GELU_AUX_BIAS saves it
      return;
    }
    case LinAct::kGeluErf: {  // cuBLASLt's GELU is the tanh form: always GEMM, then bias_act
      const at::Tensor z = save ? pre : at::empty_like(h);
      plain(z);
      run_bias_act_fwd(z, bias_or_zeros(b, out, x), h, Activation::kGeluErf);
      return;
    }
    case LinAct::kReLU: {
      e.op = bias ? (save ? CUBLASLT_EPILOGUE_RELU_AUX_BIAS : CUBLASLT_EPILOGUE_RELU_BIAS)
                  : (save ? CUBLASLT_EPILOGUE_RELU_AUX : CUBLASLT_EPILOGUE_RELU);
      if (save) {
        e.aux = pre.data_ptr();
        e.aux_ld = out;  // in bits
      }
      if (lt_try_fused(e.op, what, n, in, out, [&] { return gemm(h.data_ptr(), e); })) return;
      const at::Tensor z = at::empty_like(h);
      plain(z);
      run_bias_act_fwd(z, bias_or_zeros(b, out, x), h, Activation::kReLU);
      if (save) {
        g_relu_mask_unusable.store(true);
        pre.zero_();
      }
      return;
    }
  }
}

// du [n, in] = (dy W) * act'(.) and db = sum over rows of du (db undefined: not wanted). src is what
// act' reads: u (gelu_tanh), z with the bias b (gelu), the ReLU bit mask `pre` or else h (relu).
void linear_act_dgrad(const LtContext& ctx, DType dt, const at::Tensor& dy, const at::Tensor& w, const at::Tensor& b,
                      const at::Tensor& pre, const at::Tensor& h, const at::Tensor& du, const at::Tensor& db,
                      LinAct act, const char* what) {
  const int64_t n = dy.size(0), in = w.size(1), out = w.size(0);
  const bool relu_mask = act == LinAct::kReLU && pre.numel() > 0 && !g_relu_mask_unusable.load();
  auto gemm = [&](const at::Tensor& dst, const LtEpilogue& e) {
    return lt_linear_dgrad(ctx, dt, dy.data_ptr(), out, w.data_ptr(), dst.data_ptr(), n, in, out, e);
  };
  if (act == LinAct::kGeluTanh || relu_mask) {
    const bool gelu = act == LinAct::kGeluTanh;
    LtEpilogue e;
    e.op = db.defined() ? (gelu ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DRELU_BGRAD)
                        : (gelu ? CUBLASLT_EPILOGUE_DGELU : CUBLASLT_EPILOGUE_DRELU);
    e.bias_grad = db.defined() ? db.data_ptr() : nullptr;
    e.aux = pre.data_ptr();
    e.aux_ld = in;
    if (lt_try_fused(e.op, what, n, in, out, [&] { return gemm(du, e); })) return;
  }
  TORCH_CHECK(act != LinAct::kNone, "linear_act_dgrad: an activation is required");
  const at::Tensor g = at::empty_like(du);
  check_lt(gemm(g, LtEpilogue()), what, CUBLASLT_EPILOGUE_DEFAULT, n, in, out);
  const at::Tensor zeros = at::zeros({in}, dy.options());
  const at::Tensor db_target = db.defined() ? db : at::empty({in}, dy.options());
  if (act == LinAct::kGeluTanh) run_bias_act_bwd(g, pre, zeros, du, db_target, Activation::kGeluTanh);
  if (act == LinAct::kGeluErf) run_bias_act_bwd(g, pre, bias_or_zeros(b, in, dy), du, db_target, Activation::kGeluErf);
  if (act == LinAct::kReLU) run_bias_act_bwd(g, h, zeros, du, db_target, Activation::kReLU);  // relu'(u) = [h > 0]
}

// ---- linear_act -----------------------------------------------------------------------------

struct LinearShape {
  int64_t n, in, out;
};

// Tensor facts of x, weight, bias, then the GEMMs' rule (mlp_limits.h).
LinearShape check_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_cuda(x, "x");
  check_contiguous(x, "x");
  const DType dt = to_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D [tokens, in_features] tensor, got ", x.sizes());
  LinearShape s{x.size(0), x.size(1), weight.size(0)};
  check_operand(weight, x, "weight", s.out, s.in);
  check_vector(bias, x, "bias", s.out);
  const std::string why = mlp::linear_problem_error(s.in, s.out, dt);
  TORCH_CHECK(why.empty(), "linear_act: ", why);
  return s;
}

std::tuple<at::Tensor, at::Tensor> linear_act_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const std::string& activation,
                                                  bool save_for_backward) {
  const LinAct act = parse_act(activation, /*allow_none=*/true);
  const LinearShape s = check_linear(x, weight, bias);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({s.n, s.out}, x.options());
  const bool keep = save_for_backward && (act == LinAct::kGeluTanh || act == LinAct::kGeluErf);
  at::Tensor aux = keep ? at::empty({s.n, s.out}, x.options()) : at::empty({0}, x.options());
  if (s.n == 0) return {y, aux};
  linear_act_forward(lt_context(x), to_dtype(x, "x"), x, weight, aligned(bias), y, aux, act, "linear_act forward GEMM");
  return {y, aux};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              const at::Tensor& aux, const at::Tensor& y,
                                                              const std::string& activation) {
  const LinAct act = parse_act(activation, /*allow_none=*/true);
  const LinearShape s = check_linear(x, weight, bias);
  const DType dt = to_dtype(x, "x");
  const int64_t n = s.n, in = s.in, out = s.out;
  check_operand(dy, x, "dy", n, out);
  if (act == LinAct::kGeluTanh || act == LinAct::kGeluErf) check_operand(aux, x, "aux (saved pre-activation)", n, out);
  if (act == LinAct::kReLU) check_operand(y, x, "y (saved output)", n, out);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({n, in}, x.options());
  at::Tensor db = bias.has_value() ? at::empty({out}, x.options()) : at::empty({0}, x.options());
  if (n == 0) {
    if (bias.has_value()) db.zero_();
    return {dx, at::zeros({out, in}, x.options()), db};
  }
  at::Tensor dw = at::empty({out, in}, x.options());
  const LtContext ctx = lt_context(x);
  // The derivative comes before this layer's GEMMs: du = dy * act'(.) and db = sum du with bias_act.
  at::Tensor du = dy;
  if (act != LinAct::kNone) {
    du = at::empty_like(dy);
    const at::Tensor zeros = at::zeros({out}, x.options());
    const at::Tensor db_target = bias.has_value() ? db : at::empty({out}, x.options());
    if (act == LinAct::kGeluTanh) run_bias_act_bwd(dy, aux, zeros, du, db_target, Activation::kGeluTanh);
    if (act == LinAct::kGeluErf)
      run_bias_act_bwd(dy, aux, bias_or_zeros(aligned(bias), out, x), du, db_target, Activation::kGeluErf);
    if (act == LinAct::kReLU) run_bias_act_bwd(dy, y, zeros, du, db_target, Activation::kReLU);
  }
  lt_wgrad_bias(ctx, dt, dt, du, out, x.data_ptr(), dw.data_ptr(), n, in, out, false,
                (act == LinAct::kNone && bias.has_value()) ? db : at::Tensor(), "linear_act weight-gradient GEMM");
  check_lt(lt_linear_dgrad(ctx, dt, du.data_ptr(), out, weight.data_ptr(), dx.data_ptr(), n, in, out, LtEpilogue()),
           "linear_act input-gradient GEMM", CUBLASLT_EPILOGUE_DEFAULT, n, in, out);
  return {dx, dw, db};
}

// ---- the feed-forward block ------------------------------------------------------------------

struct MlpShape {
  int64_t n, c, h, o;
};

MlpShape check_mlp(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                   const at::Tensor& w2, const std::optional<at::Tensor>& b2) {
  check_cuda(x, "x");
  check_contiguous(x, "x");
  const DType dt = to_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D [tokens, in_features] tensor, got ", x.sizes());
  MlpShape s{x.size(0), x.size(1), w1.size(0), w2.size(0)};
  check_operand(w1, x, "fc weight", s.h, s.c);
  check_operand(w2, x, "proj weight", s.o, s.h);
  check_vector(b1, x, "fc bias", s.h);
  check_vector(b2, x, "proj bias", s.o);
  const std::string why = mlp::problem_error(s.c, s.h, s.o, dt);
  TORCH_CHECK(why.empty(), "mlp: ", why);
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlp_fwd(const at::Tensor& x, const at::Tensor& w1,
                                                       const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                       const std::optional<at::Tensor>& b2,
                                                       const std::string& activation, bool save_for_backward) {
  const LinAct act = parse_act(activation, /*allow_none=*/false);
  const MlpShape s = check_mlp(x, w1, b1, w2, b2);
  const DType dt = to_dtype(x, "x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h = at::empty({s.n, s.h}, x.options()), y = at::empty({s.n, s.o}, x.options());
  at::Tensor pre = at::empty({0}, x.options());
  const bool relu_mask = act == LinAct::kReLU && save_for_backward && s.h % gemm::kReluMaskMultiple == 0;
  if (save_for_backward && act != LinAct::kReLU) pre = at::empty({s.n, s.h}, x.options());
  if (relu_mask) pre = at::empty({s.n, s.h / 8}, x.options().dtype(at::kByte));
  if (s.n == 0) return {y, pre, h};
  const LtContext ctx = lt_context(x);
  linear_act_forward(ctx, dt, x, w1, aligned(b1), h, pre, act, "mlp fc GEMM");                   // layer 1
  linear_act_forward(ctx, dt, h, w2, aligned(b2), y, at::empty({0}, x.options()), LinAct::kNone,  // layer 2
                     "mlp proj GEMM");
  return {y, pre, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b2, const at::Tensor& pre, const at::Tensor& h,
    const std::string& activation) {
  const LinAct act = parse_act(activation, /*allow_none=*/false);
  const MlpShape s = check_mlp(x, w1, b1, w2, b2);
  const DType dt = to_dtype(x, "x");
  check_operand(dy, x, "dy", s.n, s.o);
  check_operand(h, x, "h (saved hidden activation)", s.n, s.h);
  if (act == LinAct::kGeluTanh || act == LinAct::kGeluErf) {
    check_operand(pre, x, "pre (saved pre-activation)", s.n, s.h);
  } else if (pre.numel() > 0) {
    TORCH_CHECK(pre.is_cuda() && pre.scalar_type() == at::kByte && pre.is_contiguous() && pre.dim() == 2 &&
                    pre.size(0) == s.n && pre.size(1) == s.h / 8 && s.h % gemm::kReluMaskMultiple == 0,
                "pre (saved ReLU bit mask): expected a contiguous uint8 [", s.n, ", ", s.h / 8, "] tensor, got ",
                pre.scalar_type(), " ", pre.sizes());
    check_same_device(pre, x, "pre", "x");
  }
  c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options();
  at::Tensor dx = at::empty({s.n, s.c}, opts);
  at::Tensor db1 = b1.has_value() ? at::empty({s.h}, opts) : at::empty({0}, opts);
  at::Tensor db2 = b2.has_value() ? at::empty({s.o}, opts) : at::empty({0}, opts);
  if (s.n == 0) {
    db1.zero_();
    db2.zero_();
    return {dx, at::zeros({s.h, s.c}, opts), db1, at::zeros({s.o, s.h}, opts), db2};
  }
  at::Tensor dw1 = at::empty({s.h, s.c}, opts), dw2 = at::empty({s.o, s.h}, opts);
  const LtContext ctx = lt_context(x);
  // dW2 = dy^T h and db2 = sum dy, in one GEMM (BGRADB).
  lt_wgrad_bias(ctx, dt, dt, dy, s.o, h.data_ptr(), dw2.data_ptr(), s.n, s.h, s.o, false,
                b2.has_value() ? db2 : at::Tensor(), "mlp proj weight-gradient GEMM");
  // du = (dy W2) * act'(u) and db1 = sum du, in the epilogue of the dX GEMM of layer 2 where it can.
  at::Tensor du = at::empty({s.n, s.h}, opts);
  linear_act_dgrad(ctx, dt, dy, w2, aligned(b1), pre, h, du, b1.has_value() ? db1 : at::Tensor(), act,
                   "mlp proj input-gradient GEMM");
  // dW1 = du^T x, dx = du W1.
  check_lt(lt_linear_wgrad(ctx, dt, dt, du.data_ptr(), s.h, x.data_ptr(), dw1.data_ptr(), s.n, s.c, s.h, false,
                           nullptr),
           "mlp fc weight-gradient GEMM", CUBLASLT_EPILOGUE_DEFAULT, s.n, s.c, s.h);
  check_lt(lt_linear_dgrad(ctx, dt, du.data_ptr(), s.h, w1.data_ptr(), dx.data_ptr(), s.n, s.c, s.h, LtEpilogue()),
           "mlp fc input-gradient GEMM", CUBLASLT_EPILOGUE_DEFAULT, s.n, s.c, s.h);
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace
}  // namespace gptk

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def("linear_act_fwd(Tensor x, Tensor weight, Tensor? bias, str activation, bool save_for_backward) "
        "-> (Tensor, Tensor)");
  m.def("linear_act_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor aux, Tensor y, str activation) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("mlp_fwd(Tensor x, Tensor fc_weight, Tensor? fc_bias, Tensor proj_weight, Tensor? proj_bias, "
        "str activation, bool save_for_backward) -> (Tensor, Tensor, Tensor)");
  m.def("mlp_bwd(Tensor dy, Tensor x, Tensor fc_weight, Tensor? fc_bias, Tensor proj_weight, Tensor? proj_bias, "
        "Tensor pre, Tensor h, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) {
  m.impl("linear_act_fwd", &gptk::linear_act_fwd);
  m.impl("linear_act_bwd", &gptk::linear_act_bwd);
  m.impl("mlp_fwd", &gptk::mlp_fwd);
  m.impl("mlp_bwd", &gptk::mlp_bwd);
}
