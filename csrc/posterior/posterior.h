// Shared math of the multinomial (uniform-transition) diffusion posterior,
// VQ-DDM's q(z_{t-1} | z_t, z_0) and p_theta(z_{t-1} | z_t):
//
//   theta_k ∝ [alpha * [k == z_t] + c1] * [abar * p0_k + c2],
//   c1 = (1 - alpha) / K,  c2 = (1 - abar) / K,
//
// alpha = alpha_t, abar = alpha_bar_{t-1}, p0 = onehot(z_0) (true posterior
// q) or softmax(logits) (model posterior p). Both factors sum to one over k,
// so the normaliser is closed-form:
//
//   Z = sum_k theta_k = c1 + alpha * (abar * p0[z_t] + c2),
//
// and q, whose rows take at most three distinct values ("other", "hit" at
// k == z_t, and k == z_0), needs no pass over the classes at all. Only
// the model side loops over K:
//   g_k   = log(abar * softmax_k + c2)                    (log second factor)
//   log p_k = log f_k + g_k - log Z,  f_k = alpha [k == z_t] + c1
//   r_k   = abar * softmax_k / (abar * softmax_k + c2) = d g_k / d ls_k
// and the gradient of sum_k coef_k * log p_k (coef = q for the KL, the
// upstream gradient for the posterior) with respect to logit j is
//   coef_j r_j + softmax_j (W - S) - W [j == z_t],
//   S = sum_k coef_k r_k,  W = (sum_k coef_k) * alpha * abar * softmax[z_t] / Z.
//
// Memory layout: logits (B, K, S) contiguous; a position is (b, s) and its
// K classes are S elements apart. The *_tile functions below handle TILE
// consecutive positions of one batch row: the CPU launcher calls them with
// TILE = 64 (the inner loops run over contiguous positions, so a tile's
// K x 64 slice stays in cache across the passes), the CUDA launcher with
// TILE = 1 from one thread per position (neighbouring threads read
// neighbouring addresses). Nothing of size K is ever stored besides the
// output; every pass recomputes what it needs from the logits.
#pragma once

#include "common/fast_math.h"
#include "common/macros.h"

#include <cmath>
#include <cstdint>

// Everything here is inlined into its caller: on CPU the loops over
// positions then vectorise inside the launcher's per-ISA builds of them.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYVQ_POSTERIOR_FN PYVQ_HOST_DEVICE
#else
#define PYVQ_POSTERIOR_FN inline __attribute__((always_inline))
#endif

