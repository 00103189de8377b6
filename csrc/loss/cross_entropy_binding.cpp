// cross_entropy_binding.cpp: torch ops for the fused softmax cross-entropy (CUDA).
//
//   cross_entropy_fwd(logits, target, ignore_index, reduction, compute_grad) -> (loss, grad, status)
//       loss and, when compute_grad, the logits gradient for an upstream gradient of 1 (already
//       divided by the number of valid rows for "mean"), in one kernel. status = [valid rows,
//       out-of-range rows, rows - first out-of-range row] (int64, on the device).
//   cross_entropy_scale_grad_(grad, scale)
//       the backward: grad *= scale in place (per row for reduction="none"); rows whose factor is
//       exactly 1 are skipped, so the usual loss.backward() costs one launch.
//   linear_cross_entropy_fwd(x, weight, bias, target, ignore_index, reduction, chunk_size, compute_grad)
//       -> (loss, dx, dweight, dbias, status)
//       the LM head and the loss chunk by chunk: for each chunk of rows, logits = x W^T + b (cuBLASLt),
//       the cross-entropy kernel overwrites them with their gradient in place, then dx = g W and
//       dW += g^T x (fp32 accumulator, db from the same GEMM's BGRADB epilogue). The full [N, V]
//       logits never exist; peak extra memory is one [chunk, V] buffer plus an fp32 [V, C].
#include <ATen/ops/zeros.h>

#include <optional>

#include "binding.h"
#include "elementwise.h"
#include "gemm/lt_gemm.h"
#include "gemm/lt_torch.h"
#include "loss/cross_entropy.h"
#include "loss/loss_limits.h"

