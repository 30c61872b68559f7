// CPU launcher of pyvq::multigrained_attention and pyvq::_multigrained_attention_backward.
//
// Work item of the forward: one block of one (batch, head). Its M = ws * ws queries are gathered
// from their grid positions (any strides, index math of multigrained_attention.h) into a small
// contiguous tile in the accumulation type T (float for float16 / bfloat16 / float32, double
// for float64); its keys, the clipped extended window then the G globals, are streamed in key
// tiles of at most KT keys, gathered the same way (nothing is unfolded into a tensor), through
// one online softmax; a block whose keys fit in one tile (Ws = 8, halo 2, G = 64: 208 keys) runs
// the plain two-pass softmax. lse is saved; the output is written contiguous.
//
// Tile layout (row-major, 64-byte aligned; MP = M and DP = d rounded up to a 64-byte vector):
//   q, dout, o, dq         M x DP    query rows (q pre-multiplied by scale)
//   qt, doutt              d x MP    transposed once per block: row c holds component c of every
//                                    query
//   k, v, dk, dv           KT x DP   key rows of the current key tile
//   s, dp                  KT x MP   scores transposed, S^T: row j holds key j's score for every
//                                    query, so the per-query softmax statistics are lane-wise
//                                    vector maxima and sums over rows, and no key tile is ever
//                                    transposed
// Every product is one register-blocked micro-kernel, C = [C +] A B, A read through arbitrary
// strides, B's rows contiguous (the vectorised axis):
//   forward   S^T = k qt,  O += P v   (A = S^T read by columns)
//   backward  S^T = k qt,  P^T = exp(S^T - lse),  dP^T = v doutt,  dS^T = P^T * (dP^T - D),
//             dq += dS k,  dk = dS^T q_scaled,  dv = P^T dout          (D_i = dout_i . out_i)
//
// Backward work item: one block row of one (batch, head), its blocks left to right; a block's
// local-key gradients are added straight into float accumulators of grad_k / grad_v. Block rows
// run in colour classes (multigrained_attention.h: rows of one class have disjoint windows), the
// classes one after another, so every key's contributions arrive in one fixed order whatever
// the thread count, and no two threads write one row. The global keys' gradients are summed per
// work item into its own partial (G, d) buffers, which are added in block-row order afterwards.
// Deterministic, no atomics.
//
// Instruction sets: the per-tile compute (micro-kernel, softmax) is compiled twice from one
// template, for AVX-512 (PYVQ_TARGET_AVX512: x86-64-v4) and for the baseline, and each call
// runs the one cpu_isa_for() names (common/cpu_isa.h). Gathers and scatters (dtype conversions,
// strided reads) stay in baseline code, where c10's float16 / bfloat16 conversions inline.
#pragma GCC optimize("no-trapping-math")
// GCC 12's RTL global CSE / partial redundancy elimination (-fgcse) and post-reload load CSE
// (-fgcse-after-reload) took over 90% of this file's compile time at -O3 (436 s and 289 s of
// 793 s, -ftime-report): the always-inlined tile kernels make a few very large functions. The
// micro-kernels are blocked by hand and keep their speed without them (measured before/after).
#pragma GCC optimize("no-gcse", "no-gcse-after-reload")
// 64-byte vectors pass between always-inline helpers only (never across a real call).
#pragma GCC diagnostic ignored "-Wpsabi"

#include "multigrained_attention/multigrained_attention.h"

#include "common/build_facts.h"
#include "common/checks.h"
#include "common/cpu_isa.h"
#include "common/fast_math.h"  // fast_exp, fast_log: the vectorisable float exp and log

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
#include <cstring>
#include <limits>
#include <memory>
#include <cstdlib>
#include <tuple>
#include <utility>

