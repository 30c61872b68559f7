// CPU launcher of pyvq::multinomial_posterior, pyvq::multinomial_kl and their
// backward ops.
//
// Tasks are (batch row, tile of up to kTile consecutive positions); a task
// owns its output slice, so results do not depend on the thread count
// (deterministic). Inside a tile the passes over the K classes read the
// tile's K x n slice of the logits (contiguous along positions), which stays
// in cache from one pass to the next (tile_for). Sums over the classes
// accumulate in double.
//
// float32, the training path, runs in functions compiled twice from one
// template, for AVX-512 (PYVQ_TARGET_AVX512: x86-64-v4) and for the baseline;
// each call runs the one its instruction-set level names (common/cpu_isa.h:
// the CPU's, capped by PYVQ_CPU_ISA). The shared tile code of posterior.h is
// inlined into them and its loops over positions vectorise, exp/log included
// (fast_exp, fast_log). Trapping math is off in this file so that the
// compiler may turn the branches of those loops into selects; nothing here
// reads the floating-point exception flags.
#pragma GCC optimize("no-trapping-math")

#include "common/build_facts.h"
#include "common/cpu_isa.h"
#include "posterior/posterior_common.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

namespace pyvq {
namespace posterior {
namespace {

constexpr int kTile = 64;  // most positions per tile
// Positions per tile for K classes: the tile's K x n slice of the logits
// (read by every pass) stays within about 512 KiB, inside L2.
inline int tile_for(int64_t K) {
  int n = kTile;
  while (n > 4 && K * n > 131072) n /= 2;
  return n;
}

inline int64_t num_tasks(const Shape& s) {
  return s.B * ((s.S + tile_for(s.K) - 1) / tile_for(s.K));
}

// Tasks [t0, t1) of one op.
template <Op op, typename scalar_t, typename acc_t>
PYVQ_POSTERIOR_FN void run_tiles(const Prepared& p, int64_t t0, int64_t t1) {
  const Ptrs<scalar_t, acc_t> ptr = pointers<scalar_t, acc_t>(p);
  const int tile = tile_for(ptr.K);
  const int64_t tiles = (ptr.S + tile - 1) / tile;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / tiles, s0 = (t % tiles) * tile;
    run_tile<op, scalar_t, acc_t, double, kTile>(
        ptr, b, s0, static_cast<int>(std::min<int64_t>(tile, ptr.S - s0)));
  }
}

// The best instruction-set level these kernels have code for in this build.
constexpr CpuIsa kPosteriorIsa = PYVQ_CPU_AVX512_BUILD ? CpuIsa::kAvx512 : CpuIsa::kGeneric;

// The float32 tasks of every op but the true posterior (a pure write, no
// per-class math), once per instruction set. Not inlined into the launcher,
// so each is one function compiled for exactly one target.
template <Op op>
__attribute__((noinline)) PYVQ_TARGET_AVX512 void run_tiles_f32_avx512(const Prepared& p,
                                                                       int64_t t0, int64_t t1) {
  run_tiles<op, float, float>(p, t0, t1);
}
template <Op op>
__attribute__((noinline)) void run_tiles_f32_generic(const Prepared& p, int64_t t0, int64_t t1) {
  run_tiles<op, float, float>(p, t0, t1);
}

template <Op op>
at::Tensor launch(const Prepared& p) {
  // Once per call, outside the parallel region: PYVQ_CPU_ISA may change between calls.
  const bool avx512 = cpu_isa_for(kPosteriorIsa) >= CpuIsa::kAvx512;
  dispatch_floating(p.out.scalar_type(), [&](auto sv, auto av) {
    using scalar_t = decltype(sv);
    using acc_t = decltype(av);
    at::parallel_for(0, num_tasks(p.shape), 1, [&](int64_t t0, int64_t t1) {
      if constexpr (std::is_same_v<scalar_t, float> && op != Op::kTruePosterior) {
        if (avx512)
          run_tiles_f32_avx512<op>(p, t0, t1);
        else
          run_tiles_f32_generic<op>(p, t0, t1);
      } else {
        run_tiles<op, scalar_t, acc_t>(p, t0, t1);
      }
    });
  });
  return p.out;
}

at::Tensor posterior_cpu(const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& alpha_t,
                         const at::Tensor& alpha_bar_prev, int64_t num_classes) {
  Prepared p = prepare_posterior(x_t, x0, alpha_t, alpha_bar_prev, num_classes);
  return p.logits.defined() ? launch<Op::kModelPosterior>(p) : launch<Op::kTruePosterior>(p);
}

at::Tensor posterior_backward_cpu(const at::Tensor& grad, const at::Tensor& x_t,
                                  const at::Tensor& logits, const at::Tensor& alpha_t,
                                  const at::Tensor& alpha_bar_prev) {
  return launch<Op::kModelPosteriorBackward>(
      prepare_posterior_backward(grad, x_t, logits, alpha_t, alpha_bar_prev));
}

at::Tensor kl_cpu(const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& logits,
                  const at::Tensor& alpha_t, const at::Tensor& alpha_bar_prev) {
  return launch<Op::kKl>(prepare_kl(at::Tensor(), x_t, x0, logits, alpha_t, alpha_bar_prev));
}

at::Tensor kl_backward_cpu(const at::Tensor& grad, const at::Tensor& x_t, const at::Tensor& x0,
                           const at::Tensor& logits, const at::Tensor& alpha_t,
                           const at::Tensor& alpha_bar_prev) {
  return launch<Op::kKlBackward>(prepare_kl(grad, x_t, x0, logits, alpha_t, alpha_bar_prev));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvq, CPU, m) {
  m.impl("multinomial_posterior", &posterior_cpu);
  m.impl("_multinomial_posterior_backward", &posterior_backward_cpu);
  m.impl("multinomial_kl", &kl_cpu);
  m.impl("_multinomial_kl_backward", &kl_backward_cpu);
}

PYVQ_REGISTER_CPU_OP("multinomial_posterior", kPosteriorIsa);
PYVQ_REGISTER_CPU_OP("multinomial_kl", kPosteriorIsa);

}  // namespace posterior
}  // namespace pyvq