namespace pyvq {
namespace posterior {

PYVQ_POSTERIOR_FN float pexp(float x) { return ::expf(x); }
PYVQ_POSTERIOR_FN double pexp(double x) { return ::exp(x); }
PYVQ_POSTERIOR_FN float plog(float x) { return ::logf(x); }
PYVQ_POSTERIOR_FN double plog(double x) { return ::log(x); }
PYVQ_POSTERIOR_FN float plog1p(float x) { return ::log1pf(x); }
PYVQ_POSTERIOR_FN double plog1p(double x) { return ::log1p(x); }

// The vectorisable float exp / log / log1p (common/fast_math.h).
using ::pyvq::fast_exp;
using ::pyvq::fast_log;
using ::pyvq::fast_log1p;

template <typename A>
PYVQ_POSTERIOR_FN A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// log(exp(a) + exp(b)), exact when either is -inf.
template <typename A>
PYVQ_POSTERIOR_FN A log_add_exp(A a, A b) {
  const A hi = a > b ? a : b, lo = a > b ? b : a;
  if (lo == neg_inf<A>()) return hi;
  return hi + plog1p(pexp(lo - hi));
}

// q * log q for q = exp(lq), with 0 log 0 = 0.
template <typename A>
PYVQ_POSTERIOR_FN A xlogx_from_log(A lq) {
  return lq == neg_inf<A>() ? A(0) : pexp(lq) * lq;
}

// Everything about one (alpha_t, alpha_bar_{t-1}) pair; one per batch row.
template <typename A>
struct Coeffs {
  A alpha, abar, c1, c2;
  A log_alpha, log_abar, log_c1, log_c2;
  A log_f_hit;  // log(alpha + c1): the first factor at k == z_t
};

template <typename A>
PYVQ_POSTERIOR_FN Coeffs<A> make_coeffs(A alpha, A abar, int64_t K) {
  Coeffs<A> c;
  c.alpha = alpha;
  c.abar = abar;
  c.c1 = (A(1) - alpha) / A(K);
  c.c2 = (A(1) - abar) / A(K);
  c.log_alpha = plog(alpha);
  c.log_abar = plog(abar);
  c.log_c1 = plog(c.c1);  // -inf when alpha == 1
  c.log_c2 = plog(c.c2);  // -inf when abar == 1
  c.log_f_hit = plog(alpha + c.c1);
  return c;
}

// The true posterior's three values, in log space and as probabilities:
// "other" (k not z_t nor z_0), "hit" (k == z_t) and "x0" (k == z_0 != z_t).
template <typename A>
struct TrueQ {
  A log_other, log_hit, log_x0;
  A other, hit, x0;
  A log_z;        // log of the normaliser of the unnormalised factors
  A n_other;      // how many classes take the "other" value
  A neg_entropy;  // sum_k q_k log q_k
  bool empty;     // alpha == abar == 1 and z_t != z_0: z_t cannot follow z_0,
                  // q is 0 / 0; every class gets -inf and the KL is 0
};

template <typename A>
PYVQ_POSTERIOR_FN TrueQ<A> make_true_q(const Coeffs<A>& c, bool same, int64_t K) {
  // Unnormalised factors: other c1 * c2; hit (alpha + c1)(abar [same] + c2);
  // x0 c1 (abar + c2); normaliser c1 + alpha (abar [same] + c2).
  const A log_second_hit = same ? plog(c.abar + c.c2) : c.log_c2;
  const A log_z = log_add_exp(c.log_c1, c.log_alpha + log_second_hit);
  TrueQ<A> q;
  q.log_z = log_z;
  q.empty = log_z == neg_inf<A>();
  if (q.empty) {
    q.log_other = q.log_hit = q.log_x0 = neg_inf<A>();
    q.other = q.hit = q.x0 = q.neg_entropy = A(0);
    q.n_other = A(K - (same ? 1 : 2));
    return q;
  }
  q.log_other = c.log_c1 + c.log_c2 - log_z;
  q.log_hit = c.log_f_hit + log_second_hit - log_z;
  q.log_x0 = same ? neg_inf<A>() : c.log_c1 + plog(c.abar + c.c2) - log_z;
  q.other = pexp(q.log_other);
  q.hit = pexp(q.log_hit);
  q.x0 = pexp(q.log_x0);
  q.n_other = A(K - (same ? 1 : 2));
  q.neg_entropy = (q.n_other > 0 ? q.n_other * xlogx_from_log(q.log_other) : A(0)) +
                  xlogx_from_log(q.log_hit) + xlogx_from_log(q.log_x0);
  return q;
}

template <typename A>
PYVQ_POSTERIOR_FN A true_log_q(const TrueQ<A>& q, bool is_hit, bool is_x0) {
  return is_hit ? q.log_hit : (is_x0 ? q.log_x0 : q.log_other);
}

// g = log(abar * softmax + c2) from ls = log softmax.
template <typename A>
PYVQ_POSTERIOR_FN A model_log_g(A ls, const Coeffs<A>& c) {
  return c.c2 > A(0) ? fast_log(c.abar * fast_exp(ls) + c.c2) : c.log_abar + ls;
}

// r = abar * softmax / (abar * softmax + c2) from softmax sm.
template <typename A>
PYVQ_POSTERIOR_FN A model_ratio(A sm, const Coeffs<A>& c) {
  if (!(c.c2 > A(0))) return A(1);
  const A u = c.abar * sm;
  return u / (u + c.c2);
}

// log Z of the model posterior from g at k == z_t.
template <typename A>
PYVQ_POSTERIOR_FN A model_log_z(A g_hit, const Coeffs<A>& c) {
  return log_add_exp(c.log_c1, c.log_alpha + g_hit);
}

// ---------------------------------------------------------------- tiles
// `lg` points at logits[b, 0, s0]; class k of position i is lg[k * S + i].
// Sums over the K classes run in `Sum` (double on CPU, where it costs
// little and keeps float32 results as accurate as the reference's; the
// accumulation type A on CUDA), everything else in A.

// log sum_k exp(l_k) kept as its two parts, the max m and log sum exp(l - m):
// l - lse is formed as (l - m) - log_sum, so huge logits (|l| >> log K,
// where m + log_sum would round to m) keep the log_sum term.
template <typename A>
struct Lse {
  A m;
  A log_sum;
};

template <typename A>
PYVQ_POSTERIOR_FN A operator-(A l, const Lse<A>& lse) {
  return (l - lse.m) - lse.log_sum;
}

template <typename scalar_t, typename A, typename Sum, int TILE>
PYVQ_POSTERIOR_FN void log_sum_exp_tile(const scalar_t* lg, int64_t K, int64_t S, int n, Lse<A>* lse) {
  A m[TILE];
  Sum sum[TILE];
  for (int i = 0; i < n; ++i) m[i] = neg_inf<A>(), sum[i] = Sum(0);
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = lg + k * S;
    for (int i = 0; i < n; ++i) {
      const A v = static_cast<A>(row[i]);
      m[i] = v > m[i] ? v : m[i];
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = lg + k * S;
    for (int i = 0; i < n; ++i) sum[i] += fast_exp(static_cast<A>(row[i]) - m[i]);
  }
  for (int i = 0; i < n; ++i) lse[i] = Lse<A>{m[i], static_cast<A>(plog(sum[i]))};
}

template <typename scalar_t, typename A>
PYVQ_POSTERIOR_FN A log_softmax_at(const scalar_t* lg, int64_t S, int i, int64_t k, const Lse<A>& lse) {
  return static_cast<A>(lg[k * S + i]) - lse;
}

// log q (index x0) into out[b, :, s0..]: a pure write.
template <typename out_t, typename A, int TILE>
PYVQ_POSTERIOR_FN void true_posterior_tile(const int64_t* xt, const int64_t* x0, int64_t K,
                                           int64_t S, int n, const Coeffs<A>& c, out_t* out) {
  const TrueQ<A> q_same = make_true_q(c, true, K), q_diff = make_true_q(c, false, K);
  for (int64_t k = 0; k < K; ++k) {
    out_t* row = out + k * S;
    for (int i = 0; i < n; ++i) {
      const TrueQ<A>& q = xt[i] == x0[i] ? q_same : q_diff;
      row[i] = static_cast<out_t>(true_log_q(q, k == xt[i], k == x0[i]));
    }
  }
}

// log p (logits) into out[b, :, s0..].
template <typename scalar_t, typename A, typename Sum, int TILE>
PYVQ_POSTERIOR_FN void model_posterior_tile(const scalar_t* lg, const int64_t* xt, int64_t K,
                                            int64_t S, int n, const Coeffs<A>& c, scalar_t* out) {
  Lse<A> lse[TILE];
  A log_z[TILE];
  log_sum_exp_tile<scalar_t, A, Sum, TILE>(lg, K, S, n, lse);
  for (int i = 0; i < n; ++i)
    log_z[i] = model_log_z(model_log_g(log_softmax_at(lg, S, i, xt[i], lse[i]), c), c);
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = lg + k * S;
    scalar_t* orow = out + k * S;
    for (int i = 0; i < n; ++i) {
      const A f = k == xt[i] ? c.log_f_hit : c.log_c1;
      orow[i] =
          static_cast<scalar_t>(f + model_log_g(static_cast<A>(row[i]) - lse[i], c) - log_z[i]);
    }
  }
}

// w = alpha * abar * softmax[z_t] / Z, the z_t weight of d log Z / d logits.
template <typename scalar_t, typename A>
PYVQ_POSTERIOR_FN A model_hit_weight(const scalar_t* lg, int64_t S, int i, int64_t xt, const Lse<A>& lse,
                                     const Coeffs<A>& c) {
  const A ls = log_softmax_at(lg, S, i, xt, lse);
  const A g = model_log_g(ls, c);
  return pexp(c.log_alpha + g - model_log_z(g, c)) * model_ratio(fast_exp(ls), c);
}

// grad[b, :, s0..] = scale_i * (coef_k r_k + softmax_k (W_i - S_i) - W_i [k == z_t]);
// coef(k, i) gives coef_k of position i.
template <typename scalar_t, typename A, int TILE, typename Coef>
PYVQ_POSTERIOR_FN void write_grad_tile(const scalar_t* lg, const int64_t* xt, int64_t K, int64_t S,
                                       int n, const Coeffs<A>& c, const Lse<A>* lse, const A* scale,
                                       const A* W, const A* Ssum, Coef coef, scalar_t* grad) {
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = lg + k * S;
    scalar_t* grow = grad + k * S;
    for (int i = 0; i < n; ++i) {
      const A sm = fast_exp(static_cast<A>(row[i]) - lse[i]);
      const A v =
          coef(k, i) * model_ratio(sm, c) + sm * (W[i] - Ssum[i]) - (k == xt[i] ? W[i] : A(0));
      grow[i] = static_cast<scalar_t>(scale[i] * v);
    }
  }
}