namespace pyvq {
namespace multigrained_attention {
namespace {

// Most keys per key tile: with M = 64 queries and d = 64 a tile's S^T, dP^T, k, v, dk, dv take
// about 6 * 192 * 256 B = 288 KiB (in L2). Measured (one thread, width 512 / 8 heads, Ws 8,
// latents 32 and 64, halo 2 and 4) against 64, 128, 256 and 400: 192 was as fast as any and up
// to 1.3x faster than 64; 64 and 400 were the slowest.
constexpr int64_t kMaxKeyTile = 192;

#define PYVQ_MGA_INLINE inline __attribute__((always_inline))

// --- per-tile compute: inlined into the two ISA builds below --------------------------------------

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(T));

template <typename T>
PYVQ_MGA_INLINE typename Vec<T>::type& vat(T* p) {
  return *reinterpret_cast<typename Vec<T>::type*>(p);
}
template <typename T>
PYVQ_MGA_INLINE const typename Vec<T>::type& vat(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::type*>(p);
}

// R rows x V vectors of C = [C +] A B over t < nt, A(r, t) = A[r * ars + t * acs]: R * V
// accumulators in registers; per t, V vectors of B's row t and R broadcasts of A.
template <typename T, int R, int V, bool kAdd>
PYVQ_MGA_INLINE void gemm_block(const T* __restrict A, int64_t ars, int64_t acs,
                                const T* __restrict B, int64_t ldb, int64_t nt, T* __restrict C,
                                int64_t ldc) {
  using vec = typename Vec<T>::type;
  constexpr int64_t L = kLanes<T>;
  vec acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < V; ++u) acc[r][u] = kAdd ? vat(C + r * ldc + u * L) : vec{};
  for (int64_t t = 0; t < nt; ++t) {
    vec b[V];
#pragma GCC unroll 4
    for (int u = 0; u < V; ++u) b[u] = vat(B + t * ldb + u * L);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T a = A[r * ars + t * acs];
#pragma GCC unroll 4
      for (int u = 0; u < V; ++u) acc[r][u] += a * b[u];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int u = 0; u < V; ++u) vat(C + r * ldc + u * L) = acc[r][u];
}

// All rows [0, rows) of one column strip of V vectors: blocks of R rows, then the rest one
// narrower block.
template <typename T, int R, int V, bool kAdd>
PYVQ_MGA_INLINE void gemm_strip(int64_t rows, const T* A, int64_t ars, int64_t acs, const T* B,
                                int64_t ldb, int64_t nt, T* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + R <= rows; i += R)
    gemm_block<T, R, V, kAdd>(A + i * ars, ars, acs, B, ldb, nt, C + i * ldc, ldc);
  const T* a = A + i * ars;
  T* c = C + i * ldc;
  switch (rows - i) {
    case 0: break;
    case 1: gemm_block<T, 1, V, kAdd>(a, ars, acs, B, ldb, nt, c, ldc); break;
    case 2: gemm_block<T, 2, V, kAdd>(a, ars, acs, B, ldb, nt, c, ldc); break;
    case 3: gemm_block<T, 3, V, kAdd>(a, ars, acs, B, ldb, nt, c, ldc); break;
    case 4: gemm_block<T, 4, V, kAdd>(a, ars, acs, B, ldb, nt, c, ldc); break;
    case 5: gemm_block<T, 5, V, kAdd>(a, ars, acs, B, ldb, nt, c, ldc); break;
    case 6: gemm_block<T, 6, V, kAdd>(a, ars, acs, B, ldb, nt, c, ldc); break;
    default: gemm_block<T, 7, V, kAdd>(a, ars, acs, B, ldb, nt, c, ldc); break;
  }
}

// C[i][0:cols] = [C[i][0:cols] +] sum_{t < nt} A(i, t) B[t][0:cols] for i < rows; cols, ldb, ldc
// multiples of a vector, B and C aligned. Strips of 4 vectors with 4-row blocks (16
// accumulators), narrower strips with 8-row blocks.
template <typename T, bool kAdd>
PYVQ_MGA_INLINE void gemm(int64_t rows, int64_t cols, int64_t nt, const T* A, int64_t ars,
                          int64_t acs, const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int64_t L = kLanes<T>;
  const int64_t nv = cols / L;
  for (int64_t v0 = 0; v0 < nv; v0 += 4) {
    const T* b = B + v0 * L;
    T* c = C + v0 * L;
    switch (nv - v0) {
      case 1: gemm_strip<T, 8, 1, kAdd>(rows, A, ars, acs, b, ldb, nt, c, ldc); break;
      case 2: gemm_strip<T, 8, 2, kAdd>(rows, A, ars, acs, b, ldb, nt, c, ldc); break;
      case 3: gemm_strip<T, 4, 3, kAdd>(rows, A, ars, acs, b, ldb, nt, c, ldc); break;
      default: gemm_strip<T, 4, 4, kAdd>(rows, A, ars, acs, b, ldb, nt, c, ldc); break;
    }
  }
}

PYVQ_MGA_INLINE float mga_exp(float x) { return fast_exp(x); }
PYVQ_MGA_INLINE double mga_exp(double x) { return ::exp(x); }

