// CPU launcher of pyvq::window_attention and pyvq::_window_attention_backward.
//
// Work: tasks ("chunks") of up to kChunk consecutive windows of one (batch, head), numbered with
// the heads fastest (the heads of a window block run one after another, so views of one qkv
// projection are read while their cache lines are still near); at::parallel_for starts one
// worker per thread and the workers claim chunks one at a time (run_chunks). Per window, the
// window's tokens are gathered from their original positions (any strides, index math of
// window_attention.h) into small contiguous tiles in the accumulation type (float for float16 /
// bfloat16 / float32, double for float64), the window is computed on the tiles, and its results
// are written back at the tokens' original positions. Nothing of the size of the partition, the
// rolled grid, the mask or the (windows, N, N) attention matrix is built; a worker's tiles are a
// few tens of KiB at Swin's sizes (N = w * w tokens of head_dim d), within L1 / L2.
//
// Tile layout (row-major, 64-byte aligned; NP = N and DP = d rounded up to 64 bytes):
//   q, k, v, dout, o, dq, dk, dv   N x DP   token rows (q pre-multiplied by scale)
//   kt, vt                         d x NP   transposed: row t holds component t of every key
//   s, dp, bias, dbias             N x NP   scores / probabilities, their gradients, the head's
//                                           expanded bias (one tile per head: Worker), dbias sums
// Every product is one register-blocked micro-kernel, C = [C0 +] A B with A read through
// arbitrary strides (so transposed operands need no copy) and B's rows contiguous:
//   S  = bias + q kt      (a score row is an axpy over the keys: vectorises over keys)
//   O  = P v              (an axpy over head_dim)
//   dP = dout vt,  dS = P * (dP - D),  dq = scale dS k,  dk = dS^T q_scaled,  dv = P^T dout.
// kt and vt are in-register block transposes of the gathered k and v rows. The softmax is fused
// per row (max, exp, sum; logsumexp saved); backward recomputes P from the saved logsumexp. The
// mask is applied from region ids only in windows that mix regions (the last window row and
// column of a shifted grid).
//
// Deterministic: a chunk owns its windows' outputs; the bias-table gradient is summed per chunk
// (windows in order) into its own partial table, and the partial tables are added in chunk order
// after the parallel loop, so no result depends on the thread count or on which worker ran a
// chunk.
//
// Instruction sets: the per-window compute (micro-kernel, softmax, transposes) is compiled twice
// from one template, for AVX-512 (PYVQ_TARGET_AVX512: x86-64-v4, 64-byte vectors) and for the
// baseline (16-byte vectors), and each call runs the one cpu_isa_for() names (common/cpu_isa.h).
// Gathers and scatters (dtype conversions, strided reads) stay in baseline code, where c10's
// float16 / bfloat16 conversions inline. Trapping math is off so that the compiler may turn
// branches into selects; nothing here reads the floating-point exception flags.
#pragma GCC optimize("no-trapping-math")
// Vectors pass between always-inline helpers only (never across a real call), so the
// ABI note GCC gives for them in baseline code does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "common/build_facts.h"
#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/fast_math.h"  // fast_exp, fast_log: the vectorisable float exp and log
#include "window_attention/window_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace pyvq {
namespace window_attention {
namespace {

constexpr int64_t kMaxWindow = 32;  // pyvq/ops/window_attention.py MAX_WINDOW
constexpr int64_t kChunk = 4;       // windows per task (fixed: results must not depend on threads)

#define PYVQ_WA_INLINE inline __attribute__((always_inline))

// --- per-window compute: inlined into the two ISA builds below -----------------------------------

// VB-byte vectors of T: 64 (AVX-512) in the AVX-512 build, 16 (SSE2) in the baseline one.
template <typename T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> lane_index;
  typedef lane_index index __attribute__((vector_size(VB)));  // a shuffle mask of `type`
};
template <typename T, int VB>
constexpr int64_t kLanes = VB / sizeof(T);

// Tiles are padded to 64-byte vectors whichever build runs (a multiple of either's lanes).
template <typename T>
constexpr int64_t kPad = 64 / sizeof(T);

template <typename T, int VB>
PYVQ_WA_INLINE typename VecOf<T, VB>::type* vec_at(T* p) {
  return reinterpret_cast<typename VecOf<T, VB>::type*>(p);
}
template <typename T, int VB>
PYVQ_WA_INLINE const typename VecOf<T, VB>::type* vec_at(const T* p) {
  return reinterpret_cast<const typename VecOf<T, VB>::type*>(p);
}

// One R x (V vectors) block of C = [C0 +] A B: C[r][l] = C0[r][l] + sum_t A[r * ars + t * acs] *
// B[t * ldb + l]. The R x V accumulators stay in registers; per t it loads V vectors of B and
// broadcasts R scalars of A.
template <typename T, int VB, int R, int V, bool kInit>
PYVQ_WA_INLINE void mk_block(const T* __restrict A, int64_t ars, int64_t acs,
                             const T* __restrict B, int64_t ldb, int64_t nt,
                             const T* __restrict C0, T* __restrict C, int64_t ldc) {
  using vec = typename VecOf<T, VB>::type;
  constexpr int64_t L = kLanes<T, VB>;
  vec acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      if constexpr (kInit)
        acc[r][v] = *vec_at<T, VB>(C0 + r * ldc + v * L);
      else
        acc[r][v] = vec{};
    }
  for (int64_t t = 0; t < nt; ++t) {
    vec b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = *vec_at<T, VB>(B + t * ldb + v * L);
    const T* a = A + t * acs;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T ar = a[r * ars];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] += ar * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) *vec_at<T, VB>(C + r * ldc + v * L) = acc[r][v];
}