namespace gptk {
namespace {

CeReduction parse_reduction(const std::string& r, bool allow_none) {
  if (r == "mean") return CeReduction::kMean;
  if (r == "sum") return CeReduction::kSum;
  if (r == "none" && allow_none) return CeReduction::kNone;
  TORCH_CHECK(false, "reduction: expected 'mean', 'sum'", allow_none ? " or 'none'" : "", ", got '", r, "'");
}

void check_target(const at::Tensor& target, const at::Tensor& ref, int64_t rows) {
  check_cuda(target, "target");
  check_same_device(target, ref, "target", "logits");
  TORCH_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
              "target: expected an int64 or int32 tensor, got ", target.scalar_type());
  check_contiguous(target, "target");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows, "target: expected shape [", rows, "], got ",
              target.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                                 int64_t ignore_index, const std::string& reduction,
                                                                 bool compute_grad) {
  const CeReduction red = parse_reduction(reduction, /*allow_none=*/true);
  check_cuda(logits, "logits");
  const DType dt = to_dtype(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "logits: expected a 2-D [rows, vocab] tensor, got ", logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const std::string why = loss::problem_error(vocab, dt);
  TORCH_CHECK(why.empty(), "logits: ", why);
  TORCH_CHECK(logits.stride(1) == 1 && (rows <= 1 || logits.stride(0) >= vocab),
              "logits: expected rows of contiguous elements (strides ", logits.strides(), ")");
  check_target(target, logits, rows);
  c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = current_stream(logits);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor status = at::empty({3}, logits.options().dtype(at::kLong));
  at::Tensor losses = at::empty({rows}, f32);
  at::Tensor grad = compute_grad ? at::empty({rows, vocab}, logits.options()) : at::empty({0}, logits.options());
  check_launch(cross_entropy_prepare(target.data_ptr(), target.scalar_type() == at::kLong, rows, vocab, ignore_index,
                                     status.data_ptr<int64_t>(), stream),
               "cross_entropy_prepare");
  CrossEntropyRows p;
  p.logits = logits.data_ptr();
  p.ld = rows <= 1 ? vocab : logits.stride(0);
  p.grad = compute_grad ? grad.data_ptr() : nullptr;
  p.grad_ld = vocab;
  p.target = target.data_ptr();
  p.target_int64 = target.scalar_type() == at::kLong;
  p.losses = losses.data_ptr<float>();
  p.status = status.data_ptr<int64_t>();
  p.rows = rows;
  p.vocab = vocab;
  p.ignore_index = ignore_index;
  p.reduction = red;
  p.dtype = dt;
  check_launch(cross_entropy_rows(p, stream), "cross_entropy_rows");
  if (red == CeReduction::kNone) return {losses, grad, status};
  at::Tensor loss = at::empty({}, f32);
  check_launch(cross_entropy_reduce(losses.data_ptr<float>(), rows, status.data_ptr<int64_t>(),
                                    red == CeReduction::kMean, loss.data_ptr<float>(), stream),
               "cross_entropy_reduce");
  return {loss, grad, status};
}

void cross_entropy_scale_grad_(const at::Tensor& grad, const at::Tensor& scale) {
  check_cuda(grad, "grad");
  check_same_device(scale, grad, "scale", "grad");
  const DType dt = to_dtype(grad, "grad");
  TORCH_CHECK(grad.dim() == 2 && grad.stride(1) == 1 && (grad.size(0) <= 1 || grad.stride(0) >= grad.size(1)),
              "grad: expected a 2-D tensor with contiguous rows, got sizes ", grad.sizes(), " strides ",
              grad.strides());
  TORCH_CHECK(grad.size(1) < (int64_t(1) << 31), "grad: rows must have < 2^31 elements");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  (scale.numel() == 1 || scale.numel() == grad.size(0)),
              "scale: expected a contiguous float32 tensor with 1 or ", grad.size(0), " elements, got ",
              scale.scalar_type(), " ", scale.sizes());
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t rows = grad.size(0), cols = grad.size(1);
  check_launch(scale_rows(grad.data_ptr(), rows <= 1 ? cols : grad.stride(0), rows, cols, scale.data_ptr<float>(),
                          scale.numel() != 1, dt, current_stream(grad)),
               "scale_rows");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    int64_t ignore_index, const std::string& reduction, int64_t chunk_size, bool compute_grad) {
  const CeReduction red = parse_reduction(reduction, /*allow_none=*/false);
  check_cuda(x, "x");
  check_contiguous(x, "x");
  const DType dt = to_dtype(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D [tokens, features] tensor, got ", x.sizes());
  const int64_t n = x.size(0), c = x.size(1), vocab = weight.size(0);
  check_cuda(weight, "weight");
  check_same_device(weight, x, "weight", "x");
  check_same_dtype(weight, x, "weight", "x");
  check_contiguous(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == c, "weight: expected shape [vocab, ", c, "], got ",
              weight.sizes());
  const std::string why = loss::linear_problem_error(c, vocab, dt);
  TORCH_CHECK(why.empty(), "linear_cross_entropy: ", why);
  if (bias.has_value()) {
    check_cuda(*bias, "bias");
    check_same_device(*bias, x, "bias", "x");
    check_same_dtype(*bias, x, "bias", "x");
    check_contiguous(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == vocab, "bias: expected shape [", vocab, "], got ", bias->sizes());
  }
  TORCH_CHECK(chunk_size > 0, "chunk_size: expected a positive number of rows, got ", chunk_size);
  check_target(target, x, n);
  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = current_stream(x);
  const auto opts = x.options(), f32 = x.options().dtype(at::kFloat);
  at::Tensor status = at::empty({3}, opts.dtype(at::kLong));
  at::Tensor losses = at::empty({n}, f32);
  at::Tensor dx = compute_grad ? at::empty({n, c}, opts) : at::empty({0}, opts);
  at::Tensor dw = at::empty({0}, opts), db = at::empty({0}, opts);
  check_launch(cross_entropy_prepare(target.data_ptr(), target.scalar_type() == at::kLong, n, vocab, ignore_index,
                                     status.data_ptr<int64_t>(), stream),
               "cross_entropy_prepare");
  at::Tensor dw_acc, db_acc, db_chunk;
  if (compute_grad) {
    dw_acc = at::zeros({vocab, c}, f32);  // zero: a batch with no rows leaves it so
    if (bias.has_value()) {
      db_acc = at::zeros({vocab}, f32);
      db_chunk = at::empty({vocab}, f32);
    }
  }
  if (n > 0) {
    const int64_t chunk = chunk_size < n ? chunk_size : n;
    const int64_t ldc = (vocab + 7) / 8 * 8;  // 16-byte aligned rows for the GEMMs and the kernel
    at::Tensor logits = at::empty({chunk, ldc}, opts);
    const at::Tensor b = bias.has_value() ? (reinterpret_cast<uintptr_t>(bias->data_ptr()) % 16 ? bias->clone() : *bias)
                                          : at::Tensor();
    const LtContext ctx = lt_context(x);
    const size_t elt = x.element_size(), telt = target.element_size();
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t rows = chunk < n - r0 ? chunk : n - r0;
      const char* xr = static_cast<const char*>(x.data_ptr()) + r0 * c * elt;
      const at::Tensor chunk_logits = logits.narrow(0, 0, rows).narrow(1, 0, vocab);
      auto logits_gemm = [&](const LtEpilogue& e) {
        return lt_linear_forward(ctx, dt, xr, weight.data_ptr(), logits.data_ptr(), rows, c, vocab, ldc, e);
      };
      LtEpilogue epi;
      epi.op = bias.has_value() ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
      epi.bias = bias.has_value() ? b.data_ptr() : nullptr;
      if (!lt_try_fused(epi.op, "logits GEMM", rows, c, vocab, [&] { return logits_gemm(epi); })) {
        check_lt(logits_gemm(LtEpilogue()), "logits GEMM", CUBLASLT_EPILOGUE_DEFAULT, rows, c, vocab);
        chunk_logits.add_(b);
      }
      CrossEntropyRows p;
      p.logits = logits.data_ptr();
      p.ld = ldc;
      p.grad = compute_grad ? logits.data_ptr() : nullptr;  // in place: the chunk's logits are ours
      p.grad_ld = ldc;
      p.target = static_cast<const char*>(target.data_ptr()) + r0 * telt;
      p.target_int64 = target.scalar_type() == at::kLong;
      p.losses = losses.data_ptr<float>() + r0;
      p.status = status.data_ptr<int64_t>();
      p.rows = rows;
      p.vocab = vocab;
      p.ignore_index = ignore_index;
      p.reduction = red;
      p.dtype = dt;
      check_launch(cross_entropy_rows(p, stream), "cross_entropy_rows");
      if (!compute_grad) continue;
      check_lt(lt_linear_dgrad(ctx, dt, logits.data_ptr(), ldc, weight.data_ptr(),
                               static_cast<char*>(dx.data_ptr()) + r0 * c * elt, rows, c, vocab, LtEpilogue()),
               "dx GEMM", CUBLASLT_EPILOGUE_DEFAULT, rows, c, vocab);
      lt_wgrad_bias(ctx, dt, DType::kFloat32, chunk_logits, ldc, xr, dw_acc.data_ptr(), rows, c, vocab,
                    /*accumulate=*/r0 > 0, bias.has_value() ? db_chunk : at::Tensor(), "dweight GEMM");
      if (bias.has_value())
        check_launch(add_f32(db_acc.data_ptr<float>(), db_chunk.data_ptr<float>(), vocab, stream), "add_f32");
    }
  }
  if (compute_grad) {
    dw = dw_acc.to(x.scalar_type());
    if (bias.has_value()) db = db_acc.to(x.scalar_type());
  }
  at::Tensor loss = at::empty({}, f32);
  check_launch(cross_entropy_reduce(losses.data_ptr<float>(), n, status.data_ptr<int64_t>(),
                                    red == CeReduction::kMean, loss.data_ptr<float>(), stream),
               "cross_entropy_reduce");
  return {loss, dx, dw, db, status};
}

}  // namespace
}  // namespace gptk

TORCH_LIBRARY_FRAGMENT(gptkernels, m) {
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, int ignore_index, str reduction, bool compute_grad) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("cross_entropy_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
  m.def("linear_cross_entropy_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
        "str reduction, int chunk_size, bool compute_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) {
  m.impl("cross_entropy_fwd", &gptk::cross_entropy_fwd);
  m.impl("cross_entropy_scale_grad_", &gptk::cross_entropy_scale_grad_);
  m.impl("linear_cross_entropy_fwd", &gptk::linear_cross_entropy_fwd);
}