// dst (cols x ldd) = src (rows x lds) transposed, in 8 x 8 blocks (the block's rows stay in
// cache; the compiler keeps the stores' columns in registers).
template <typename T>
PYVQ_MGA_INLINE void transpose(const T* __restrict src, int64_t lds, int64_t rows, int64_t cols,
                               T* __restrict dst, int64_t ldd) {
  constexpr int64_t kB = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kB)
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t r1 = std::min(rows, r0 + kB), c1 = std::min(cols, c0 + kB);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
}

// One thread's tiles (see the header comment).
template <typename T>
struct Tiles {
  int64_t M, MP, d, DP, KT;
  T *q, *qt, *o, *dout, *doutt, *dq;  // query side
  T *k, *v, *dk, *dv, *s, *dp;        // key side
  T *m, *l, *mx, *alpha;              // forward, per query: running max and sum, scratch
  T *lse, *D;                         // backward, per query: saved logsumexp, dout . out
};

template <typename T>
PYVQ_MGA_INLINE void forward_begin(const Tiles<T>& t) {
  transpose(t.q, t.DP, t.M, t.d, t.qt, t.MP);
  for (int64_t i = 0; i < t.MP; ++i) t.m[i] = -std::numeric_limits<T>::infinity(), t.l[i] = T(0);
  std::memset(t.o, 0, sizeof(T) * t.M * t.DP);
}

// One key tile of n keys (rows of t.k, t.v): the online-softmax step. The loops over queries
// run over contiguous lanes of S^T's rows and vectorise.
template <typename T>
PYVQ_MGA_INLINE void forward_tile(const Tiles<T>& t, int64_t n) {
  const int64_t MP = t.MP;
  T* __restrict s = t.s;
  T* __restrict m = t.m;
  T* __restrict l = t.l;
  T* __restrict mx = t.mx;
  T* __restrict alpha = t.alpha;
  gemm<T, false>(n, MP, t.d, t.k, t.DP, 1, t.qt, MP, s, MP);  // S^T
  for (int64_t i = 0; i < MP; ++i) mx[i] = m[i];
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < MP; ++i) mx[i] = s[j * MP + i] > mx[i] ? s[j * MP + i] : mx[i];
  // alpha rescales what earlier tiles summed (exp(-inf) = 0 on the first tile).
  for (int64_t i = 0; i < MP; ++i) {
    alpha[i] = mga_exp(m[i] - mx[i]);
    l[i] *= alpha[i];
    m[i] = mx[i];
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < MP; ++i) {
      const T p = mga_exp(s[j * MP + i] - mx[i]);
      s[j * MP + i] = p;
      l[i] += p;
    }
  for (int64_t i = 0; i < t.M; ++i) {
    T* row = t.o + i * t.DP;
    const T a = alpha[i];
    for (int64_t c = 0; c < t.DP; ++c) row[c] *= a;
  }
  gemm<T, true>(t.M, t.DP, n, s, 1, MP, t.v, t.DP, t.o, t.DP);  // O += P v
}

template <typename T>
PYVQ_MGA_INLINE void backward_begin(const Tiles<T>& t) {
  transpose(t.q, t.DP, t.M, t.d, t.qt, t.MP);
  transpose(t.dout, t.DP, t.M, t.d, t.doutt, t.MP);
  std::memset(t.dq, 0, sizeof(T) * t.M * t.DP);
}

template <typename T>
PYVQ_MGA_INLINE void backward_tile(const Tiles<T>& t, int64_t n) {
  gemm<T, false>(n, t.MP, t.d, t.k, t.DP, 1, t.qt, t.MP, t.s, t.MP);         // S^T
  gemm<T, false>(n, t.MP, t.d, t.v, t.DP, 1, t.doutt, t.MP, t.dp, t.MP);     // dP^T
  const int64_t MP = t.MP;
  T* __restrict s = t.s;
  T* __restrict dp = t.dp;
  const T* __restrict lse = t.lse;
  const T* __restrict D = t.D;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < MP; ++i) {
      const T p = mga_exp(s[j * MP + i] - lse[i]);
      s[j * MP + i] = p;                                    // P^T
      dp[j * MP + i] = p * (dp[j * MP + i] - D[i]);         // dS^T
    }
  gemm<T, true>(t.M, t.DP, n, t.dp, 1, t.MP, t.k, t.DP, t.dq, t.DP);    // dq += dS k
  gemm<T, false>(n, t.DP, t.M, t.dp, t.MP, 1, t.q, t.DP, t.dk, t.DP);   // dk = dS^T q
  gemm<T, false>(n, t.DP, t.M, t.s, t.MP, 1, t.dout, t.DP, t.dv, t.DP);  // dv = P^T dout
}