// Rows [0, M) of one column block: full blocks of R rows, then one block of the M % R left.
template <typename T, int VB, int R, int V, bool kInit, int Rem = R - 1>
PYVQ_WA_INLINE void mk_rest(int64_t rem, const T* A, int64_t ars, int64_t acs, const T* B,
                            int64_t ldb, int64_t nt, const T* C0, T* C, int64_t ldc) {
  if constexpr (Rem >= 1) {
    if (rem == Rem)
      mk_block<T, VB, Rem, V, kInit>(A, ars, acs, B, ldb, nt, C0, C, ldc);
    else
      mk_rest<T, VB, R, V, kInit, Rem - 1>(rem, A, ars, acs, B, ldb, nt, C0, C, ldc);
  }
}

template <typename T, int VB, int R, int V, bool kInit>
PYVQ_WA_INLINE void mk_rows(int64_t M, const T* A, int64_t ars, int64_t acs, const T* B,
                            int64_t ldb, int64_t nt, const T* C0, T* C, int64_t ldc) {
  int64_t i0 = 0;
  for (; i0 + R <= M; i0 += R)
    mk_block<T, VB, R, V, kInit>(A + i0 * ars, ars, acs, B, ldb, nt, kInit ? C0 + i0 * ldc : nullptr,
                             C + i0 * ldc, ldc);
  if (i0 < M)
    mk_rest<T, VB, R, V, kInit>(M - i0, A + i0 * ars, ars, acs, B, ldb, nt,
                            kInit ? C0 + i0 * ldc : nullptr, C + i0 * ldc, ldc);
}

// C[i][0:ncols] = [C0[i][0:ncols] +] sum_{t < nt} A(i, t) B[t][0:ncols] for i < M, with
// A(i, t) = A[i * ars + t * acs]; ncols, ldb and ldc multiples of 64 bytes, B, C, C0 aligned.
// Row blocks of R x V accumulators sized to the build's vector registers.
template <typename T, int VB, bool kInit>
PYVQ_WA_INLINE void matmul(int64_t M, int64_t ncols, int64_t nt, const T* A, int64_t ars,
                           int64_t acs, const T* B, int64_t ldb, const T* C0, T* C, int64_t ldc) {
  constexpr int64_t L = kLanes<T, VB>;
  const int64_t nv = ncols / L;
  if constexpr (VB == 64) {  // 32 registers: 16 accumulators
    for (int64_t v0 = 0; v0 < nv; v0 += 4) {
      const int64_t rem = nv - v0;
      const T* Bv = B + v0 * L;
      const T* C0v = kInit ? C0 + v0 * L : nullptr;
      T* Cv = C + v0 * L;
      if (rem >= 4)
        mk_rows<T, VB, 4, 4, kInit>(M, A, ars, acs, Bv, ldb, nt, C0v, Cv, ldc);
      else if (rem == 3)
        mk_rows<T, VB, 4, 3, kInit>(M, A, ars, acs, Bv, ldb, nt, C0v, Cv, ldc);
      else if (rem == 2)
        mk_rows<T, VB, 8, 2, kInit>(M, A, ars, acs, Bv, ldb, nt, C0v, Cv, ldc);
      else
        mk_rows<T, VB, 8, 1, kInit>(M, A, ars, acs, Bv, ldb, nt, C0v, Cv, ldc);
    }
  } else {  // SSE2, 16 registers: 8 accumulators (ncols is a multiple of 64 bytes: even nv)
    for (int64_t v0 = 0; v0 < nv; v0 += 2)
      mk_rows<T, VB, 4, 2, kInit>(M, A, ars, acs, B + v0 * L, ldb, nt,
                                  kInit ? C0 + v0 * L : nullptr, C + v0 * L, ldc);
  }
}

PYVQ_WA_INLINE float wa_exp(float x) { return fast_exp(x); }
PYVQ_WA_INLINE double wa_exp(double x) { return ::exp(x); }
PYVQ_WA_INLINE float wa_log(float x) { return fast_log(x); }
PYVQ_WA_INLINE double wa_log(double x) { return ::log(x); }

// Lane l of the result holds lane l ^ half of v (swaps blocks of `half` lanes).
template <typename T, int VB, int half, int... l>
PYVQ_WA_INLINE typename VecOf<T, VB>::type swap_lanes(const typename VecOf<T, VB>::type& v,
                                                  std::integer_sequence<int, l...>) {
  return __builtin_shuffle(v, typename VecOf<T, VB>::index{(l ^ half)...});
}
template <typename T, int VB, int half>
PYVQ_WA_INLINE typename VecOf<T, VB>::type swap_lanes(const typename VecOf<T, VB>::type& v) {
  return swap_lanes<T, VB, half>(v, std::make_integer_sequence<int, static_cast<int>(kLanes<T, VB>)>{});
}

// One step of a lane reduction: the lane-wise max (kMax) or sum of a and b.
template <typename T, int VB, bool kMax>
PYVQ_WA_INLINE typename VecOf<T, VB>::type combine(const typename VecOf<T, VB>::type& a,
                                               const typename VecOf<T, VB>::type& b) {
  if constexpr (kMax)
    return a > b ? a : b;
  else
    return a + b;
}

// The max or sum of the lanes of v, in a fixed tree (the same order on every call).
template <typename T, int VB, bool kMax, int half = static_cast<int>(kLanes<T, VB>) / 2>
PYVQ_WA_INLINE T reduce_lanes(typename VecOf<T, VB>::type v) {
  if constexpr (half >= 1) {
    v = combine<T, VB, kMax>(v, swap_lanes<T, VB, half>(v));
    return reduce_lanes<T, VB, kMax, half / 2>(v);
  } else {
    return v[0];
  }
}

