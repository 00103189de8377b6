// module.cpp: the Python module gptkernels._C and the op namespace `gptkernels`.
//
// Importing gptkernels._C runs the static registrations in every *_binding.cpp
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL). The module itself has no Python
// functions: everything is reached through torch.ops.gptkernels.*.
#include <Python.h>

#include <string>

#include "binding.h"

#ifndef GPTK_CUDA_ARCHS
#define GPTK_CUDA_ARCHS "unknown"
#endif
#ifndef GPTK_CUDA_VERSION
#define GPTK_CUDA_VERSION "unknown"
#endif

namespace {
std::string build_info() {
  return std::string("archs=") + GPTK_CUDA_ARCHS + " cuda=" + GPTK_CUDA_VERSION;
}
}  // namespace

TORCH_LIBRARY(gptkernels, m) {
  m.def("build_info() -> str", &build_info);
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "gptkernels CUDA kernels (ops in torch.ops.gptkernels)", -1,
                                   nullptr};
  return PyModule_Create(&def);
}