// The two builds of each. Not inlined into the launchers, so each is one function compiled for
// exactly one target.
constexpr CpuIsa kMultigrainedIsa = PYVQ_CPU_AVX512_BUILD ? CpuIsa::kAvx512 : CpuIsa::kGeneric;

template <typename T>
struct Kernels {
  void (*forward_begin)(const Tiles<T>&);
  void (*forward_tile)(const Tiles<T>&, int64_t);
  void (*backward_begin)(const Tiles<T>&);
  void (*backward_tile)(const Tiles<T>&, int64_t);
};

template <typename T>
__attribute__((noinline)) PYVQ_TARGET_AVX512 void forward_begin_avx512(const Tiles<T>& t) {
  forward_begin(t);
}
template <typename T>
__attribute__((noinline)) PYVQ_TARGET_AVX512 void forward_tile_avx512(const Tiles<T>& t,
                                                                      int64_t n) {
  forward_tile(t, n);
}
template <typename T>
__attribute__((noinline)) PYVQ_TARGET_AVX512 void backward_begin_avx512(const Tiles<T>& t) {
  backward_begin(t);
}
template <typename T>
__attribute__((noinline)) PYVQ_TARGET_AVX512 void backward_tile_avx512(const Tiles<T>& t,
                                                                       int64_t n) {
  backward_tile(t, n);
}
template <typename T>
__attribute__((noinline)) void forward_begin_generic(const Tiles<T>& t) {
  forward_begin(t);
}
template <typename T>
__attribute__((noinline)) void forward_tile_generic(const Tiles<T>& t, int64_t n) {
  forward_tile(t, n);
}
template <typename T>
__attribute__((noinline)) void backward_begin_generic(const Tiles<T>& t) {
  backward_begin(t);
}
template <typename T>
__attribute__((noinline)) void backward_tile_generic(const Tiles<T>& t, int64_t n) {
  backward_tile(t, n);
}

template <typename T>
Kernels<T> kernels(bool avx512) {
  if (avx512)
    return {&forward_begin_avx512<T>, &forward_tile_avx512<T>, &backward_begin_avx512<T>,
            &backward_tile_avx512<T>};
  return {&forward_begin_generic<T>, &forward_tile_generic<T>, &backward_begin_generic<T>,
          &backward_tile_generic<T>};
}

// --- tiles, gathers and scatters (baseline code) -------------------------------------------------

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The key tile size of a block with n keys: tiles of at most kMaxKeyTile, as equal as possible.
inline int64_t key_tile(int64_t n) {
  const int64_t tiles = std::max<int64_t>(1, (n + kMaxKeyTile - 1) / kMaxKeyTile);
  return (n + tiles - 1) / tiles;
}

// One thread's zeroed, 64-byte aligned scratch, carved into tiles (padding entries stay zero:
// nothing writes them).
template <typename T>
struct Scratch {
  std::unique_ptr<T, void (*)(void*)> storage{nullptr, &std::free};
  Tiles<T> t{};
};

template <typename T>
Scratch<T> make_scratch(const Geometry& g, int64_t kt, bool backward) {
  Scratch<T> sc;
  Tiles<T>& t = sc.t;
  t.M = g.M;
  t.MP = round_up(g.M, kLanes<T>);
  t.d = g.d;
  t.DP = round_up(g.d, kLanes<T>);
  t.KT = kt;
  const int64_t qrows = t.M * t.DP, qcols = std::max<int64_t>(t.d, 1) * t.MP,
                krows = kt * t.DP, scores = kt * t.MP;
  // (slot, elements) in carving order; the backward's lse and D reuse m and l.
  std::pair<T**, int64_t> slots[] = {
      {&t.q, qrows},     {&t.qt, qcols},    {&t.o, qrows},  {&t.k, krows},  {&t.v, krows},
      {&t.s, scores},    {&t.m, t.MP},      {&t.l, t.MP},   {&t.mx, t.MP},  {&t.alpha, t.MP},
      {&t.dout, qrows},  {&t.doutt, qcols}, {&t.dq, qrows}, {&t.dk, krows}, {&t.dv, krows},
      {&t.dp, scores}};
  const int64_t used = backward ? 16 : 10;
  int64_t total = 0;
  for (int64_t e = 0; e < used; ++e) total += round_up(slots[e].second, kLanes<T>);
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(total, kLanes<T>)) * sizeof(T);
  sc.storage.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
  TORCH_CHECK(sc.storage != nullptr, "pyvq.multigrained_attention: cannot allocate ", bytes,
              " bytes of scratch");
  std::memset(sc.storage.get(), 0, bytes);
  T* p = sc.storage.get();
  for (int64_t e = 0; e < used; ++e) *slots[e].first = p, p += round_up(slots[e].second, kLanes<T>);
  if (backward) t.lse = t.m, t.D = t.l;
  return sc;
}