// Max and sum over p[0:n] (n a positive multiple of a vector): lane-wise, then over the lanes.
template <typename T, int VB, bool kMax>
PYVQ_WA_INLINE T vec_reduce(const T* p, int64_t n) {
  using vec = typename VecOf<T, VB>::type;
  constexpr int64_t L = kLanes<T, VB>;
  vec m = *vec_at<T, VB>(p);
  for (int64_t j = L; j < n; j += L) m = combine<T, VB, kMax>(m, *vec_at<T, VB>(p + j));
  return reduce_lanes<T, VB, kMax>(m);
}

template <typename T, int VB>
PYVQ_WA_INLINE T vec_max(const T* p, int64_t n) {
  return vec_reduce<T, VB, true>(p, n);
}

template <typename T, int VB>
PYVQ_WA_INLINE T vec_sum(const T* p, int64_t n) {
  return vec_reduce<T, VB, false>(p, n);
}

template <typename T, int VB>
PYVQ_WA_INLINE T vec_dot(const T* a, const T* b, int64_t n) {  // n a multiple of a vector
  using vec = typename VecOf<T, VB>::type;
  constexpr int64_t L = kLanes<T, VB>;
  vec s = vec{};
  for (int64_t j = 0; j < n; j += L) s += *vec_at<T, VB>(a + j) * *vec_at<T, VB>(b + j);
  return reduce_lanes<T, VB, false>(s);
}

// Lane l of the result: lane l of a where bit s of l is clear, else lane l - s of b (lo); lane
// l + s of a where the bit is clear, else lane l of b (hi). Applied to rows i and i + s of a block
// for s = L/2, ..., 1 this swaps its off-diagonal s x s sub-blocks at every scale: a transpose.
template <typename T, int VB, int s, bool kHi, int... l>
PYVQ_WA_INLINE typename VecOf<T, VB>::type interleave(const typename VecOf<T, VB>::type& a,
                                                  const typename VecOf<T, VB>::type& b,
                                                  std::integer_sequence<int, l...>) {
  constexpr int L = static_cast<int>(kLanes<T, VB>);
  using index = typename VecOf<T, VB>::index;
  if constexpr (kHi)
    return __builtin_shuffle(a, b, index{((l & s) ? L + l : l + s)...});
  else
    return __builtin_shuffle(a, b, index{((l & s) ? L + l - s : l)...});
}

template <typename T, int VB, int s>
PYVQ_WA_INLINE void transpose_level(typename VecOf<T, VB>::type* v) {
  constexpr int L = static_cast<int>(kLanes<T, VB>);
  const auto lanes = std::make_integer_sequence<int, L>{};
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i)
    if ((i & s) == 0) {
      const typename VecOf<T, VB>::type a = v[i], b = v[i + s];
      v[i] = interleave<T, VB, s, false>(a, b, lanes);
      v[i + s] = interleave<T, VB, s, true>(a, b, lanes);
    }
}

template <typename T, int VB, int s = static_cast<int>(kLanes<T, VB>) / 2>
PYVQ_WA_INLINE void transpose_levels(typename VecOf<T, VB>::type* v) {
  if constexpr (s >= 1) {
    transpose_level<T, VB, s>(v);
    transpose_levels<T, VB, s / 2>(v);
  }
}

// dst (cols x ldd) = src (rows x lds) transposed, rows and cols multiples of a vector, in L x L
// register blocks.
template <typename T, int VB>
PYVQ_WA_INLINE void transpose(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst,
                              int64_t ldd) {
  using vec = typename VecOf<T, VB>::type;
  constexpr int64_t L = kLanes<T, VB>;
  for (int64_t r0 = 0; r0 < rows; r0 += L)
    for (int64_t c0 = 0; c0 < cols; c0 += L) {
      vec v[L];
#pragma GCC unroll 16
      for (int64_t i = 0; i < L; ++i) v[i] = *vec_at<T, VB>(src + (r0 + i) * lds + c0);
      transpose_levels<T, VB>(v);
#pragma GCC unroll 16
      for (int64_t i = 0; i < L; ++i) *vec_at<T, VB>(dst + (c0 + i) * ldd + r0) = v[i];
    }
}

// One thread's tiles (see the header comment) and the current window's facts.
template <typename T>
struct Tiles {
  int64_t N, NP, d, DP;
  T *q, *k, *kt, *v, *vt, *dout, *o, *dq, *dk, *dv;
  T *s, *dp, *bias, *dbias;
  T *lse, *rowinfo;  // per query: logsumexp; forward 1 / sum, backward D = dout . out
  // o: forward, the unnormalised output; backward, the saved output
  int* region;       // per token of a mixed window: its region id
  bool has_bias, mixed;
  // Cache lines of the next window's tokens, prefetched a slice per query row (see queue_window).
  const char** prefetch;
  int64_t num_prefetch;
};

// Prefetches the share of row i (of N) of the queued lines.
template <typename T>
PYVQ_WA_INLINE void prefetch_share(const Tiles<T>& t, int64_t i) {
  const int64_t lo = i * t.num_prefetch / t.N, hi = (i + 1) * t.num_prefetch / t.N;
  for (int64_t e = lo; e < hi; ++e) __builtin_prefetch(t.prefetch[e], 0, 3);
}

// Row i of the scores: masked and padded keys to -inf.
template <typename T>
PYVQ_WA_INLINE void mask_row(const Tiles<T>& t, int64_t i, T* s) {
  const T ninf = -std::numeric_limits<T>::infinity();
  if (t.mixed) {
    const int ri = t.region[i];
    for (int64_t j = 0; j < t.N; ++j) s[j] = t.region[j] == ri ? s[j] : ninf;
  }
  for (int64_t j = t.N; j < t.NP; ++j) s[j] = ninf;
}

