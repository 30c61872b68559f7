// Argument checks and level set-up shared by the CPU and CUDA launchers of
// pyvq::grid_encode. (pyvq/ops/grid.py checks the same things first with
// friendlier Python errors; these guard direct torch.ops calls.)
#pragma once

#include "common/checks.h"
#include "grid/grid.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/ArrayRef.h>

#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace pyvq {
namespace grid {

inline IndexMode parse_index(const std::string& index) {
  if (index == "dense_mod") return IndexMode::kDenseMod;
  if (index == "hash") return IndexMode::kHash;
  TORCH_CHECK(false, "pyvq.grid_encode: argument 'index' must be 'dense_mod' or 'hash', got '",
              index, "'");
}

inline bool is_feature_size(int64_t F) { return F == 1 || F == 2 || F == 4 || F == 8; }

// The accumulation dtype of `tables`: float64 for float64, else float32;
// `coords` must already have it (pyvq/ops/grid.py converts).
inline void check_inputs(const at::Tensor& coords, const at::Tensor& tables,
                         c10::IntArrayRef resolutions) {
  check_floating(coords, "coords");
  check_floating(tables, "tables");
  check_dim(coords, "coords", 3);
  check_dim(tables, "tables", 4);
  check_same_device(coords, "coords", tables, "tables");
  TORCH_CHECK(coords.size(1) == tables.size(0), "pyvq.grid_encode: 'coords' has ", coords.size(1),
              " groups (dim 1) but 'tables' has ", tables.size(0), " (dim 0)");
  const int64_t d = coords.size(2);
  TORCH_CHECK(d >= 1 && d <= kMaxDim,
              "pyvq.grid_encode: the coordinate dimension d "
              "(coords.shape[2]) must be in [1, ",
              kMaxDim, "], got ", d);
  TORCH_CHECK(is_feature_size(tables.size(3)),
              "pyvq.grid_encode: the feature size F "
              "(tables.shape[3]) must be 1, 2, 4 or 8, got ",
              tables.size(3));
  TORCH_CHECK(
      tables.size(2) >= 1 && tables.size(2) <= 2147483647LL,
      "pyvq.grid_encode: the table size T (tables.shape[2]) must be in [1, 2**31 - 1], got ",
      tables.size(2));
  TORCH_CHECK(static_cast<int64_t>(resolutions.size()) == tables.size(1),
              "pyvq.grid_encode: argument 'resolutions' has ", resolutions.size(),
              " entries but 'tables' has L = ", tables.size(1), " levels (dim 1)");
  for (int64_t r : resolutions)
    TORCH_CHECK(r >= 1 && r <= (int64_t(1) << 20),
                "pyvq.grid_encode: argument 'resolutions' must hold ints in [1, 2**20], got ", r);
  const auto acc = tables.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coords.scalar_type() == acc, "pyvq.grid_encode: argument 'coords' must be ", acc,
              " for ", tables.scalar_type(), " tables (the accumulation dtype), got ",
              coords.scalar_type());
}

inline std::vector<LevelIndex> level_indices(c10::IntArrayRef resolutions, int d, int64_t T,
                                             IndexMode mode) {
  std::vector<LevelIndex> out;
  out.reserve(resolutions.size());
  for (int64_t r : resolutions) out.push_back(make_level_index(r, d, T, mode));
  return out;
}

struct Shape {
  int64_t N, G, L, T;
  int d;
};

// Calls fn(std::integral_constant<int, F>) for the runtime feature size F.
template <typename Fn>
inline void with_feature_size(int64_t F, Fn&& fn) {
  switch (F) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

inline Shape shape_of(const at::Tensor& coords, const at::Tensor& tables) {
  return Shape{coords.size(0), coords.size(1), tables.size(1), tables.size(2),
               static_cast<int>(coords.size(2))};
}

inline void check_grad_out(const at::Tensor& grad_out, const Shape& s, int64_t F) {
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == s.N && grad_out.size(1) == s.G &&
                  grad_out.size(2) == s.L * F,
              "pyvq._grid_encode_backward: argument 'grad_out' must have shape (", s.N, ", ", s.G,
              ", ", s.L * F, "), got ", grad_out.sizes());
}

// Calls fn(scalar_t{}, acc_t{}, std::integral_constant<int, F>{}) for the
// tables' dtype (float16/bfloat16/float32/float64), its accumulation dtype
// (float64 for float64 tables, else float32) and the feature size F.
template <typename Fn>
inline void dispatch_grid(at::ScalarType tables_type, int64_t F, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tables_type, "grid_encode", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    with_feature_size(F, [&](auto fc) { fn(scalar_t{}, acc_t{}, fc); });
  });
}

// Checked, contiguous inputs and zeroed gradient buffers of one backward call
// (grad_tables in the accumulation dtype; an output not asked for is (0,)).
struct Backward {
  IndexMode mode;
  Shape s;
  int64_t F;
  at::Tensor grad_out, coords, tables, grad_coords, grad_tables;
};

inline Backward prepare_backward(const at::Tensor& grad_out, const at::Tensor& coords,
                                 const at::Tensor& tables, c10::IntArrayRef resolutions,
                                 c10::string_view index, bool need_coords, bool need_tables) {
  check_inputs(coords, tables, resolutions);
  Backward b;
  b.mode = parse_index(std::string(index.data(), index.size()));
  b.s = shape_of(coords, tables);
  b.F = tables.size(3);
  check_grad_out(grad_out, b.s, b.F);
  b.grad_out = grad_out.to(tables.scalar_type()).contiguous();
  b.coords = coords.contiguous();
  b.tables = tables.contiguous();
  b.grad_coords =
      need_coords ? at::zeros(coords.sizes(), coords.options()) : at::empty({0}, coords.options());
  b.grad_tables = need_tables
                      ? at::zeros(tables.sizes(), tables.options().dtype(coords.scalar_type()))
                      : at::empty({0}, tables.options());
  return b;
}

// (grad_coords, grad_tables in the tables' dtype).
inline std::tuple<at::Tensor, at::Tensor> finish_backward(const Backward& b) {
  at::Tensor gt = b.grad_tables;
  if (gt.numel() > 0 && gt.scalar_type() != b.tables.scalar_type())
    gt = gt.to(b.tables.scalar_type());
  return {b.grad_coords, gt};
}

}  // namespace grid
}  // namespace pyvq
