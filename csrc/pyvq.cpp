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
  m.def("grid_encode(Tensor coords, Tensor tables, int[] resolutions, "
        "str index=\"dense_mod\") -> Tensor");
  // Gradients of grid_encode; an output not asked for is an empty (0,) tensor.
  m.def(
      "_grid_encode_backward(Tensor grad_out, Tensor coords, Tensor tables, int[] resolutions, "
      "str index, bool need_coords, bool need_tables) -> (Tensor grad_coords, Tensor grad_tables)");
  // Multinomial (uniform-transition) diffusion posterior over K classes,
  // log-probabilities (B, K, *S) of z_{t-1} given x_t (B, *S) int64 and x0:
  // int64 indices (B, *S) (the true posterior; output in alpha_t's
  // accumulation dtype) or logits (B, K, *S) (the model posterior, output in
  // the logits' dtype). alpha_t = alpha_t, alpha_bar_prev = alpha_bar_{t-1},
  // both (B,) in (0, 1]; num_classes = K.
  m.def("multinomial_posterior(Tensor x_t, Tensor x0, Tensor alpha_t, Tensor alpha_bar_prev, "
        "int num_classes) -> Tensor");
  // Gradient of the logits form with respect to the logits.
  m.def("_multinomial_posterior_backward(Tensor grad, Tensor x_t, Tensor logits, Tensor alpha_t, "
        "Tensor alpha_bar_prev) -> Tensor");
  // KL(q(z_{t-1} | x_t, x0) || p(z_{t-1} | x_t, logits)) per position, (B, *S).
  m.def("multinomial_kl(Tensor x_t, Tensor x0, Tensor logits, Tensor alpha_t, "
        "Tensor alpha_bar_prev) -> Tensor");
  m.def(
      "_multinomial_kl_backward(Tensor grad, Tensor x_t, Tensor x0, Tensor logits, Tensor alpha_t, "
      "Tensor alpha_bar_prev) -> Tensor");
  // Windowed (shifted) multi-head attention, Swin's W-MSA / SW-MSA core:
  // q, k, v (B, heads, H, W, head_dim) with H, W multiples of window_size;
  // attention inside window_size x window_size windows of the grid rolled by
  // -shift, Swin's shifted-window mask when shift > 0, relative position
  // bias from bias_table ((2w - 1)^2, heads) when given. Returns (out
  // (B, heads, H, W, head_dim) in q's dtype, lse (B, heads, H, W): the
  // logsumexp of each query's scores in the accumulation dtype), both at the
  // tokens' original (unshifted) positions.
  m.def("window_attention(Tensor q, Tensor k, Tensor v, Tensor? bias_table, int window_size, "
        "int shift, float scale) -> (Tensor out, Tensor lse)");
  // Gradients from the saved out and lse (the scores are recomputed);
  // grad_bias is an empty (0,) tensor without a bias table.
  m.def(
      "_window_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias_table, "
      "Tensor out, Tensor lse, int window_size, int shift, float scale) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_bias)");
  // Multi-grained attention (Efficient-VQGAN Sec. 3.2): q, k, v (B, heads,
  // H, W, head_dim) with H, W multiples of block_size; the query at (i, j)
  // attends, in one softmax, to the keys of its block's extended window
  // (rows [bi*Ws - halo, (bi+1)*Ws + halo) and the same for columns,
  // intersected with the grid) and to all G global keys global_k / global_v
  // (B, heads, G, head_dim). Returns (out in q's shape and dtype, lse
  // (B, heads, H, W) in the accumulation dtype).
  m.def("multigrained_attention(Tensor q, Tensor k, Tensor v, Tensor global_k, Tensor global_v, "
        "int block_size, int halo, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "_multigrained_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor global_k, "
      "Tensor global_v, Tensor out, Tensor lse, int block_size, int halo, float scale) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_global_k, Tensor grad_global_v)");
}