// S = bias + q kt (q already scaled).
template <typename T, int VB>
PYVQ_WA_INLINE void scores(const Tiles<T>& t) {
  if (t.has_bias)
    matmul<T, VB, true>(t.N, t.NP, t.d, t.q, t.DP, 1, t.kt, t.NP, t.bias, t.s, t.NP);
  else
    matmul<T, VB, false>(t.N, t.NP, t.d, t.q, t.DP, 1, t.kt, t.NP, nullptr, t.s, t.NP);
}

template <typename T, int VB>
PYVQ_WA_INLINE void forward_window(const Tiles<T>& t) {
  transpose<T, VB>(t.k, t.DP, t.NP, t.DP, t.kt, t.NP);
  scores<T, VB>(t);
  for (int64_t i = 0; i < t.N; ++i) {
    T* s = t.s + i * t.NP;
    prefetch_share(t, i);
    mask_row(t, i, s);
    const T m = vec_max<T, VB>(s, t.NP);  // finite: a query always sees itself
    for (int64_t j = 0; j < t.NP; ++j) s[j] = wa_exp(s[j] - m);
    t.lse[i] = m;  // max and sum for now; logsumexp and 1 / sum below, vectorised
    t.rowinfo[i] = vec_sum<T, VB>(s, t.NP);
  }
  for (int64_t i = 0; i < t.N; ++i) {
    const T l = t.rowinfo[i];
    t.lse[i] += wa_log(l);
    t.rowinfo[i] = T(1) / l;
  }
  // O = P v, unnormalised: the scatter multiplies row i by 1 / l_i.
  matmul<T, VB, false>(t.N, t.DP, t.N, t.s, t.NP, 1, t.v, t.DP, nullptr, t.o, t.DP);
}

template <typename T, int VB>
PYVQ_WA_INLINE void backward_window(const Tiles<T>& t) {
  transpose<T, VB>(t.k, t.DP, t.NP, t.DP, t.kt, t.NP);
  transpose<T, VB>(t.v, t.DP, t.NP, t.DP, t.vt, t.NP);
  scores<T, VB>(t);
  for (int64_t i = 0; i < t.N; ++i) {  // P = exp(S - lse)
    T* s = t.s + i * t.NP;
    prefetch_share(t, i);
    mask_row(t, i, s);
    const T lse = t.lse[i];
    for (int64_t j = 0; j < t.NP; ++j) s[j] = wa_exp(s[j] - lse);
  }
  for (int64_t i = 0; i < t.N; ++i) t.rowinfo[i] = vec_dot<T, VB>(t.dout + i * t.DP, t.o + i * t.DP, t.DP);
  // dP = dout vt, then dS = P * (dP - D) in place, D_i = dout_i . out_i.
  matmul<T, VB, false>(t.N, t.NP, t.d, t.dout, t.DP, 1, t.vt, t.NP, nullptr, t.dp, t.NP);
  for (int64_t i = 0; i < t.N; ++i) {
    const T* p = t.s + i * t.NP;
    T* ds = t.dp + i * t.NP;
    const T D = t.rowinfo[i];
    for (int64_t j = 0; j < t.NP; ++j) ds[j] = p[j] * (ds[j] - D);
  }
  if (t.has_bias) {
    const int64_t n = t.N * t.NP;
    for (int64_t e = 0; e < n; ++e) t.dbias[e] += t.dp[e];
  }
  // dq = dS k (scaled in the scatter), dk = dS^T q_scaled, dv = P^T dout.
  matmul<T, VB, false>(t.N, t.DP, t.N, t.dp, t.NP, 1, t.k, t.DP, nullptr, t.dq, t.DP);
  matmul<T, VB, false>(t.N, t.DP, t.N, t.dp, 1, t.NP, t.q, t.DP, nullptr, t.dk, t.DP);
  matmul<T, VB, false>(t.N, t.DP, t.N, t.s, 1, t.NP, t.dout, t.DP, nullptr, t.dv, t.DP);
}

// The two builds of each. Not inlined into the launchers, so each is one function compiled for
// exactly one target.
constexpr CpuIsa kWindowAttentionIsa =
    PYVQ_CPU_AVX512_BUILD ? CpuIsa::kAvx512 : CpuIsa::kGeneric;

template <bool kBackward, int VB, typename T>
PYVQ_WA_INLINE void compute_window(const Tiles<T>& t) {
  if constexpr (kBackward)
    backward_window<T, VB>(t);
  else
    forward_window<T, VB>(t);
}
template <bool kBackward, typename T>
__attribute__((noinline)) PYVQ_TARGET_AVX512 void window_avx512(const Tiles<T>& t) {
  compute_window<kBackward, 64>(t);
}
template <bool kBackward, typename T>
__attribute__((noinline)) void window_generic(const Tiles<T>& t) {
  compute_window<kBackward, 16>(t);  // SSE2: 16-byte vectors, 16 registers
}
template <bool kBackward, typename T>
inline void run_window(const Tiles<T>& t, bool avx512) {
  if (avx512)
    window_avx512<kBackward>(t);
  else
    window_generic<kBackward>(t);
}

