// Input checks used at every op boundary. Each message names the argument,
// what was expected and what was given, so a user can fix the call without
// reading kernel sources.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace pyvq {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "pyvq: argument '", name,
              "' must be a floating-point tensor (float16, bfloat16, float32 or "
              "float64), got dtype ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "pyvq: argument '", name, "' must be ", dim, "-D, got a ", t.dim(),
              "-D tensor of shape ", t.sizes());
}

inline void check_min_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() >= dim, "pyvq: argument '", name, "' must have at least ", dim,
              " dimension(s), got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), "pyvq: arguments '", a_name, "' and '", b_name,
              "' must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                             const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "pyvq: arguments '", a_name, "' and '", b_name,
              "' must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

}  // namespace pyvq