// coef of the posterior's backward: the upstream gradient, zero at the
// classes that are a constant -inf (all but z_t when alpha == 1).
template <typename scalar_t, typename A>
struct UpstreamCoef {
  const scalar_t* gout;
  const int64_t* xt;
  int64_t S;
  bool all_live;
  PYVQ_POSTERIOR_FN A operator()(int64_t k, int i) const {
    return all_live || k == xt[i] ? static_cast<A>(gout[k * S + i]) : A(0);
  }
};

// coef of the KL's backward: the true posterior q_k.
template <typename A>
struct TrueQCoef {
  const int64_t *xt, *x0;
  const TrueQ<A>*q_same, *q_diff;
  PYVQ_POSTERIOR_FN A operator()(int64_t k, int i) const {
    const TrueQ<A>& q = xt[i] == x0[i] ? *q_same : *q_diff;
    return k == xt[i] ? q.hit : (k == x0[i] ? q.x0 : q.other);
  }
};

// Backward of model_posterior_tile: grad_out gout[b, :, s0..] -> grad logits.
// With alpha == 1 every class but z_t is a constant -inf: its upstream
// gradient is ignored (as autograd of the reference does).
template <typename scalar_t, typename A, typename Sum, int TILE>
PYVQ_POSTERIOR_FN void model_posterior_backward_tile(const scalar_t* gout, const scalar_t* lg,
                                                     const int64_t* xt, int64_t K, int64_t S, int n,
                                                     const Coeffs<A>& c, scalar_t* grad) {
  Lse<A> lse[TILE];
  A Ra[TILE], W[TILE], one[TILE];
  Sum R[TILE], G[TILE];
  const bool all_live = c.c1 > A(0);
  log_sum_exp_tile<scalar_t, A, Sum, TILE>(lg, K, S, n, lse);
  for (int i = 0; i < n; ++i) R[i] = Sum(0), G[i] = Sum(0), one[i] = A(1);
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = lg + k * S;
    const scalar_t* grow = gout + k * S;
    for (int i = 0; i < n; ++i) {
      const A go = all_live || k == xt[i] ? static_cast<A>(grow[i]) : A(0);
      G[i] += go;
      R[i] += go * model_ratio(fast_exp(static_cast<A>(row[i]) - lse[i]), c);
    }
  }
  for (int i = 0; i < n; ++i) {
    W[i] = static_cast<A>(G[i]) * model_hit_weight(lg, S, i, xt[i], lse[i], c);
    Ra[i] = static_cast<A>(R[i]);
  }
  write_grad_tile<scalar_t, A, TILE>(lg, xt, K, S, n, c, lse, one, W, Ra,
                                     UpstreamCoef<scalar_t, A>{gout, xt, S, all_live}, grad);
}