// --- tiles, gathers and scatters (baseline code) -------------------------------------------------

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// One thread's 64-byte aligned, zeroed scratch.
class Scratch {
 public:
  explicit Scratch(size_t bytes) : bytes_(round_up(static_cast<int64_t>(bytes) + 64, 64)) {
    ptr_ = std::aligned_alloc(64, bytes_);
    TORCH_CHECK(ptr_ != nullptr, "pyvq.window_attention: cannot allocate ", bytes_,
                " bytes of scratch");
    std::memset(ptr_, 0, bytes_);
  }
  ~Scratch() { std::free(ptr_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  char* data() const { return static_cast<char*>(ptr_); }

 private:
  size_t bytes_;
  void* ptr_;
};

// Carves aligned arrays out of a Scratch (or, with base == nullptr, counts their bytes).
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename U>
  U* take(int64_t n) {
    const size_t at = used_;
    used_ += static_cast<size_t>(round_up(n * static_cast<int64_t>(sizeof(U)), 64));
    return base_ ? reinterpret_cast<U*>(base_ + at) : nullptr;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

template <typename T>
Tiles<T> carve_tiles(Carver& c, const Geometry& g, bool backward, bool has_bias,
                     int64_t bias_slots) {
  Tiles<T> t{};
  t.N = g.N;
  t.NP = round_up(g.N, kPad<T>);
  t.d = g.d;
  t.DP = round_up(g.d, kPad<T>);
  const int64_t rows = t.NP * t.DP, cols = t.DP * t.NP, sq = t.NP * t.NP;
  t.q = c.template take<T>(rows);
  t.k = c.template take<T>(rows);
  t.kt = c.template take<T>(cols);
  t.v = c.template take<T>(rows);
  t.s = c.template take<T>(sq);
  t.o = c.template take<T>(rows);
  t.lse = c.template take<T>(t.NP);
  t.rowinfo = c.template take<T>(t.NP);
  t.region = c.template take<int>(t.NP);
  if (has_bias) t.bias = c.template take<T>(bias_slots * sq);  // slot 0; see Worker
  t.prefetch = c.template take<const char*>((backward ? 5 : 3) * t.N * (t.d * 8 / 64 + 2));
  if (backward) {
    t.vt = c.template take<T>(cols);
    t.dout = c.template take<T>(rows);
    t.dp = c.template take<T>(sq);
    t.dq = c.template take<T>(rows);
    t.dk = c.template take<T>(rows);
    t.dv = c.template take<T>(rows);
    if (has_bias) t.dbias = c.template take<T>(sq);
  }
  t.has_bias = has_bias;
  return t;
}

// A (B, heads, H, W[, d]) tensor's data and strides.
template <typename S>
struct View {
  S* p;
  int64_t sb, sh, sr, sc, sd;
};

template <typename S>
View<S> view_of(const at::Tensor& x) {
  View<S> v{static_cast<S*>(x.data_ptr()), x.stride(0), x.stride(1), x.stride(2), x.stride(3), 0};
  if (x.dim() == 5) v.sd = x.stride(4);
  return v;
}

template <typename S>
PYVQ_WA_INLINE S* token_ptr(const View<S>& v, int64_t b, int64_t h, int64_t r, int64_t c) {
  return v.p + b * v.sb + h * v.sh + r * v.sr + c * v.sc;
}

// Row i of a token-row tile from one token of x (converted, times mul).
template <typename S, typename T>
PYVQ_WA_INLINE void load_row(const S* src, int64_t sd, int64_t d, T mul, T* dst) {
  if (sd == 1)
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(src[c]) * mul;
  else
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(src[c * sd]) * mul;
}

// One token of a contiguous output from row i of a tile (times mul, converted).
template <typename T, typename S>
PYVQ_WA_INLINE void store_row(const T* __restrict src, T mul, int64_t d, S* __restrict dst) {
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<S>(src[c] * mul);
}

// The head's expanded bias (N x NP, padding columns zero) from the (rows, heads) table in T.
template <typename T>
void expand_bias(const T* table, int64_t heads, int64_t h, int64_t w, const Tiles<T>& t,
                 T* bias) {
  const int64_t span = 2 * w - 1;
  for (int64_t ri = 0; ri < w; ++ri)
    for (int64_t ci = 0; ci < w; ++ci) {
      T* row = bias + (ri * w + ci) * t.NP;
      for (int64_t rj = 0; rj < w; ++rj) {
        const int64_t base = (ri - rj + w - 1) * span + ci + w - 1;  // bias_index at cj = 0
        for (int64_t cj = 0; cj < w; ++cj) row[rj * w + cj] = table[(base - cj) * heads + h];
      }
    }
}

// partial[bias_index(i, j)] += dbias[i][j] over the window's N x N pairs, in order.
template <typename T>
void fold_bias(const Tiles<T>& t, int64_t w, T* partial) {
  const int64_t span = 2 * w - 1;
  for (int64_t ri = 0; ri < w; ++ri)
    for (int64_t ci = 0; ci < w; ++ci) {
      const T* row = t.dbias + (ri * w + ci) * t.NP;
      for (int64_t rj = 0; rj < w; ++rj) {
        const int64_t base = (ri - rj + w - 1) * span + ci + w - 1;
        for (int64_t cj = 0; cj < w; ++cj) partial[base - cj] += row[rj * w + cj];
      }
    }
}

// Everything one call of either op shares.
struct Call {
  Geometry g;
  int64_t chunks_per_head;  // ceil(windows / kChunk)
  int64_t num_chunks;       // B * chunks_per_head * heads, heads fastest (see locate)
  at::Tensor table;         // (rows, heads) bias table in the accumulation dtype, contiguous
  double scale;
};

inline Call make_call(const Geometry& g, const std::optional<at::Tensor>& bias_table,
                      at::ScalarType acc, double scale) {
  Call c{g, 0, 0, at::Tensor(), scale};
  const int64_t windows = g.nwr * g.nwc;
  c.chunks_per_head = (windows + kChunk - 1) / kChunk;
  c.num_chunks = g.B * g.heads * c.chunks_per_head;
  if (bias_table.has_value()) c.table = bias_table->to(acc).contiguous();
  return c;
}

// One window of one (batch, head) and the original positions of its tokens.
struct Window {
  int64_t chunk, b, h, win;
  bool mixed;                     // holds tokens of more than one region
  std::vector<int64_t> row, col;  // per local token
};

// The k-th window of `chunk` into w (tokens located); false past the chunk's end.
inline bool locate(const Call& c, int64_t chunk, int64_t k, Window& w) {
  const Geometry& g = c.g;
  // chunk = (b * chunks_per_head + blk) * heads + h
  const int64_t bblk = chunk / g.heads, blk = bblk % c.chunks_per_head;
  const int64_t win = blk * kChunk + k;
  if (k >= kChunk || win >= g.nwr * g.nwc) return false;
  w.chunk = chunk;
  w.b = bblk / c.chunks_per_head;
  w.h = chunk - bblk * g.heads;
  w.win = win;
  const int64_t wr = win / g.nwc, wc = win - wr * g.nwc;
  w.mixed = window_is_mixed(wr, wc, g.nwr, g.nwc, g.shift);
  for (int64_t li = 0, i = 0; li < g.w; ++li) {
    const int64_t r = source_coord(wr * g.w + li, g.shift, g.H);
    for (int64_t lj = 0; lj < g.w; ++lj, ++i) {
      w.row[i] = r;
      w.col[i] = source_coord(wc * g.w + lj, g.shift, g.W);
    }
  }
  return true;
}

// Region ids of a mixed window's tokens.
inline void window_regions(const Geometry& g, const Window& w, int* region) {
  const int64_t wr = w.win / g.nwc, wc = w.win - wr * g.nwc;
  for (int64_t i = 0; i < g.N; ++i) region[i] = token_region(g, wr, wc, i);
}

// Windows are gathered from memory the caches have not seen, in runs too short for the hardware
// prefetchers, so the next window's token rows are prefetched while one window computes: queued
// here, issued a share per query row (prefetch_share) rather than all at once, which would
// overflow the core's outstanding-miss queue.
template <typename S, typename T>
inline void queue_window(const View<S>& v, const Window& w, int64_t N, int64_t d, Tiles<T>& t) {
  const int64_t bytes = (v.sd == 1 ? d : 1) * static_cast<int64_t>(sizeof(S));
  for (int64_t i = 0; i < N; ++i) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(token_ptr(v, w.b, w.h, w.row[i], w.col[i]));
    for (uintptr_t line = p & ~uintptr_t(63); line < p + bytes; line += 64)
      t.prefetch[t.num_prefetch++] = reinterpret_cast<const char*>(line);
  }
}

// Runs the chunks on at::get_num_threads() workers that claim them one at a time from a shared
// counter (a core shared with another process then slows only the chunks it runs, not a fixed
// half of the call). Each worker calls fn(cur, next, ends_chunk) for every window of its chunks
// in order: next is the window it runs after cur (for prefetching; it claims its next chunk a
// window early) or nullptr, ends_chunk says cur is its chunk's last window. setup() runs once per
// worker first and returns its state (a Worker), passed to fn. Which worker runs a chunk
// does not change the chunk's results.
template <typename Setup, typename Fn>
inline void run_chunks(const Call& c, Setup&& setup, Fn&& fn) {
  std::atomic<int64_t> counter{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), c.num_chunks);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    auto state = setup();
    const int64_t N = c.g.N;
    Window cur{0, 0, 0, 0, false, std::vector<int64_t>(N), std::vector<int64_t>(N)};
    Window nxt = cur;
    for (int64_t worker = w0; worker < w1; ++worker) {
      const int64_t first = counter.fetch_add(1);
      bool have = first < c.num_chunks && locate(c, first, 0, cur);
      int64_t k = 0;
      while (have) {
        bool more = locate(c, cur.chunk, k + 1, nxt);
        const bool ends_chunk = !more;
        if (more) {
          ++k;
        } else {
          const int64_t chunk = counter.fetch_add(1);
          more = chunk < c.num_chunks && locate(c, chunk, 0, nxt);
          k = 0;
        }
        fn(state, &cur, more ? &nxt : nullptr, ends_chunk);
        std::swap(cur, nxt);
        have = more;
      }
    }
  });
}