// A (B, heads, H, W[, d]) grid tensor's data and strides, or a (B, heads, G, d) one's with the G
// axis as rows (sr) and sc = 0.
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
View<S> globals_view_of(const at::Tensor& x) {
  return {static_cast<S*>(x.data_ptr()), x.stride(0), x.stride(1), x.stride(2), 0, x.stride(3)};
}

template <typename S>
PYVQ_MGA_INLINE S* at_pos(const View<S>& v, int64_t b, int64_t h, int64_t r, int64_t c) {
  return v.p + b * v.sb + h * v.sh + r * v.sr + c * v.sc;
}

// Tile row dst[0:d] from one token (converted, times mul).
template <typename S, typename T>
PYVQ_MGA_INLINE void load_row(const S* __restrict src, int64_t sd, int64_t d, T mul,
                              T* __restrict dst) {
  if (sd == 1)
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(src[c]) * mul;
  else
    for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(src[c * sd]) * mul;
}

// Where key j of a block lives: local keys in the grid tensors, the rest in the global ones.
struct KeyRange {
  Window w;
  int64_t nk;  // local keys
};

// Gathers keys [j0, j0 + n) of a block into rows of t.k and t.v.
template <typename S, typename T>
PYVQ_MGA_INLINE void gather_keys(const View<const S>& k, const View<const S>& v,
                                 const View<const S>& gk, const View<const S>& gv, int64_t b,
                                 int64_t h, const KeyRange& kr, int64_t j0, int64_t n,
                                 const Tiles<T>& t) {
  for (int64_t e = 0; e < n; ++e) {
    const int64_t j = j0 + e;
    const S *ks, *vs;
    int64_t ksd, vsd;
    if (j < kr.nk) {
      int64_t r, c;
      window_key(kr.w, j, &r, &c);
      ks = at_pos(k, b, h, r, c), vs = at_pos(v, b, h, r, c), ksd = k.sd, vsd = v.sd;
    } else {
      ks = at_pos(gk, b, h, j - kr.nk, 0), vs = at_pos(gv, b, h, j - kr.nk, 0);
      ksd = gk.sd, vsd = gv.sd;
    }
    load_row(ks, ksd, t.d, T(1), t.k + e * t.DP);
    load_row(vs, vsd, t.d, T(1), t.v + e * t.DP);
  }
}

// Runs fn(state, item) for items [0, count) on at::get_num_threads() workers that claim them
// one at a time from a shared counter (a core shared with another process then slows only the
// items it runs). setup() makes a worker's state once. Which worker runs an item does not change
// the item's results.
template <typename Setup, typename Fn>
void run_items(int64_t count, Setup&& setup, Fn&& fn) {
  if (count <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    auto state = setup();
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t item = next.fetch_add(1); item < count; item = next.fetch_add(1))
        fn(state, item);
  });
}

