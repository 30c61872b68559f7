// Nearest-codebook search: the arithmetic shared by the CPU and CUDA kernels.
//
// Both backends rank code k for row x by a *score* that has the same argmin
// as the requested distance but needs only one dot product per pair:
//
//   metric "l2":      score = ||c_k||^2 - 2 <x, c_k>      (||x||^2 dropped)
//   metric "cosine":  score = -<x, c_k / max(||c_k||, eps)>
//
// Kernels pre-scale the codebook by `score_scale(metric)` (-2 or -1, a power
// of two, so the scaling is exact) and add `code_bias(metric, ||c||^2)`, so
// the inner loop is a plain dot product plus an add. Once the best index is
// known, the reported distance is recomputed exactly from the two vectors
// (`l2_distance` / `cosine_distance`), which avoids the cancellation of the
// expanded formula.
//
// Ordering (`better`): smaller score wins, ties go to the lower index, and a
// NaN score beats every number, as torch.argmin treats NaN. Rows containing
// NaN therefore pick the first code (every score is NaN) and report NaN.
#pragma once

#include "common/macros.h"

#include <cmath>
#include <cstdint>

namespace pyvq {
namespace codebook {

enum class Metric : int { L2 = 0, Cosine = 1 };

// eps of the cosine metric's norm clamp, as torch.nn.functional.normalize.
constexpr double kCosineEps = 1e-12;

template <typename acc_t>
PYVQ_HOST_DEVICE acc_t score_scale(Metric m) {
  return m == Metric::L2 ? acc_t(-2) : acc_t(-1);
}

// Additive per-code term of the score; `sumsq` is ||c||^2 of the raw code.
template <typename acc_t>
PYVQ_HOST_DEVICE acc_t code_bias(Metric m, acc_t sumsq) {
  return m == Metric::L2 ? sumsq : acc_t(0);
}

// Factor applied to a raw code before the dot product (cosine normalises).
template <typename acc_t>
PYVQ_HOST_DEVICE acc_t code_factor(Metric m, acc_t sumsq) {
  if (m == Metric::L2) return acc_t(1);
  acc_t n = sqrt(sumsq);
  return acc_t(1) / (n > acc_t(kCosineEps) ? n : acc_t(kCosineEps));
}

template <typename acc_t>
PYVQ_HOST_DEVICE bool is_nan(acc_t v) {
  return v != v;
}

// True when (score, index) should replace (best, best_index).
template <typename acc_t>
PYVQ_HOST_DEVICE bool better(acc_t score, int64_t index, acc_t best, int64_t best_index) {
  const bool sn = is_nan(score), bn = is_nan(best);
  if (sn || bn) return sn && (!bn || index < best_index);
  return score < best || (score == best && index < best_index);
}

// Partial sums per distance: independent accumulators break the add
// dependency chain and let the compiler vectorise the loop on the CPU.
constexpr int kSumLanes = 8;

// Exact squared L2 distance between two rows of length d.
template <typename scalar_t, typename acc_t>
PYVQ_HOST_DEVICE acc_t l2_distance(const scalar_t* x, const scalar_t* c, int64_t d) {
  acc_t s[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= d; i += kSumLanes) {
    for (int j = 0; j < kSumLanes; ++j) {
      const acc_t t = acc_t(x[i + j]) - acc_t(c[i + j]);
      s[j] += t * t;
    }
  }
  for (; i < d; ++i) {
    const acc_t t = acc_t(x[i]) - acc_t(c[i]);
    s[0] += t * t;
  }
  acc_t total = 0;
  for (int j = 0; j < kSumLanes; ++j) total += s[j];
  return total;
}

// 1 - cos(x, c) with both norms clamped below by kCosineEps.
template <typename scalar_t, typename acc_t>
PYVQ_HOST_DEVICE acc_t cosine_distance(const scalar_t* x, const scalar_t* c, int64_t d) {
  acc_t xy[kSumLanes] = {}, xx[kSumLanes] = {}, cc[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= d; i += kSumLanes) {
    for (int j = 0; j < kSumLanes; ++j) {
      const acc_t a = acc_t(x[i + j]), b = acc_t(c[i + j]);
      xy[j] += a * b;
      xx[j] += a * a;
      cc[j] += b * b;
    }
  }
  for (; i < d; ++i) {
    const acc_t a = acc_t(x[i]), b = acc_t(c[i]);
    xy[0] += a * b;
    xx[0] += a * a;
    cc[0] += b * b;
  }
  acc_t sxy = 0, sxx = 0, scc = 0;
  for (int j = 0; j < kSumLanes; ++j) {
    sxy += xy[j];
    sxx += xx[j];
    scc += cc[j];
  }
  acc_t nx = sqrt(sxx), nc = sqrt(scc);
  nx = nx > acc_t(kCosineEps) ? nx : acc_t(kCosineEps);
  nc = nc > acc_t(kCosineEps) ? nc : acc_t(kCosineEps);
  return acc_t(1) - (sxy / nx) / nc;
}

template <typename scalar_t, typename acc_t>
PYVQ_HOST_DEVICE acc_t distance(Metric m, const scalar_t* x, const scalar_t* c, int64_t d) {
  return m == Metric::L2 ? l2_distance<scalar_t, acc_t>(x, c, d)
                         : cosine_distance<scalar_t, acc_t>(x, c, d);
}

}  // namespace codebook
}  // namespace pyvq