// Most bytes of expanded biases a worker keeps (one per head when they fit, else one).
constexpr int64_t kBiasCacheBytes = 512 * 1024;

// One worker's tiles and the window set-up both passes share.
template <typename T>
struct Worker {
  std::unique_ptr<Scratch> scratch;
  Tiles<T> t;
  T* biases = nullptr;            // bias_slots expanded N x NP biases
  std::vector<int64_t> slot_head;  // the head each slot holds, -1 for none

  Worker(const Geometry& g, bool backward, bool has_bias) {
    const int64_t tile = round_up(g.N, kPad<T>) * round_up(g.N, kPad<T>);
    const int64_t slots =
        g.heads * tile * static_cast<int64_t>(sizeof(T)) <= kBiasCacheBytes ? g.heads : 1;
    Carver count(nullptr);
    carve_tiles<T>(count, g, backward, has_bias, slots);
    scratch = std::make_unique<Scratch>(count.used());
    Carver carver(scratch->data());
    t = carve_tiles<T>(carver, g, backward, has_bias, slots);
    biases = t.bias;
    slot_head.assign(has_bias ? slots : 0, -1);
  }

  // The head's expanded bias (expanded on first use in its slot) and the window's region ids.
  void start(const Geometry& g, const Window& w, const T* table) {
    if (t.has_bias) {
      const int64_t slot = static_cast<int64_t>(slot_head.size()) == g.heads ? w.h : 0;
      t.bias = biases + slot * t.NP * t.NP;
      if (slot_head[slot] != w.h) {
        expand_bias(table, g.heads, w.h, g.w, t, t.bias);
        slot_head[slot] = w.h;
      }
    }
    t.mixed = w.mixed;
    if (w.mixed) window_regions(g, w, t.region);
  }
};

// q, k, v of one call.
template <typename S>
struct Qkv {
  View<const S> q, k, v;
};