template <typename scalar_t, typename T>
void forward_blocks(const Geometry& g, double scale_, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& gk, const at::Tensor& gv,
                    const at::Tensor& out, const at::Tensor& lse, const Kernels<T>& ker) {
  using V = View<const scalar_t>;
  const V vq = view_of<const scalar_t>(q), vk = view_of<const scalar_t>(k),
          vv = view_of<const scalar_t>(v), vgk = globals_view_of<const scalar_t>(gk),
          vgv = globals_view_of<const scalar_t>(gv);
  const View<scalar_t> vo = view_of<scalar_t>(out);
  const View<T> vl = view_of<T>(lse);
  const T scale = static_cast<T>(scale_);
  const int64_t nb = g.nbr * g.nbc;
  // The largest block's key count (an inner block's window) sets the tile capacity.
  const Window inner = block_window(g, g.nbr / 2, g.nbc / 2);
  const int64_t kt = std::min(window_keys(inner) + g.G, kMaxKeyTile);
  // item = (b * nb + block) * heads + h: the heads of a block run one after another, so views of
  // one qkv projection are read while their cache lines are still near.
  run_items(g.B * nb * g.heads, [&] { return make_scratch<T>(g, kt, false); },
            [&](Scratch<T>& sc, int64_t item) {
              const Tiles<T>& t = sc.t;
              const int64_t h = item % g.heads, bblk = item / g.heads;
              const int64_t blk = bblk % nb, b = bblk / nb;
              const int64_t bi = blk / g.nbc, bj = blk % g.nbc;
              for (int64_t i = 0; i < g.M; ++i) {
                int64_t r, c;
                block_query(g, bi, bj, i, &r, &c);
                load_row(at_pos(vq, b, h, r, c), vq.sd, g.d, scale, t.q + i * t.DP);
              }
              ker.forward_begin(t);
              KeyRange kr{block_window(g, bi, bj), 0};
              kr.nk = window_keys(kr.w);
              const int64_t n = kr.nk + g.G, step = key_tile(n);
              for (int64_t j0 = 0; j0 < n; j0 += step) {
                const int64_t cnt = std::min(step, n - j0);
                gather_keys(vk, vv, vgk, vgv, b, h, kr, j0, cnt, t);
                ker.forward_tile(t, cnt);
              }
              for (int64_t i = 0; i < g.M; ++i) {
                int64_t r, c;
                block_query(g, bi, bj, i, &r, &c);
                const T inv = T(1) / t.l[i];
                const T* src = t.o + i * t.DP;
                scalar_t* dst = at_pos(vo, b, h, r, c);
                for (int64_t e = 0; e < g.d; ++e) dst[e] = static_cast<scalar_t>(src[e] * inv);
                *at_pos(vl, b, h, r, c) = t.m[i] + std::log(t.l[i]);
              }
            });
}

template <typename scalar_t, typename T>
void backward_blocks(const Geometry& g, double scale_, const at::Tensor& grad_out,
                     const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& gk, const at::Tensor& gv, const at::Tensor& out,
                     const at::Tensor& lse, const at::Tensor& grad_q, const at::Tensor& acc_k,
                     const at::Tensor& acc_v, const at::Tensor& part_gk,
                     const at::Tensor& part_gv, const Kernels<T>& ker) {
  using V = View<const scalar_t>;
  const V vq = view_of<const scalar_t>(q), vk = view_of<const scalar_t>(k),
          vv = view_of<const scalar_t>(v), vgk = globals_view_of<const scalar_t>(gk),
          vgv = globals_view_of<const scalar_t>(gv), vdo = view_of<const scalar_t>(grad_out),
          vo = view_of<const scalar_t>(out);
  const View<const T> vl = view_of<const T>(lse);
  const View<scalar_t> vdq = view_of<scalar_t>(grad_q);
  const View<T> vak = view_of<T>(acc_k), vav = view_of<T>(acc_v);
  T* pgk = part_gk.data_ptr<T>();
  T* pgv = part_gv.data_ptr<T>();
  const T scale = static_cast<T>(scale_);
  const Window inner = block_window(g, g.nbr / 2, g.nbc / 2);
  const int64_t kt = std::min(window_keys(inner) + g.G, kMaxKeyTile);
  const int64_t classes = num_row_classes(g.ws, g.halo, g.nbr);
  const int64_t bh = g.B * g.heads;
  for (int64_t p = 0; p < classes; ++p) {
    const int64_t rows = (g.nbr - p + classes - 1) / classes;  // block rows of class p
    // item = (b * rows + row) * heads + h
    run_items(bh * rows, [&] { return make_scratch<T>(g, kt, true); },
              [&](Scratch<T>& sc, int64_t item) {
      const Tiles<T>& t = sc.t;
      const int64_t h = item % g.heads, brow = item / g.heads;
      const int64_t b = brow / rows, bi = p + (brow % rows) * classes;
      // this item's partial global gradients: (B, heads, nbr, G, d) in T
      T* part_k = pgk + ((b * g.heads + h) * g.nbr + bi) * g.G * g.d;
      T* part_v = pgv + ((b * g.heads + h) * g.nbr + bi) * g.G * g.d;
      for (int64_t bj = 0; bj < g.nbc; ++bj) {
        for (int64_t i = 0; i < g.M; ++i) {
          int64_t r, c;
          block_query(g, bi, bj, i, &r, &c);
          load_row(at_pos(vq, b, h, r, c), vq.sd, g.d, scale, t.q + i * t.DP);
          load_row(at_pos(vdo, b, h, r, c), vdo.sd, g.d, T(1), t.dout + i * t.DP);
          load_row(at_pos(vo, b, h, r, c), vo.sd, g.d, T(1), t.o + i * t.DP);
          T D = 0;
          for (int64_t e = 0; e < g.d; ++e) D += t.dout[i * t.DP + e] * t.o[i * t.DP + e];
          t.D[i] = D;
          t.lse[i] = *at_pos(vl, b, h, r, c);
        }
        ker.backward_begin(t);
        KeyRange kr{block_window(g, bi, bj), 0};
        kr.nk = window_keys(kr.w);
        const int64_t n = kr.nk + g.G, step = key_tile(n);
        for (int64_t j0 = 0; j0 < n; j0 += step) {
          const int64_t cnt = std::min(step, n - j0);
          gather_keys(vk, vv, vgk, vgv, b, h, kr, j0, cnt, t);
          ker.backward_tile(t, cnt);
          for (int64_t e = 0; e < cnt; ++e) {
            const int64_t j = j0 + e;
            T *dk, *dv;
            if (j < kr.nk) {
              int64_t r, c;
              window_key(kr.w, j, &r, &c);
              dk = at_pos(vak, b, h, r, c), dv = at_pos(vav, b, h, r, c);
            } else {
              dk = part_k + (j - kr.nk) * g.d, dv = part_v + (j - kr.nk) * g.d;
            }
            const T* sk = t.dk + e * t.DP;
            const T* sv = t.dv + e * t.DP;
            for (int64_t c = 0; c < g.d; ++c) dk[c] += sk[c], dv[c] += sv[c];
          }
        }
        for (int64_t i = 0; i < g.M; ++i) {
          int64_t r, c;
          block_query(g, bi, bj, i, &r, &c);
          const T* src = t.dq + i * t.DP;
          scalar_t* dst = at_pos(vdq, b, h, r, c);
          for (int64_t e = 0; e < g.d; ++e) dst[e] = static_cast<scalar_t>(src[e] * scale);
        }
      }
    });
  }
}

