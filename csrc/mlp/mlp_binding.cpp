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
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/zeros.h>

#include <optional>

#include "activation/bias_act.h"
#include "binding.h"
#include "gemm/lt_gemm.h"

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

LtContext lt_context(const at::Tensor& x) {
  LtContext c;
  c.handle = at::cuda::getCurrentCUDABlasLtHandle();
  c.workspace = at::cuda::getCUDABlasLtWorkspace();
  c.workspace_size = at::cuda::getCUDABlasLtWorkspaceSize();
  c.stream = current_stream(x);
  c.device = x.device().index();
  return c;
}

void check_lt(cublasStatus_t s, const char* what, cublasLtEpilogue_t epi, int64_t n, int64_t in, int64_t out) {
  TORCH_CHECK(s == CUBLAS_STATUS_SUCCESS, "gptkernels: cuBLASLt ", what, " (epilogue ", lt_epilogue_name(epi),
              ", tokens=", n, ", in=", in, ", out=", out, ") failed: ", lt_status_string(s));
}

DType half_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, name,
              ": the fused linear kernels take float16 or bfloat16, got ", t.scalar_type());
  return to_dtype(t, name);
}

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

void check_features(int64_t f, const char* what) {
  TORCH_CHECK(f % 8 == 0 && f > 0, what, " must be a positive multiple of 8 on the cuBLASLt path, got ", f);
}

// A bias pointer cuBLASLt and bias_act can read with 16-byte loads: the tensor itself, or an
// aligned copy when it is a view at an odd offset.
at::Tensor aligned(const at::Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) ? t : t.clone();
}

void run_bias_act_fwd(const at::Tensor& z, const at::Tensor& bias, const at::Tensor& h, Activation act) {
  const int64_t cols = z.size(1), rows = z.size(0);
  check_launch(bias_act_forward(z.data_ptr(), bias.data_ptr(), h.data_ptr(), rows, cols, to_dtype(z, "x"), act,
                                current_stream(z)),
               "bias_act_forward");
}

// du = dy * act'(src + bias) (du may be dy), dbias = sum over rows of du.
void run_bias_act_bwd(const at::Tensor& dy, const at::Tensor& src, const at::Tensor& bias, const at::Tensor& du,
                      const at::Tensor& dbias, Activation act) {
  const int64_t cols = src.size(1), rows = src.size(0);
  at::Tensor ws = at::empty({(int64_t)bias_act_backward_workspace(rows, cols)}, src.options().dtype(at::kByte));
  check_launch(bias_act_backward(dy.data_ptr(), src.data_ptr(), bias.data_ptr(), du.data_ptr(), dbias.data_ptr(), rows,
                                 cols, to_dtype(src, "x"), act, ws.data_ptr(), current_stream(src)),
               "bias_act_backward");
}