template <typename S>
Qkv<S> qkv_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {view_of<const S>(q), view_of<const S>(k), view_of<const S>(v)};
}

// The window's q (times scale), k and v rows into their tiles.
template <typename S, typename T>
inline void gather_qkv(const Qkv<S>& x, const Geometry& g, const Window& w, T scale, Tiles<T>& t) {
  for (int64_t i = 0; i < g.N; ++i) {
    const int64_t r = w.row[i], c = w.col[i];
    load_row(token_ptr(x.q, w.b, w.h, r, c), x.q.sd, g.d, scale, t.q + i * t.DP);
    load_row(token_ptr(x.k, w.b, w.h, r, c), x.k.sd, g.d, T(1), t.k + i * t.DP);
    load_row(token_ptr(x.v, w.b, w.h, r, c), x.v.sd, g.d, T(1), t.v + i * t.DP);
  }
}

// Restarts the prefetch queue with the next window's q, k, v lines (none after the last).
template <typename S, typename T>
inline void queue_qkv(const Qkv<S>& x, const Geometry& g, const Window* next, Tiles<T>& t) {
  t.num_prefetch = 0;
  if (!next) return;
  queue_window(x.q, *next, g.N, g.d, t);
  queue_window(x.k, *next, g.N, g.d, t);
  queue_window(x.v, *next, g.N, g.d, t);
}

template <typename scalar_t, typename T>
void forward_chunks(const Call& c, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse, bool avx512) {
  const Geometry& g = c.g;
  const bool has_bias = c.table.defined();
  const Qkv<scalar_t> x = qkv_of<scalar_t>(q, k, v);
  const View<scalar_t> vo = view_of<scalar_t>(out);
  const View<T> vl = view_of<T>(lse);
  const T* table = has_bias ? c.table.data_ptr<T>() : nullptr;
  const T scale = static_cast<T>(c.scale);
  auto setup = [&] { return Worker<T>(g, false, has_bias); };
  run_chunks(c, setup, [&](Worker<T>& wk, const Window* w, const Window* next, bool) {
    Tiles<T>& t = wk.t;
    wk.start(g, *w, table);
    gather_qkv(x, g, *w, scale, t);
    queue_qkv(x, g, next, t);
    run_window<false>(t, avx512);
    for (int64_t i = 0; i < g.N; ++i) {  // contiguous outputs
      const int64_t r = w->row[i], cc = w->col[i];
      store_row(t.o + i * t.DP, t.rowinfo[i], g.d, token_ptr(vo, w->b, w->h, r, cc));
      *token_ptr(vl, w->b, w->h, r, cc) = t.lse[i];
    }
  });
}

template <typename scalar_t, typename T>
void backward_chunks(const Call& c, const at::Tensor& grad_out, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& lse, const at::Tensor& grad_q, const at::Tensor& grad_k,
                     const at::Tensor& grad_v, T* partials, bool avx512) {
  const Geometry& g = c.g;
  const bool has_bias = c.table.defined();
  const Qkv<scalar_t> x = qkv_of<scalar_t>(q, k, v);
  const View<const scalar_t> vg = view_of<const scalar_t>(grad_out), vo = view_of<const scalar_t>(out);
  const View<const T> vl = view_of<const T>(lse);
  const View<scalar_t> gq = view_of<scalar_t>(grad_q), gk = view_of<scalar_t>(grad_k),
                       gv = view_of<scalar_t>(grad_v);
  const T* table = has_bias ? c.table.data_ptr<T>() : nullptr;
  const T scale = static_cast<T>(c.scale);
  const int64_t table_rows = (2 * g.w - 1) * (2 * g.w - 1);
  auto setup = [&] { return Worker<T>(g, true, has_bias); };
  // dbias starts zeroed (Scratch) and is zeroed again after each chunk's fold.
  run_chunks(c, setup, [&](Worker<T>& wk, const Window* w, const Window* next, bool ends_chunk) {
    Tiles<T>& t = wk.t;
    wk.start(g, *w, table);
    gather_qkv(x, g, *w, scale, t);
    for (int64_t i = 0; i < g.N; ++i) {
      const int64_t r = w->row[i], cc = w->col[i];
      load_row(token_ptr(vg, w->b, w->h, r, cc), vg.sd, g.d, T(1), t.dout + i * t.DP);
      load_row(token_ptr(vo, w->b, w->h, r, cc), vo.sd, g.d, T(1), t.o + i * t.DP);
      t.lse[i] = *token_ptr(vl, w->b, w->h, r, cc);
    }
    queue_qkv(x, g, next, t);
    if (next) {
      queue_window(vg, *next, g.N, g.d, t);
      queue_window(vo, *next, g.N, g.d, t);
    }
    run_window<true>(t, avx512);
    for (int64_t i = 0; i < g.N; ++i) {  // contiguous outputs
      const int64_t r = w->row[i], cc = w->col[i];
      store_row(t.dq + i * t.DP, scale, g.d, token_ptr(gq, w->b, w->h, r, cc));
      store_row(t.dk + i * t.DP, T(1), g.d, token_ptr(gk, w->b, w->h, r, cc));
      store_row(t.dv + i * t.DP, T(1), g.d, token_ptr(gv, w->b, w->h, r, cc));
    }
    if (has_bias && ends_chunk) {
      fold_bias(t, g.w, partials + w->chunk * table_rows);
      std::memset(t.dbias, 0, sizeof(T) * t.N * t.NP);
    }
  });
}

// --- checks and the ops ----------------------------------------------------------------------------