// Per position, one pass over the classes when q has an "other" value
// (c1 > 0 and c2 > 0; otherwise only the at most two special classes carry
// mass and nothing is summed): the forward sums h_k = log1p(abar softmax_k
// / c2) = g_k - log c2 >= 0 (small, same-signed terms: no cancellation),
// the backward sums r_k.
template <typename scalar_t, typename A, typename Sum, int TILE>
PYVQ_POSTERIOR_FN void kl_sums_tile(const scalar_t* lg, int64_t K, int64_t S, int n,
                                    const Coeffs<A>& c, const Lse<A>* lse, bool forward, A* out) {
  Sum acc[TILE];
  for (int i = 0; i < n; ++i) acc[i] = Sum(0);
  if (c.c1 > A(0) && c.c2 > A(0)) {
    const A scale = c.abar / c.c2;
    for (int64_t k = 0; k < K; ++k) {
      const scalar_t* row = lg + k * S;
      for (int i = 0; i < n; ++i) {
        const A sm = fast_exp(static_cast<A>(row[i]) - lse[i]);
        acc[i] += forward ? fast_log1p(scale * sm) : model_ratio(sm, c);
      }
    }
  }
  for (int i = 0; i < n; ++i) out[i] = static_cast<A>(acc[i]);
}

// q * (log q - log p) summed over a class group of total mass `mass`, with
// 0 log 0 = 0.
template <typename A>
PYVQ_POSTERIOR_FN A kl_term(A mass, A diff) {
  return mass > A(0) ? mass * diff : A(0);
}

