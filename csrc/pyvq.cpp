// Every pyvq op's schema, in one place. Backends register implementations
// with TORCH_LIBRARY_IMPL(pyvq, <Key>, m) in csrc/<op>/<op>_{cpu,cuda}.*;
// fake (meta) kernels and autograd live in pyvq/ops/<op>.py.
#include <torch/library.h>

TORCH_LIBRARY(pyvq, m) {
  // Nearest code of each row of x (..., D) in codebook (K, D).
  // Returns (indices int64 (...), distances (...) in x's dtype):
  // squared L2 for metric="l2", 1 - cosine similarity for metric="cosine".
  m.def("nearest_code(Tensor x, Tensor codebook, str metric=\"l2\") -> "
        "(Tensor indices, Tensor distances)");
}