constexpr const char* kOp = "pyvq.window_attention";

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_floating(q, "q");
  check_dim(q, "q", 5);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{k, "k"}, {v, "v"}}) {
    TORCH_CHECK(t.sizes() == q.sizes(), kOp, ": argument '", name, "' must have the shape of 'q' ",
                q.sizes(), ", got ", t.sizes());
    check_same_dtype(t, name, q, "q");
    check_same_device(t, name, q, "q");
  }
}

inline Geometry check_window(const at::Tensor& q, const std::optional<at::Tensor>& bias_table,
                             int64_t window_size, int64_t shift, double scale) {
  TORCH_CHECK(window_size >= 1 && window_size <= kMaxWindow, kOp,
              ": argument 'window_size' must be in [1, ", kMaxWindow, "], got ", window_size);
  TORCH_CHECK(shift >= 0 && shift < window_size, kOp,
              ": argument 'shift' must be in [0, window_size) = [0, ", window_size, "), got ", shift);
  const int64_t H = q.size(2), W = q.size(3), heads = q.size(1);
  TORCH_CHECK(H % window_size == 0 && W % window_size == 0, kOp,
              ": the grid H x W (q.shape[2:4]) must be a multiple of window_size ", window_size,
              " in both axes, got ", H, " x ", W);
  TORCH_CHECK(std::isfinite(scale), kOp, ": argument 'scale' must be finite, got ", scale);
  if (bias_table.has_value()) {
    const at::Tensor& b = *bias_table;
    check_floating(b, "bias_table");
    check_same_device(b, "bias_table", q, "q");
    const int64_t rows = (2 * window_size - 1) * (2 * window_size - 1);
    TORCH_CHECK(b.dim() == 2 && b.size(0) == rows && b.size(1) == heads, kOp,
                ": argument 'bias_table' must have shape ((2 * window_size - 1)^2, heads) = (",
                rows, ", ", heads, "), got ", b.sizes());
  }
  return make_geometry(q.size(0), heads, H, W, q.size(4), window_size, shift);
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v,
                                                        const std::optional<at::Tensor>& bias_table,
                                                        int64_t window_size, int64_t shift,
                                                        double scale) {
  check_qkv(q, k, v);
  const Geometry g = check_window(q, bias_table, window_size, shift, scale);
  const at::ScalarType acc = acc_type(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({g.B, g.heads, g.H, g.W}, q.options().dtype(acc));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const Call c = make_call(g, bias_table, acc, scale);
  const bool avx512 = cpu_isa_for(kWindowAttentionIsa) >= CpuIsa::kAvx512;  // once per call
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "window_attention", [&] {
    forward_chunks<scalar_t, at::opmath_type<scalar_t>>(c, q, k, v, out, lse, avx512);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias_table, const at::Tensor& out, const at::Tensor& lse,
    int64_t window_size, int64_t shift, double scale) {
  check_qkv(q, k, v);
  const Geometry g = check_window(q, bias_table, window_size, shift, scale);
  const at::ScalarType acc = acc_type(q.scalar_type());
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{grad_out, "grad_out"}, {out, "out"}}) {
    TORCH_CHECK(t.sizes() == q.sizes(), kOp, ": argument '", name, "' must have the shape of 'q' ",
                q.sizes(), ", got ", t.sizes());
    check_same_dtype(t, name, q, "q");
    check_same_device(t, name, q, "q");
  }
  TORCH_CHECK(lse.dim() == 4 && lse.sizes() == q.sizes().slice(0, 4), kOp,
              ": argument 'lse' must have shape (B, heads, H, W) = ", q.sizes().slice(0, 4),
              ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc, kOp, ": argument 'lse' must have dtype ", acc,
              " (the accumulation dtype of ", q.scalar_type(), "), got ", lse.scalar_type());
  check_same_device(lse, "lse", q, "q");

  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(q.sizes(), q.options());
  at::Tensor grad_v = at::empty(q.sizes(), q.options());
  const Call c = make_call(g, bias_table, acc, scale);
  const bool has_bias = c.table.defined();
  const int64_t table_rows = (2 * g.w - 1) * (2 * g.w - 1);
  // Per-chunk partial bias gradients, added in chunk order below.
  at::Tensor partials =
      at::zeros({has_bias ? c.num_chunks : 0, table_rows}, q.options().dtype(acc));
  const bool avx512 = cpu_isa_for(kWindowAttentionIsa) >= CpuIsa::kAvx512;
  if (q.numel() > 0 || lse.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, q.scalar_type(), "_window_attention_backward", [&] {
          using T = at::opmath_type<scalar_t>;
          backward_chunks<scalar_t, T>(c, grad_out, q, k, v, out, lse, grad_q, grad_k, grad_v,
                                       has_bias ? partials.data_ptr<T>() : nullptr, avx512);
        });
  }
  if (!has_bias) return {grad_q, grad_k, grad_v, at::empty({0}, q.options())};
  // (chunks, rows) -> (rows, heads): each chunk's partial into its head's column, in chunk order.
  at::Tensor reduced = at::zeros({table_rows, g.heads}, q.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "_window_attention_backward", [&] {
    const scalar_t* p = partials.data_ptr<scalar_t>();
    scalar_t* r = reduced.data_ptr<scalar_t>();
    for (int64_t chunk = 0; chunk < c.num_chunks; ++chunk) {
      const int64_t h = chunk % g.heads;
      const scalar_t* part = p + chunk * table_rows;
      for (int64_t e = 0; e < table_rows; ++e) r[e * g.heads + h] += part[e];
    }
  });
  return {grad_q, grad_k, grad_v, reduced.to(bias_table->scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvq, CPU, m) {
  m.impl("window_attention", &window_attention_cpu);
  m.impl("_window_attention_backward", &window_attention_backward_cpu);
}

PYVQ_REGISTER_CPU_OP("window_attention", kWindowAttentionIsa);

}  // namespace window_attention
}  // namespace pyvq
