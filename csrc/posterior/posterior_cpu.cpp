// CPU launcher of pyvq::multinomial_posterior, pyvq::multinomial_kl and their
// backward ops.
//
// Tasks are (batch row, tile of kTile consecutive positions); a task owns
// its output slice, so results do not depend on the thread count
// (deterministic). Inside a tile the passes over the K classes read the
// tile's K x kTile slice of the logits (contiguous along positions), which
// stays in cache from one pass to the next (tile_for). Sums over the classes
// accumulate in double.
#include "posterior/posterior_common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace pyvq {
namespace posterior {
namespace {

constexpr int kTile = 64;  // most positions per tile
// Positions per tile for K classes: the tile's K x n slice of the logits
// (read by every pass) stays within about 256 KiB, inside L2.
inline int tile_for(int64_t K) {
  int n = kTile;
  while (n > 4 && K * n > 65536) n /= 2;
  return n;
}

// Calls fn(n, coeffs, offset into (B, K, S), offset into (B, S)) for every
// tile of n <= kTile positions, in parallel.
template <typename acc_t, typename Fn>
void for_each_tile(const Prepared& p, Fn&& fn) {
  const Shape& s = p.s;
  const int tile = tile_for(s.K);
  const int64_t tiles = (s.S + tile - 1) / tile;
  const acc_t* a = p.alpha_t.data_ptr<acc_t>();
  const acc_t* ab = p.alpha_bar_prev.data_ptr<acc_t>();
  at::parallel_for(0, s.B * tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tiles, s0 = (t % tiles) * tile;
      const int n = static_cast<int>(std::min<int64_t>(tile, s.S - s0));
      fn(n, make_coeffs<acc_t>(a[b], ab[b], s.K), b * s.K * s.S + s0, b * s.S + s0);
    }
  });
}

at::Tensor posterior_cpu(const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& alpha_t,
                         const at::Tensor& alpha_bar_prev, int64_t num_classes) {
  Prepared p = prepare_posterior(x_t, x0, alpha_t, alpha_bar_prev, num_classes);
  const Shape s = p.s;
  const int64_t* X = p.x_t.data_ptr<int64_t>();
  if (p.logits.defined()) {
    dispatch_floating(p.logits.scalar_type(), [&](auto sv, auto av) {
      using scalar_t = decltype(sv);
      using acc_t = decltype(av);
      const scalar_t* L = p.logits.data_ptr<scalar_t>();
      scalar_t* O = p.out.data_ptr<scalar_t>();
      for_each_tile<acc_t>(p, [&](int n, const Coeffs<acc_t>& c, int64_t off, int64_t pos) {
        model_posterior_tile<scalar_t, acc_t, double, kTile>(L + off, X + pos, s.K, s.S, n, c, O + off);
      });
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES(p.out.scalar_type(), "multinomial_posterior", [&] {
      const int64_t* Z = p.x0.data_ptr<int64_t>();
      scalar_t* O = p.out.data_ptr<scalar_t>();
      for_each_tile<scalar_t>(p, [&](int n, const Coeffs<scalar_t>& c, int64_t off, int64_t pos) {
        true_posterior_tile<scalar_t, scalar_t, kTile>(X + pos, Z + pos, s.K, s.S, n, c, O + off);
      });
    });
  }
  return p.out;
}

at::Tensor posterior_backward_cpu(const at::Tensor& grad, const at::Tensor& x_t, const at::Tensor& logits,
                                  const at::Tensor& alpha_t, const at::Tensor& alpha_bar_prev) {
  Prepared p = prepare_posterior_backward(grad, x_t, logits, alpha_t, alpha_bar_prev);
  const Shape s = p.s;
  dispatch_floating(p.logits.scalar_type(), [&](auto sv, auto av) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    const scalar_t *G = p.grad.data_ptr<scalar_t>(), *L = p.logits.data_ptr<scalar_t>();
    const int64_t* X = p.x_t.data_ptr<int64_t>();
    scalar_t* O = p.out.data_ptr<scalar_t>();
    for_each_tile<acc_t>(p, [&](int n, const Coeffs<acc_t>& c, int64_t off, int64_t pos) {
      model_posterior_backward_tile<scalar_t, acc_t, double, kTile>(G + off, L + off, X + pos, s.K, s.S, n, c, O + off);
    });
  });
  return p.out;
}

at::Tensor kl_cpu(const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& logits, const at::Tensor& alpha_t,
                  const at::Tensor& alpha_bar_prev) {
  Prepared p = prepare_kl(at::Tensor(), x_t, x0, logits, alpha_t, alpha_bar_prev);
  const Shape s = p.s;
  dispatch_floating(p.logits.scalar_type(), [&](auto sv, auto av) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    const scalar_t* L = p.logits.data_ptr<scalar_t>();
    const int64_t *X = p.x_t.data_ptr<int64_t>(), *Z = p.x0.data_ptr<int64_t>();
    scalar_t* O = p.out.data_ptr<scalar_t>();
    for_each_tile<acc_t>(p, [&](int n, const Coeffs<acc_t>& c, int64_t off, int64_t pos) {
      kl_forward_tile<scalar_t, acc_t, double, kTile>(L + off, X + pos, Z + pos, s.K, s.S, n, c, O + pos);
    });
  });
  return p.out;
}

at::Tensor kl_backward_cpu(const at::Tensor& grad, const at::Tensor& x_t, const at::Tensor& x0,
                           const at::Tensor& logits, const at::Tensor& alpha_t, const at::Tensor& alpha_bar_prev) {
  Prepared p = prepare_kl(grad, x_t, x0, logits, alpha_t, alpha_bar_prev);
  const Shape s = p.s;
  dispatch_floating(p.logits.scalar_type(), [&](auto sv, auto av) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    const scalar_t *G = p.grad.data_ptr<scalar_t>(), *L = p.logits.data_ptr<scalar_t>();
    const int64_t *X = p.x_t.data_ptr<int64_t>(), *Z = p.x0.data_ptr<int64_t>();
    scalar_t* O = p.out.data_ptr<scalar_t>();
    for_each_tile<acc_t>(p, [&](int n, const Coeffs<acc_t>& c, int64_t off, int64_t pos) {
      kl_backward_tile<scalar_t, acc_t, double, kTile>(G + pos, L + off, X + pos, Z + pos, s.K, s.S, n, c, O + off);
    });
  });
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvq, CPU, m) {
  m.impl("multinomial_posterior", &posterior_cpu);
  m.impl("_multinomial_posterior_backward", &posterior_backward_cpu);
  m.impl("multinomial_kl", &kl_cpu);
  m.impl("_multinomial_kl_backward", &kl_backward_cpu);
}

}  // namespace posterior
}  // namespace pyvq
