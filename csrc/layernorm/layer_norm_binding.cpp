// layer_norm_binding.cpp: torch ops gptkernels::layer_norm_fwd / add_layer_norm_fwd /
// layer_norm_bwd (CUDA). LayerNorm over the last dimension of x (any number of leading
// dimensions); mean and rstd have x's leading shape, in fp32.
#include "binding.h"
#include "layernorm/layer_norm.h"

namespace gptk {
namespace {

// Tensor facts of x, then the kernels' rule for its rows (layernorm_limits.h); returns the row length.
int64_t check_rows_input(const at::Tensor& x, const char* name) {
  check_cuda(x, name);
  const DType dtype = to_dtype(x, name);
  check_contiguous(x, name);
  TORCH_CHECK(x.dim() >= 1, name, ": expected at least 1 dimension");
  const int64_t cols = x.size(-1);
  const std::string why = layernorm::problem_error(cols, dtype);
  TORCH_CHECK(why.empty(), name, ": ", why);
  return cols;
}

void check_param(const std::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (!p.has_value()) return;
  check_same_device(*p, x, name, "x");
  check_same_dtype(*p, x, name, "x");
  check_contiguous(*p, name);
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(-1), name, ": expected shape [", x.size(-1), "], got ",
              p->sizes());
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_same_device(t, x, name, "x");
  check_same_dtype(t, x, name, "x");
  check_contiguous(t, name);
  TORCH_CHECK(t.sizes() == x.sizes(), name, ": expected shape ", x.sizes(), ", got ", t.sizes());
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

std::vector<int64_t> leading_shape(const at::Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const std::optional<at::Tensor>& residual,
                                                                   const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, double eps) {
  const int64_t cols = check_rows_input(x, "x");
  if (residual.has_value()) check_like(*residual, x, "residual");
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  TORCH_CHECK(eps >= 0, "eps: expected a non-negative number, got ", eps);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor s = residual.has_value() ? at::empty_like(x) : at::Tensor();
  at::Tensor mean = at::empty(leading_shape(x), x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(leading_shape(x), x.options().dtype(at::kFloat));
  const int64_t rows = x.numel() / cols;
  check_launch(layer_norm_forward(x.data_ptr(), ptr_or_null(residual), ptr_or_null(weight), ptr_or_null(bias),
                                  y.data_ptr(), s.defined() ? s.data_ptr() : nullptr, mean.data_ptr<float>(),
                                  rstd.data_ptr<float>(), rows, cols, (float)eps, to_dtype(x, "x"), current_stream(x)),
               "layer_norm_forward");
  return {s, y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const std::optional<at::Tensor>& bias, double eps) {
  auto [s, y, mean, rstd] = forward(std::nullopt, x, weight, bias, eps);
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_fwd(const at::Tensor& residual,
                                                                              const at::Tensor& x,
                                                                              const std::optional<at::Tensor>& weight,
                                                                              const std::optional<at::Tensor>& bias,
                                                                              double eps) {
  return forward(residual, x, weight, bias, eps);
}

// dweight / dbias come back empty (shape [0]) when there is no weight / has_bias is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                              const std::optional<at::Tensor>& weight,
                                                              const at::Tensor& mean, const at::Tensor& rstd,
                                                              bool has_bias, const std::optional<at::Tensor>& ds) {
  const int64_t cols = check_rows_input(x, "x");
  check_like(dy, x, "dy");
  if (ds.has_value()) check_like(*ds, x, "ds");
  check_param(weight, x, "weight");
  const int64_t rows = x.numel() / cols;
  auto check_stat = [&](const at::Tensor& t, const char* name) {
    check_same_device(t, x, name, "x");
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, ": expected float32, got ", t.scalar_type());
    check_contiguous(t, name);
    TORCH_CHECK(t.numel() == rows, name, ": expected ", rows, " elements (one per row of x), got ", t.numel());
  };
  check_stat(mean, "mean");
  check_stat(rstd, "rstd");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight = weight.has_value() ? at::empty_like(*weight) : at::empty({0}, x.options());
  at::Tensor dbias = has_bias ? at::empty({cols}, x.options()) : at::empty({0}, x.options());
  const bool param_grads = weight.has_value() || has_bias;
  const DType dtype = to_dtype(x, "x");
  const size_t ws_bytes = layer_norm_backward_workspace(rows, cols, dtype, param_grads);
  at::Tensor ws = at::empty({(int64_t)ws_bytes}, x.options().dtype(at::kByte));
  check_launch(layer_norm_backward(dy.data_ptr(), x.data_ptr(), ptr_or_null(weight), mean.data_ptr<float>(),
                                   rstd.data_ptr<float>(), ptr_or_null(ds), dx.data_ptr(),
                                   weight.has_value() ? dweight.data_ptr() : nullptr,
                                   has_bias ? dbias.data_ptr() : nullptr, rows, cols, dtype,
                                   ws_bytes ? ws.data_ptr() : nullptr, current_stream(x)),
               "layer_norm_backward");
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace gptk

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("add_layer_norm_fwd(Tensor residual, Tensor x, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool has_bias, "
        "Tensor? ds=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) {
  m.impl("layer_norm_fwd", &gptk::layer_norm_fwd);
  m.impl("add_layer_norm_fwd", &gptk::add_layer_norm_fwd);
  m.impl("layer_norm_bwd", &gptk::layer_norm_bwd);
}
