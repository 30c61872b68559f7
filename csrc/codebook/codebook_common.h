// Argument checks and shape handling shared by the CPU and CUDA launchers of
// pyvq::nearest_code.
#pragma once

#include "codebook/codebook.h"
#include "common/checks.h"

#include <ATen/ATen.h>

#include <string_view>

namespace pyvq {
namespace codebook {

inline Metric parse_metric(std::string_view metric) {
  if (metric == "l2") return Metric::L2;
  if (metric == "cosine") return Metric::Cosine;
  TORCH_CHECK(false,
              "pyvq.nearest_code: argument 'metric' must be 'l2' or "
              "'cosine', got '",
              std::string(metric), "'");
}

inline void check_inputs(const at::Tensor& x, const at::Tensor& codebook) {
  check_floating(x, "x");
  check_floating(codebook, "codebook");
  check_dim(codebook, "codebook", 2);
  check_min_dim(x, "x", 1);
  check_same_device(x, "x", codebook, "codebook");
  TORCH_CHECK(codebook.size(0) > 0,
              "pyvq.nearest_code: argument 'codebook' must hold at least one "
              "code, got shape ",
              codebook.sizes());
  TORCH_CHECK(x.size(-1) == codebook.size(1), "pyvq.nearest_code: the last dimension of 'x' (",
              x.size(-1), ") must equal the code dimension of 'codebook' (", codebook.size(1), ")");
  TORCH_CHECK(codebook.size(0) <= int64_t(INT32_MAX), "pyvq.nearest_code: argument 'codebook' has ",
              codebook.size(0), " codes; at most 2^31 - 1 are supported");
}

// The dtype both operands are computed in: float64 if either is float64,
// else float32 (float16 and bfloat16 are widened, never accumulated low).
inline at::ScalarType compute_dtype(const at::Tensor& x, const at::Tensor& codebook) {
  return (x.scalar_type() == at::kDouble || codebook.scalar_type() == at::kDouble) ? at::kDouble
                                                                                   : at::kFloat;
}

}  // namespace codebook
}  // namespace pyvq