// ---- linear_act -----------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> linear_act_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const std::string& activation,
                                                  bool save_for_backward) {
  const LinAct act = parse_act(activation, /*allow_none=*/true);
  check_cuda(x, "x");
  check_contiguous(x, "x");
  const DType dt = half_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D [tokens, in_features] tensor, got ", x.sizes());
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0);
  check_operand(weight, x, "weight", out, in);
  check_vector(bias, x, "bias", out);
  check_features(in, "in_features");
  check_features(out, "out_features");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({n, out}, x.options()), aux = at::empty({0}, x.options());
  if (n == 0) return {y, aux};
  const LtContext ctx = lt_context(x);
  const at::Tensor b = bias.has_value() ? aligned(*bias) : at::Tensor();
  LtEpilogue epi;
  epi.bias = bias.has_value() ? b.data_ptr() : nullptr;
  switch (act) {
    case LinAct::kNone:
      epi.op = bias.has_value() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
      break;
    case LinAct::kGeluTanh:
      if (save_for_backward) {
        aux = at::empty({n, out}, x.options());
        epi.aux = aux.data_ptr();
        epi.aux_ld = out;
        epi.op = bias.has_value() ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
      } else {
        epi.op = bias.has_value() ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
      }
      break;
    case LinAct::kGeluErf: {
      // z = x W^T into aux (kept for backward) or straight into y, then y = gelu(z + b).
      if (save_for_backward) aux = at::empty({n, out}, x.options());
      const at::Tensor z = save_for_backward ? aux : y;
      LtEpilogue plain;
      check_lt(lt_linear_forward(ctx, dt, x.data_ptr(), weight.data_ptr(), z.data_ptr(), n, in, out, out, plain),
               "linear_act forward GEMM", plain.op, n, in, out);
      run_bias_act_fwd(z, bias.has_value() ? b : at::zeros({out}, x.options()), y, Activation::kGeluErf);
      return {y, aux};
    }
    case LinAct::kReLU:
      epi.op = bias.has_value() ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
      break;
  }
  check_lt(lt_linear_forward(ctx, dt, x.data_ptr(), weight.data_ptr(), y.data_ptr(), n, in, out, out, epi),
           "linear_act forward GEMM", epi.op, n, in, out);
  return {y, aux};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              const at::Tensor& aux, const at::Tensor& y,
                                                              const std::string& activation) {
  const LinAct act = parse_act(activation, /*allow_none=*/true);
  check_cuda(x, "x");
  check_contiguous(x, "x");
  const DType dt = half_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D [tokens, in_features] tensor, got ", x.sizes());
  const int64_t n = x.size(0), in = x.size(1), out = weight.size(0);
  check_operand(weight, x, "weight", out, in);
  check_vector(bias, x, "bias", out);
  check_operand(dy, x, "dy", n, out);
  if (act == LinAct::kGeluTanh || act == LinAct::kGeluErf) check_operand(aux, x, "aux (saved pre-activation)", n, out);
  if (act == LinAct::kReLU) check_operand(y, x, "y (saved output)", n, out);
  check_features(in, "in_features");
  check_features(out, "out_features");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({n, in}, x.options());
  at::Tensor db = bias.has_value() ? at::empty({out}, x.options()) : at::empty({0}, x.options());
  if (n == 0) {
    if (bias.has_value()) db.zero_();
    return {dx, at::zeros({out, in}, x.options()), db};
  }
  at::Tensor dw = at::empty({out, in}, x.options());
  const LtContext ctx = lt_context(x);
  at::Tensor du = dy;
  if (act != LinAct::kNone) {
    du = at::empty_like(dy);
    const at::Tensor zeros = at::zeros({out}, x.options());
    const at::Tensor db_target = bias.has_value() ? db : at::empty({out}, x.options());
    if (act == LinAct::kGeluTanh) run_bias_act_bwd(dy, aux, zeros, du, db_target, Activation::kGeluTanh);
    if (act == LinAct::kGeluErf)
      run_bias_act_bwd(dy, aux, bias.has_value() ? aligned(*bias) : zeros, du, db_target, Activation::kGeluErf);
    if (act == LinAct::kReLU) run_bias_act_bwd(dy, y, zeros, du, db_target, Activation::kReLU);
  }
  void* bgrad = (act == LinAct::kNone && bias.has_value()) ? db.data_ptr() : nullptr;
  check_lt(lt_linear_wgrad(ctx, dt, dt, du.data_ptr(), out, x.data_ptr(), dw.data_ptr(), n, in, out, false, bgrad),
           "linear_act weight-gradient GEMM", bgrad ? CUBLASLT_EPILOGUE_BGRADB : CUBLASLT_EPILOGUE_DEFAULT, n, in, out);
  LtEpilogue plain;
  check_lt(lt_linear_dgrad(ctx, dt, du.data_ptr(), out, weight.data_ptr(), dx.data_ptr(), n, in, out, plain),
           "linear_act input-gradient GEMM", plain.op, n, in, out);
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
  half_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D [tokens, in_features] tensor, got ", x.sizes());
  MlpShape s{x.size(0), x.size(1), w1.size(0), w2.size(0)};
  check_operand(w1, x, "fc weight", s.h, s.c);
  check_operand(w2, x, "proj weight", s.o, s.h);
  check_vector(b1, x, "fc bias", s.h);
  check_vector(b2, x, "proj bias", s.o);
  check_features(s.c, "in_features");
  check_features(s.h, "hidden_features");
  check_features(s.o, "out_features");
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
  const bool relu_mask = act == LinAct::kReLU && save_for_backward && s.h % 128 == 0;
  if (save_for_backward && act != LinAct::kReLU) pre = at::empty({s.n, s.h}, x.options());
  if (relu_mask) pre = at::empty({s.n, s.h / 8}, x.options().dtype(at::kByte));
  if (s.n == 0) return {y, pre, h};
  const LtContext ctx = lt_context(x);
  const at::Tensor b1a = b1.has_value() ? aligned(*b1) : at::Tensor();
  const at::Tensor b2a = b2.has_value() ? aligned(*b2) : at::Tensor();

  // Layer 1: h = act(x W1^T + b1), keeping what backward needs in `pre`.
  LtEpilogue e1;
  e1.bias = b1.has_value() ? b1a.data_ptr() : nullptr;
  if (act == LinAct::kGeluErf) {
    const at::Tensor z = save_for_backward ? pre : h;
    LtEpilogue plain;
    check_lt(lt_linear_forward(ctx, dt, x.data_ptr(), w1.data_ptr(), z.data_ptr(), s.n, s.c, s.h, s.h, plain),
             "mlp fc GEMM", plain.op, s.n, s.c, s.h);
    run_bias_act_fwd(z, b1.has_value() ? b1a : at::zeros({s.h}, x.options()), h, Activation::kGeluErf);
  } else {
    if (act == LinAct::kGeluTanh) {
      e1.op = b1.has_value() ? (save_for_backward ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_BIAS)
                             : (save_for_backward ? CUBLASLT_EPILOGUE_GELU_AUX : CUBLASLT_EPILOGUE_GELU);
    } else {
      e1.op = b1.has_value() ? (relu_mask ? CUBLASLT_EPILOGUE_RELU_AUX_BIAS : CUBLASLT_EPILOGUE_RELU_BIAS)
                             : (relu_mask ? CUBLASLT_EPILOGUE_RELU_AUX : CUBLASLT_EPILOGUE_RELU);
    }
    if (pre.numel() > 0) {
      e1.aux = pre.data_ptr();
      e1.aux_ld = s.h;  // elements (GELU) or bits (ReLU mask)
    }
    check_lt(lt_linear_forward(ctx, dt, x.data_ptr(), w1.data_ptr(), h.data_ptr(), s.n, s.c, s.h, s.h, e1),
             "mlp fc GEMM", e1.op, s.n, s.c, s.h);
  }
  // Layer 2: y = h W2^T + b2.
  LtEpilogue e2;
  e2.op = b2.has_value() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  e2.bias = b2.has_value() ? b2a.data_ptr() : nullptr;
  check_lt(lt_linear_forward(ctx, dt, h.data_ptr(), w2.data_ptr(), y.data_ptr(), s.n, s.h, s.o, s.o, e2),
           "mlp proj GEMM", e2.op, s.n, s.h, s.o);
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
  const bool relu_mask = act == LinAct::kReLU && pre.numel() > 0;
  if (act == LinAct::kGeluTanh || act == LinAct::kGeluErf) {
    check_operand(pre, x, "pre (saved pre-activation)", s.n, s.h);
  } else if (relu_mask) {
    TORCH_CHECK(pre.is_cuda() && pre.scalar_type() == at::kByte && pre.is_contiguous() && pre.dim() == 2 &&
                    pre.size(0) == s.n && pre.size(1) == s.h / 8 && s.h % 128 == 0,
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
  void* bg2 = b2.has_value() ? db2.data_ptr() : nullptr;
  check_lt(lt_linear_wgrad(ctx, dt, dt, dy.data_ptr(), s.o, h.data_ptr(), dw2.data_ptr(), s.n, s.h, s.o, false, bg2),
           "mlp proj weight-gradient GEMM", bg2 ? CUBLASLT_EPILOGUE_BGRADB : CUBLASLT_EPILOGUE_DEFAULT, s.n, s.h, s.o);

  // du = (dy W2) * act'(u) and db1 = sum du.
  at::Tensor du = at::empty({s.n, s.h}, opts);
  const bool fused = act == LinAct::kGeluTanh || relu_mask;
  LtEpilogue e;
  if (fused) {
    const bool gelu = act == LinAct::kGeluTanh;
    e.op = b1.has_value() ? (gelu ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DRELU_BGRAD)
                          : (gelu ? CUBLASLT_EPILOGUE_DGELU : CUBLASLT_EPILOGUE_DRELU);
    e.bias_grad = b1.has_value() ? db1.data_ptr() : nullptr;
    e.aux = pre.data_ptr();
    e.aux_ld = s.h;
  }
  check_lt(lt_linear_dgrad(ctx, dt, dy.data_ptr(), s.o, w2.data_ptr(), du.data_ptr(), s.n, s.h, s.o, e),
           "mlp proj input-gradient GEMM", e.op, s.n, s.h, s.o);
  if (!fused) {
    const at::Tensor zeros = at::zeros({s.h}, opts);
    const at::Tensor db_target = b1.has_value() ? db1 : at::empty({s.h}, opts);
    if (act == LinAct::kGeluErf)
      run_bias_act_bwd(du, pre, b1.has_value() ? aligned(*b1) : zeros, du, db_target, Activation::kGeluErf);
    else  // ReLU without the bit mask: relu'(u) = [h > 0]
      run_bias_act_bwd(du, h, zeros, du, db_target, Activation::kReLU);
  }

  // dW1 = du^T x, dx = du W1.
  check_lt(lt_linear_wgrad(ctx, dt, dt, du.data_ptr(), s.h, x.data_ptr(), dw1.data_ptr(), s.n, s.c, s.h, false,
                           nullptr),
           "mlp fc weight-gradient GEMM", CUBLASLT_EPILOGUE_DEFAULT, s.n, s.c, s.h);
  LtEpilogue plain;
  check_lt(lt_linear_dgrad(ctx, dt, du.data_ptr(), s.h, w1.data_ptr(), dx.data_ptr(), s.n, s.c, s.h, plain),
           "mlp fc input-gradient GEMM", plain.op, s.n, s.c, s.h);
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