// --- checks and the ops ----------------------------------------------------------------------------

constexpr const char* kOp = "pyvq.multigrained_attention";

void check_same(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.sizes() == q.sizes(), kOp, ": argument '", name, "' must have the shape of 'q' ",
              q.sizes(), ", got ", t.sizes());
  check_same_dtype(t, name, q, "q");
  check_same_device(t, name, q, "q");
}

Geometry check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& gk, const at::Tensor& gv, int64_t block_size,
                      int64_t halo, double scale) {
  check_floating(q, "q");
  TORCH_CHECK(q.dim() == 5, kOp, ": argument 'q' must be 5-D (B, heads, H, W, head_dim), got shape ",
              q.sizes());
  check_same(k, "k", q);
  check_same(v, "v", q);
  const int64_t B = q.size(0), heads = q.size(1), H = q.size(2), W = q.size(3), d = q.size(4);
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{gk, "global_k"}, {gv, "global_v"}}) {
    check_floating(t, name);
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == heads && t.size(3) == d, kOp,
                ": argument '", name, "' must have shape (B, heads, G, head_dim) = (", B, ", ",
                heads, ", G, ", d, "), got ", t.sizes());
    check_same_dtype(t, name, q, "q");
    check_same_device(t, name, q, "q");
  }
  TORCH_CHECK(gv.size(2) == gk.size(2), kOp,
              ": arguments 'global_k' and 'global_v' must have the same number of global keys G, "
              "got ", gk.size(2), " and ", gv.size(2));
  TORCH_CHECK(block_size >= 1, kOp, ": argument 'block_size' must be >= 1, got ", block_size);
  TORCH_CHECK(halo >= 0, kOp, ": argument 'halo' must be >= 0, got ", halo);
  TORCH_CHECK(H % block_size == 0 && W % block_size == 0, kOp,
              ": the grid H x W (q.shape[2:4]) must be a multiple of block_size ", block_size,
              " in both axes, got ", H, " x ", W);
  TORCH_CHECK(std::isfinite(scale), kOp, ": argument 'scale' must be finite, got ", scale);
  return make_geometry(B, heads, H, W, d, block_size, halo, gk.size(2));
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool use_avx512() { return cpu_isa_for(kMultigrainedIsa) >= CpuIsa::kAvx512; }

