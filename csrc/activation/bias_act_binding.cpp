// bias_act_binding.cpp: torch ops gptkernels::bias_act_fwd / bias_act_bwd (CUDA).
#include "activation/activation_limits.h"
#include "activation/bias_act.h"
#include "binding.h"

namespace gptk {
namespace {

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::kReLU;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "gelu") return Activation::kGeluErf;
  TORCH_CHECK(false, "activation: expected 'gelu', 'gelu_tanh' or 'relu', got '", name, "'");
}

void check_inputs(const at::Tensor& x, const at::Tensor& bias) {
  check_cuda(x, "x");
  const std::string why = activation::problem_error(to_dtype(x, "x"));
  TORCH_CHECK(why.empty(), "x: ", why);
  check_same_device(bias, x, "bias", "x");
  check_same_dtype(bias, x, "bias", "x");
  check_contiguous(x, "x");
  check_contiguous(bias, "bias");
  TORCH_CHECK(x.dim() >= 1, "x: expected at least 1 dimension");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(-1), "bias: expected shape [", x.size(-1), "], got ",
              bias.sizes());
}

at::Tensor bias_act_fwd(const at::Tensor& x, const at::Tensor& bias, const std::string& activation) {
  check_inputs(x, bias);
  const Activation act = parse_activation(activation);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  check_launch(bias_act_forward(x.data_ptr(), bias.data_ptr(), y.data_ptr(), rows, cols, to_dtype(x, "x"), act,
                                current_stream(x)),
               "bias_act_forward");
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_act_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bias,
                                                const std::string& activation) {
  check_inputs(x, bias);
  check_same_device(dy, x, "dy", "x");
  check_same_dtype(dy, x, "dy", "x");
  check_contiguous(dy, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy: expected shape ", x.sizes(), ", got ", dy.sizes());
  const Activation act = parse_activation(activation);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x), dbias = at::empty_like(bias);
  const int64_t cols = x.size(-1), rows = cols ? x.numel() / cols : 0;
  at::Tensor ws = at::empty({(int64_t)bias_act_backward_workspace(rows, cols)}, x.options().dtype(at::kByte));
  check_launch(bias_act_backward(dy.data_ptr(), x.data_ptr(), bias.data_ptr(), dx.data_ptr(), dbias.data_ptr(), rows,
                                 cols, to_dtype(x, "x"), act, ws.data_ptr(), current_stream(x)),
               "bias_act_backward");
  return {dx, dbias};
}

}  // namespace
}  // namespace gptk

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def("bias_act_fwd(Tensor x, Tensor bias, str activation) -> Tensor");
  m.def("bias_act_bwd(Tensor dy, Tensor x, Tensor bias, str activation) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) {
  m.impl("bias_act_fwd", &gptk::bias_act_fwd);
  m.impl("bias_act_bwd", &gptk::bias_act_bwd);
}
