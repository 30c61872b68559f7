// Every pyvq op's schema, in one place. Backends register implementations
// with TORCH_LIBRARY_IMPL(pyvq, <Key>, m) in csrc/<op>/<op>_{cpu,cuda}.*;
// fake (meta) kernels and autograd live in pyvq/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(pyvq, m) {
  // Nearest code of each row of x (..., D) in codebook (K, D).
  // Returns (distances (...) in x's dtype, indices int64 (...)): squared L2
  // for metric="l2", 1 - cosine similarity for metric="cosine".
  // The floating output comes first so autograd-checking tools that sum all
  // outputs into one accumulator start from a floating tensor;
  // pyvq.ops.nearest_code returns the friendlier (indices, distances).
  m.def("nearest_code(Tensor x, Tensor codebook, str metric=\"l2\") -> "
        "(Tensor distances, Tensor indices)");
}
