// module.cpp: the Python module gptkernels._C and the op namespace `gptkernels` (with the ops
// build_info() and limits(): what the extension says about its build and its kernels' limits).
//
// Importing gptkernels._C runs the static registrations in every *_binding.cpp
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL). The module itself has no Python
// functions: everything is reached through torch.ops.gptkernels.*.
#include <Python.h>

#include <string>

#include "activation/activation_limits.h"
#include "attention/attention_limits.h"
#include "binding.h"
#include "gemm/gemm_limits.h"
#include "layernorm/layernorm_limits.h"
#include "loss/loss_limits.h"
#include "mlp/mlp_limits.h"

#ifndef GPTK_CUDA_ARCHS
#define GPTK_CUDA_ARCHS "unknown"
#endif
#ifndef GPTK_CUDA_PTX
#define GPTK_CUDA_PTX "none"
#endif
#ifndef GPTK_CUDA_VERSION
#define GPTK_CUDA_VERSION "unknown"
#endif

namespace {
std::string build_info() {
  return std::string("archs=") + GPTK_CUDA_ARCHS + " ptx=" + GPTK_CUDA_PTX + " cuda=" + GPTK_CUDA_VERSION;
}

// Every family's limits (csrc/<family>/<family>_limits.h) as one JSON object, for gptkernels/_limits.py.
std::string limits() {
  using namespace gptk;
  return json_object({{"activation", activation::limits_json()},
                      {"attention", attn::limits_json()},
                      {"gemm", gemm::limits_json()},
                      {"layernorm", layernorm::limits_json()},
                      {"loss", loss::limits_json()},
                      {"mlp", mlp::limits_json()}});
}
}  // namespace

TORCH_LIBRARY(gptkernels, m) {
  m.def("build_info() -> str", &build_info);
  m.def("limits() -> str", &limits);
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "gptkernels CUDA kernels (ops in torch.ops.gptkernels)", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