// KL(q || p) per position into out[b, s0..]. Per class, log q - log p is
//   hit:   log(abar [same] + c2) - g_hit + dZ
//   x0:    log(abar + c2) - g_x0 + dZ
//   other: dZ - h_k,            dZ = log Z_p - log Z_q,
// so the "other" classes contribute other * (n_other dZ - sum_other h_k).
template <typename scalar_t, typename A, typename Sum, int TILE>
PYVQ_POSTERIOR_FN void kl_forward_tile(const scalar_t* lg, const int64_t* xt, const int64_t* x0,
                                       int64_t K, int64_t S, int n, const Coeffs<A>& c,
                                       scalar_t* out) {
  Lse<A> lse[TILE];
  A sum_h[TILE];
  log_sum_exp_tile<scalar_t, A, Sum, TILE>(lg, K, S, n, lse);
  kl_sums_tile<scalar_t, A, Sum, TILE>(lg, K, S, n, c, lse, true, sum_h);
  const TrueQ<A> q_same = make_true_q(c, true, K), q_diff = make_true_q(c, false, K);
  const A log_abar_c2 = plog(c.abar + c.c2);
  for (int i = 0; i < n; ++i) {
    const bool same = xt[i] == x0[i];
    const TrueQ<A>& q = same ? q_same : q_diff;
    if (q.empty) {
      out[i] = static_cast<scalar_t>(0);
      continue;
    }
    const A ls_hit = log_softmax_at(lg, S, i, xt[i], lse[i]);
    const A g_hit = model_log_g(ls_hit, c);
    const A d_z = model_log_z(g_hit, c) - q.log_z;
    A kl = kl_term(q.hit, (same ? log_abar_c2 : c.log_c2) - g_hit + d_z);
    A h_special = A(0);
    if (q.other > A(0)) h_special += fast_log1p(c.abar / c.c2 * fast_exp(ls_hit));
    if (!same) {
      const A ls_x0 = log_softmax_at(lg, S, i, x0[i], lse[i]);
      kl += kl_term(q.x0, log_abar_c2 - model_log_g(ls_x0, c) + d_z);
      if (q.other > A(0)) h_special += fast_log1p(c.abar / c.c2 * fast_exp(ls_x0));
    }
    kl += kl_term(q.other, q.n_other * d_z - (sum_h[i] - h_special));
    out[i] = static_cast<scalar_t>(kl);
  }
}

