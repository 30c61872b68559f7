// CPU launcher of pyvq::grid_encode and pyvq::_grid_encode_backward.
//
// Work is split so that no two threads ever write the same element, which
// keeps every result independent of the thread count (deterministic):
//   forward and coordinate gradient: tasks of (group, block of points); a
//     task walks the levels outer and its points inner, so a level's table
//     slice is reused across the block;
//   table gradient: one task per (group, level) table slice, points in
//     ascending order (a fixed summation order per entry).
// No intermediate of size N x 2^d x L x F is built.
#include "common/build_facts.h"
#include "grid/grid_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace pyvq {
namespace grid {
namespace {

constexpr int64_t kBlock = 256;  // points per task

// Table rows are random accesses into a level's table (megabytes for
// hashed levels), so every pass works in stages of a few points: first it
// locates the points and computes all their corners' rows, prefetching each
// row's cache line, then it does the per-point work on rows that are by
// then (mostly) in cache. kStage bounds points x corners of a stage.
constexpr int kStage = 256;

template <typename acc_t>
struct Stage {
  Axis<acc_t> ax[kStage][kMaxDim];  // per staged point, d axes (kStage >= points)
  int64_t row[kStage];              // per staged (point, corner)
};

// Calls fn(n, axes, rows) for the points n0 .. n1 - 1 of group g at one
// level, staged (see above); `table` is the level's table (for prefetches,
// with write intent when `write`).
template <typename acc_t, typename scalar_t, typename Fn>
inline void for_points(Stage<acc_t>& st, const acc_t* coords, int64_t n0, int64_t n1, int64_t g,
                       const Shape& s, const LevelIndex& li, const scalar_t* table, int64_t F,
                       bool write, Fn&& fn) {
  const int corners = 1 << s.d;
  const int64_t per = std::max(1, kStage / corners);
  for (int64_t m0 = n0; m0 < n1; m0 += per) {
    const int64_t m1 = std::min(n1, m0 + per);
    for (int64_t n = m0; n < m1; ++n) {
      Axis<acc_t>* ax = st.ax[n - m0];
      locate_point(coords + (n * s.G + g) * s.d, s.d, li, ax);
      for (int c = 0; c < corners; ++c) {
        const int64_t r = corner_row(ax, s.d, c, li);
        st.row[(n - m0) * corners + c] = r;
        if (write)
          __builtin_prefetch(table + r * F, 1);
        else
          __builtin_prefetch(table + r * F, 0);
      }
    }
    for (int64_t n = m0; n < m1; ++n) fn(n, st.ax[n - m0], st.row + (n - m0) * corners);
  }
}

template <typename scalar_t, typename acc_t, int F>
void forward_impl(const acc_t* coords, const scalar_t* tables, scalar_t* out, const Shape& s,
                  const std::vector<LevelIndex>& levels) {
  const int64_t nblocks = (s.N + kBlock - 1) / kBlock;
  const int corners = 1 << s.d;
  at::parallel_for(0, s.G * nblocks, 1, [&](int64_t t0, int64_t t1) {
    auto st = std::make_unique<Stage<acc_t>>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / nblocks, n0 = (t % nblocks) * kBlock;
      const int64_t n1 = std::min(s.N, n0 + kBlock);
      for (int64_t l = 0; l < s.L; ++l) {
        const LevelIndex& li = levels[l];
        const scalar_t* tab = tables + (g * s.L + l) * s.T * F;
        for_points(*st, coords, n0, n1, g, s, li, tab, F, false,
                   [&](int64_t n, const Axis<acc_t>* ax, const int64_t* rows) {
                     acc_t acc[F];
                     for (int f = 0; f < F; ++f) acc[f] = acc_t(0);
                     for (int c = 0; c < corners; ++c) {
                       const acc_t w = corner_weight(ax, s.d, c);
                       const scalar_t* e = tab + rows[c] * F;
                       for (int f = 0; f < F; ++f) acc[f] += w * static_cast<acc_t>(e[f]);
                     }
                     scalar_t* o = out + (n * s.G + g) * s.L * F + l * F;
                     for (int f = 0; f < F; ++f) o[f] = static_cast<scalar_t>(acc[f]);
                   });
      }
    }
  });
}

template <typename scalar_t, typename acc_t, int F>
void coords_grad_impl(const scalar_t* grad_out, const acc_t* coords, const scalar_t* tables,
                      acc_t* grad_coords, const Shape& s, const std::vector<LevelIndex>& levels) {
  const int64_t nblocks = (s.N + kBlock - 1) / kBlock;
  const int corners = 1 << s.d;
  at::parallel_for(0, s.G * nblocks, 1, [&](int64_t t0, int64_t t1) {
    auto st = std::make_unique<Stage<acc_t>>();
    std::vector<acc_t> buf(kBlock * s.d);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / nblocks, n0 = (t % nblocks) * kBlock;
      const int64_t n1 = std::min(s.N, n0 + kBlock);
      std::fill(buf.begin(), buf.end(), acc_t(0));
      for (int64_t l = 0; l < s.L; ++l) {
        const LevelIndex& li = levels[l];
        const acc_t r = static_cast<acc_t>(li.res);
        const scalar_t* tab = tables + (g * s.L + l) * s.T * F;
        for_points(*st, coords, n0, n1, g, s, li, tab, F, false,
                   [&](int64_t n, const Axis<acc_t>* ax, const int64_t* rows) {
                     const scalar_t* go = grad_out + (n * s.G + g) * s.L * F + l * F;
                     acc_t gof[F];
                     for (int f = 0; f < F; ++f) gof[f] = static_cast<acc_t>(go[f]);
                     acc_t gw[kMaxDim] = {};
                     for (int c = 0; c < corners; ++c) {
                       const scalar_t* e = tab + rows[c] * F;
                       acc_t dot = acc_t(0);
                       for (int f = 0; f < F; ++f) dot += gof[f] * static_cast<acc_t>(e[f]);
                       for (int k = 0; k < s.d; ++k)
                         gw[k] += corner_weight_grad(ax, s.d, c, k) * dot;
                     }
                     acc_t* b = buf.data() + (n - n0) * s.d;
                     for (int k = 0; k < s.d; ++k)
                       if (ax[k].inside) b[k] += r * gw[k];
                   });
      }
      for (int64_t n = n0; n < n1; ++n)
        std::copy_n(buf.data() + (n - n0) * s.d, s.d, grad_coords + (n * s.G + g) * s.d);
    }
  });
}

