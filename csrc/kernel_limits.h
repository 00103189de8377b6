// kernel_limits.h: what every family's *_limits.h shares (plain C++, no torch, no device code).
//
// Each kernel family states what its kernels take in one header, csrc/<family>/<family>_limits.h:
// the numbers (head dims, widths, length bounds), the storage dtypes, and one problem_error()
// that forward, backward and decode launchers and the binding all call ("" = the kernels take
// the problem, else the reason). Each header also writes its limits as a JSON object; module.cpp
// joins them into the op gptkernels::limits() -> str, which gptkernels/_limits.py parses once.
// Python reads the numbers from there and never retypes them.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "common.h"

namespace gptk {

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

inline bool dtype_in(DType t, std::initializer_list<DType> set) {
  for (DType d : set)
    if (d == t) return true;
  return false;
}

// "float16 or bfloat16" style list, for error messages.
inline std::string dtype_names(std::initializer_list<DType> set) {
  std::string s;
  size_t i = 0;
  for (DType d : set) {
    if (i > 0) s += (i + 1 == set.size()) ? " or " : ", ";
    s += dtype_name(d);
    ++i;
  }
  return s;
}

// ---- a minimal JSON writer for the limits ------------------------------------------------------
inline std::string json_str(const std::string& s) { return "\"" + s + "\""; }

inline std::string json_dtypes(std::initializer_list<DType> set) {
  std::string s = "[";
  for (DType d : set) s += (s.size() > 1 ? "," : "") + json_str(dtype_name(d));
  return s + "]";
}

template <typename Seq>
std::string json_ints(const Seq& seq) {
  std::string s = "[";
  for (auto v : seq) s += (s.size() > 1 ? "," : "") + std::to_string(v);
  return s + "]";
}

// {"key": value, ...} from (key, already-encoded value) pairs.
inline std::string json_object(std::initializer_list<std::pair<const char*, std::string>> items) {
  std::string s = "{";
  for (const auto& kv : items) s += (s.size() > 1 ? "," : "") + json_str(kv.first) + ":" + kv.second;
  return s + "}";
}

}  // namespace gptk