std::tuple<at::Tensor, at::Tensor> multigrained_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& global_k,
    const at::Tensor& global_v, int64_t block_size, int64_t halo, double scale) {
  const Geometry g = check_inputs(q, k, v, global_k, global_v, block_size, halo, scale);
  const at::ScalarType acc = acc_type(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({g.B, g.heads, g.H, g.W}, q.options().dtype(acc));
  if (lse.numel() == 0) return {out, lse};
  const bool avx512 = use_avx512();  // once per call
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "multigrained_attention", [&] {
    using T = at::opmath_type<scalar_t>;
    forward_blocks<scalar_t, T>(g, scale, q, k, v, global_k, global_v, out, lse,
                                kernels<T>(avx512));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
multigrained_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                    const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& global_k, const at::Tensor& global_v,
                                    const at::Tensor& out, const at::Tensor& lse,
                                    int64_t block_size, int64_t halo, double scale) {
  const Geometry g = check_inputs(q, k, v, global_k, global_v, block_size, halo, scale);
  const at::ScalarType acc = acc_type(q.scalar_type());
  check_same(grad_out, "grad_out", q);
  check_same(out, "out", q);
  TORCH_CHECK(lse.dim() == 4 && lse.sizes() == q.sizes().slice(0, 4), kOp,
              ": argument 'lse' must have shape (B, heads, H, W) = ", q.sizes().slice(0, 4),
              ", got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc, kOp, ": argument 'lse' must have dtype ", acc,
              " (the accumulation dtype of ", q.scalar_type(), "), got ", lse.scalar_type());
  check_same_device(lse, "lse", q, "q");

  const at::TensorOptions acc_options = q.options().dtype(acc);
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  // Accumulators in the accumulation dtype (they are the gradients themselves for float32 and
  // float64 inputs), and the per-block-row partial global gradients.
  at::Tensor acc_k = at::zeros(q.sizes(), acc_options);
  at::Tensor acc_v = at::zeros(q.sizes(), acc_options);
  at::Tensor part_gk = at::zeros({g.B, g.heads, g.nbr, g.G, g.d}, acc_options);
  at::Tensor part_gv = at::zeros({g.B, g.heads, g.nbr, g.G, g.d}, acc_options);
  if (lse.numel() > 0) {
    const bool avx512 = use_avx512();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                    "_multigrained_attention_backward", [&] {
      using T = at::opmath_type<scalar_t>;
      backward_blocks<scalar_t, T>(g, scale, grad_out, q, k, v, global_k, global_v, out, lse,
                                   grad_q, acc_k, acc_v, part_gk, part_gv, kernels<T>(avx512));
    });
  }
  // (B, heads, nbr, G, d) -> (B, heads, G, d): block rows added in order.
  at::Tensor grad_gk = at::zeros({g.B, g.heads, g.G, g.d}, acc_options);
  at::Tensor grad_gv = at::zeros({g.B, g.heads, g.G, g.d}, acc_options);
  AT_DISPATCH_FLOATING_TYPES(acc, "_multigrained_attention_backward", [&] {
    const int64_t span = g.G * g.d;
    const scalar_t* pk = part_gk.data_ptr<scalar_t>();
    const scalar_t* pv = part_gv.data_ptr<scalar_t>();
    scalar_t* rk = grad_gk.data_ptr<scalar_t>();
    scalar_t* rv = grad_gv.data_ptr<scalar_t>();
    at::parallel_for(0, g.B * g.heads, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bh = b0; bh < b1; ++bh)
        for (int64_t bi = 0; bi < g.nbr; ++bi) {
          const scalar_t* sk = pk + (bh * g.nbr + bi) * span;
          const scalar_t* sv = pv + (bh * g.nbr + bi) * span;
          for (int64_t e = 0; e < span; ++e) rk[bh * span + e] += sk[e], rv[bh * span + e] += sv[e];
        }
    });
  });
  const at::ScalarType dt = q.scalar_type();
  return {grad_q, acc_k.to(dt), acc_v.to(dt), grad_gk.to(dt), grad_gv.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvq, CPU, m) {
  m.impl("multigrained_attention", &multigrained_attention_cpu);
  m.impl("_multigrained_attention_backward", &multigrained_attention_backward_cpu);
}

PYVQ_REGISTER_CPU_OP("multigrained_attention", kMultigrainedIsa);

}  // namespace multigrained_attention
}  // namespace pyvq