template <typename scalar_t, typename acc_t, int F>
void tables_grad_impl(const scalar_t* grad_out, const acc_t* coords, acc_t* grad_tables,
                      const Shape& s, const std::vector<LevelIndex>& levels) {
  const int corners = 1 << s.d;
  at::parallel_for(0, s.G * s.L, 1, [&](int64_t t0, int64_t t1) {
    auto st = std::make_unique<Stage<acc_t>>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / s.L, l = t % s.L;
      const LevelIndex& li = levels[l];
      acc_t* gt = grad_tables + t * s.T * F;
      for_points(*st, coords, 0, s.N, g, s, li, gt, F, true,
                 [&](int64_t n, const Axis<acc_t>* ax, const int64_t* rows) {
                   const scalar_t* go = grad_out + (n * s.G + g) * s.L * F + l * F;
                   acc_t gof[F];
                   for (int f = 0; f < F; ++f) gof[f] = static_cast<acc_t>(go[f]);
                   for (int c = 0; c < corners; ++c) {
                     const acc_t w = corner_weight(ax, s.d, c);
                     acc_t* e = gt + rows[c] * F;
                     for (int f = 0; f < F; ++f) e[f] += w * gof[f];
                   }
                 });
    }
  });
}

at::Tensor grid_encode_cpu(const at::Tensor& coords_in, const at::Tensor& tables_in,
                           c10::IntArrayRef resolutions, c10::string_view index) {
  check_inputs(coords_in, tables_in, resolutions);
  const IndexMode mode = parse_index(std::string(index.data(), index.size()));
  const Shape s = shape_of(coords_in, tables_in);
  const int64_t F = tables_in.size(3);
  at::Tensor out = at::empty({s.N, s.G, s.L * F}, tables_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor coords = coords_in.contiguous();
  const at::Tensor tables = tables_in.contiguous();
  const auto levels = level_indices(resolutions, s.d, s.T, mode);
  dispatch_grid(tables.scalar_type(), F, [&](auto sv, auto av, auto fc) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    forward_impl<scalar_t, acc_t, decltype(fc)::value>(coords.const_data_ptr<acc_t>(),
                                                       tables.const_data_ptr<scalar_t>(),
                                                       out.mutable_data_ptr<scalar_t>(), s, levels);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grid_encode_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& coords, const at::Tensor& tables,
    c10::IntArrayRef resolutions, c10::string_view index, bool need_coords, bool need_tables) {
  Backward b =
      prepare_backward(grad_out, coords, tables, resolutions, index, need_coords, need_tables);
  const Shape& s = b.s;
  if (s.N == 0 || s.L == 0) return finish_backward(b);
  const auto levels = level_indices(resolutions, s.d, s.T, b.mode);
  dispatch_grid(b.tables.scalar_type(), b.F, [&](auto sv, auto av, auto fc) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    constexpr int kF = decltype(fc)::value;
    if (need_coords)
      coords_grad_impl<scalar_t, acc_t, kF>(
          b.grad_out.const_data_ptr<scalar_t>(), b.coords.const_data_ptr<acc_t>(),
          b.tables.const_data_ptr<scalar_t>(), b.grad_coords.mutable_data_ptr<acc_t>(), s, levels);
    if (need_tables)
      tables_grad_impl<scalar_t, acc_t, kF>(b.grad_out.const_data_ptr<scalar_t>(),
                                            b.coords.const_data_ptr<acc_t>(),
                                            b.grad_tables.mutable_data_ptr<acc_t>(), s, levels);
  });
  return finish_backward(b);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvq, CPU, m) {
  m.impl("grid_encode", &grid_encode_cpu);
  m.impl("_grid_encode_backward", &grid_encode_backward_cpu);
}

// Portable code only (its gathers and scatters do not gain from AVX-512 builds).
PYVQ_REGISTER_CPU_OP("grid_encode", CpuIsa::kGeneric);

}  // namespace grid
}  // namespace pyvq