// Backward of kl_forward_tile: gout[b, s0..] -> grad logits.
template <typename scalar_t, typename A, typename Sum, int TILE>
PYVQ_POSTERIOR_FN void kl_backward_tile(const scalar_t* gout, const scalar_t* lg, const int64_t* xt,
                                        const int64_t* x0, int64_t K, int64_t S, int n,
                                        const Coeffs<A>& c, scalar_t* grad) {
  Lse<A> lse[TILE];
  A sum_r[TILE], scale[TILE], W[TILE], Ssum[TILE];
  log_sum_exp_tile<scalar_t, A, Sum, TILE>(lg, K, S, n, lse);
  kl_sums_tile<scalar_t, A, Sum, TILE>(lg, K, S, n, c, lse, false, sum_r);
  const TrueQ<A> q_same = make_true_q(c, true, K), q_diff = make_true_q(c, false, K);
  for (int i = 0; i < n; ++i) {
    const bool same = xt[i] == x0[i];
    const TrueQ<A>& q = same ? q_same : q_diff;
    const A r_hit = model_ratio(fast_exp(log_softmax_at(lg, S, i, xt[i], lse[i])), c);
    const A r_x0 = same ? A(0) : model_ratio(fast_exp(log_softmax_at(lg, S, i, x0[i], lse[i])), c);
    A s = q.hit * r_hit + (same ? A(0) : q.x0 * r_x0);
    if (q.other > A(0)) s += q.other * (sum_r[i] - r_hit - (same ? A(0) : r_x0));
    Ssum[i] = s;
    W[i] = model_hit_weight(lg, S, i, xt[i], lse[i], c);   // sum_k q_k = 1
    scale[i] = q.empty ? A(0) : -static_cast<A>(gout[i]);  // KL = const - sum_k q_k log p_k
  }
  write_grad_tile<scalar_t, A, TILE>(lg, xt, K, S, n, c, lse, scale, W, Ssum,
                                     TrueQCoef<A>{xt, x0, &q_same, &q_diff}, grad);
}

// ---------------------------------------------------------------- one tile of an op
enum class Op { kTruePosterior, kModelPosterior, kModelPosteriorBackward, kKl, kKlBackward };

// The raw inputs and output of one call (launchers fill it from tensors), all contiguous. B, K
// and S are the batch rows, classes and positions per row; logits is null for kTruePosterior
// (whose scalar_t is A), grad (the upstream gradient) is set for the backward ops only, x0 for
// the ops that take class indices.
template <typename scalar_t, typename A>
struct Ptrs {
  const A* alpha_t;         // (B,)
  const A* alpha_bar_prev;  // (B,)
  const scalar_t* logits;   // (B, K, S)
  const scalar_t* grad;     // (B, K, S), or (B, S) for kKlBackward
  const int64_t* x_t;       // (B, S)
  const int64_t* x0;        // (B, S)
  scalar_t* out;            // (B, K, S), or (B, S) for kKl
  int64_t B, K, S;
};

// Positions s0 .. s0 + n - 1 of batch row b.
template <Op op, typename scalar_t, typename A, typename Sum, int TILE>
PYVQ_POSTERIOR_FN void run_tile(const Ptrs<scalar_t, A>& ptr, int64_t b, int64_t s0, int n) {
  const int64_t K = ptr.K, S = ptr.S;
  const Coeffs<A> c = make_coeffs<A>(ptr.alpha_t[b], ptr.alpha_bar_prev[b], K);
  const int64_t off = b * K * S + s0, pos = b * S + s0;  // into (B, K, S) and (B, S)
  if constexpr (op == Op::kTruePosterior) {
    true_posterior_tile<scalar_t, A, TILE>(ptr.x_t + pos, ptr.x0 + pos, K, S, n, c, ptr.out + off);
  } else if constexpr (op == Op::kModelPosterior) {
    model_posterior_tile<scalar_t, A, Sum, TILE>(ptr.logits + off, ptr.x_t + pos, K, S, n, c,
                                                 ptr.out + off);
  } else if constexpr (op == Op::kModelPosteriorBackward) {
    model_posterior_backward_tile<scalar_t, A, Sum, TILE>(ptr.grad + off, ptr.logits + off,
                                                          ptr.x_t + pos, K, S, n, c, ptr.out + off);
  } else if constexpr (op == Op::kKl) {
    kl_forward_tile<scalar_t, A, Sum, TILE>(ptr.logits + off, ptr.x_t + pos, ptr.x0 + pos, K, S, n,
                                            c, ptr.out + pos);
  } else {
    kl_backward_tile<scalar_t, A, Sum, TILE>(ptr.grad + pos, ptr.logits + off, ptr.x_t + pos,
                                             ptr.x0 + pos, K, S, n, c, ptr.out + off);
  }
}

}  // namespace posterior
}  // namespace pyvq
