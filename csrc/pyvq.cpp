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

  // Multiresolution feature-grid lookup: coords (N, G, d) in [0, 1] (clamped),
  // tables (G, L, T, F), resolutions (L) -> (N, G, L * F) in tables' dtype.
  // index: "dense_mod" or "hash" for levels with more than T vertices. coords
  // must have the accumulation dtype (float64 for float64 tables, else float32).
  m.def("grid_encode(Tensor coords, Tensor tables, int[] resolutions, str index=\"dense_mod\") -> Tensor");
  // Gradients of grid_encode; an output not asked for is an empty (0,) tensor.
  m.def("_grid_encode_backward(Tensor grad_out, Tensor coords, Tensor tables, int[] resolutions, "
        "str index, bool need_coords, bool need_tables) -> (Tensor grad_coords, Tensor grad_tables)");
}
