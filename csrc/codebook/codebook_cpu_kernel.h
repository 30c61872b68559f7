// CPU nearest-codebook search: packed layouts and the blocked driver.
//
// This header is free of ATen on purpose: it is compiled twice, once with
// the baseline ISA (codebook_cpu_generic.cpp) and once with AVX-512 enabled
// (codebook_cpu_avx512.cpp); search_rows() runs the one the caller's
// instruction-set level (common/cpu_isa.h) names, so the build runs on any
// x86-64 (or other) machine.
//
// Layouts
//   packed codes  [P][D][kPanel]  P = ceil(K / kPanel) panels of kPanel codes,
//                 each code pre-multiplied by score_scale(metric) (exact: -2
//                 or -1) and, for cosine, normalised; padding codes are zero
//                 and never compared (the driver knows how many are valid).
//   bias          [P * kPanel]    code_bias(metric, ||c||^2)
//   packed rows   [R / MR][D][MR] a block of R rows of x, transposed in
//                 micro-panels of MR rows so one vector load reads the same
//                 coordinate of MR rows.
//
// The micro-kernel keeps an MR x kPanel tile of dot products in registers
// (rows in vector lanes, codes broadcast), adds the bias and folds the tile
// into a running (best score, best index) per row. Rows are blocked so a
// block of packed rows and a block of packed codes both stay in L2; the
// running minimum makes the N x K score matrix unnecessary.
#pragma once

#include "codebook/codebook.h"
#include "common/cpu_isa.h"

#include <cstdint>

namespace pyvq {
namespace codebook {
namespace cpu {

constexpr int kPanel = 12;  // codes per packed panel (broadcast operands)
constexpr int kMaxMR = 32;  // rows per micro-panel, upper bound over ISAs

// bfloat16 screening (float32 search on CPUs with AVX512_BF16, D >= 64):
// a first pass ranks codes with bf16 dot products (twice the fp32 FMA
// rate), keeping per row every code whose approximate score is within a
// rigorous error window of the best approximate score; the window bounds the
// bf16 rounding plus the float32 kernel's own rounding, so the float32
// argmin is always kept. The kept candidates (a few per row on real data)
// are then scored with exactly the float32 kernel's arithmetic. The result
// is bit-identical to the float32 kernel's; a row whose candidates overflow
// kScreenCap is searched again by the float32 kernel.
constexpr int64_t kScreenMinD = 64;
constexpr int kScreenCap = 32;

inline int64_t bf16_pairs(int64_t D) { return (D + 1) / 2; }

template <typename T>
struct PackedCodes {
  const T* packed = nullptr;  // [P][D][kPanel]
  const T* bias = nullptr;    // [P * kPanel]
  int64_t K = 0;
  int64_t D = 0;
  // True when some code is non-finite or so large that a score may
  // overflow; the kernels then take the NaN-ordering path for every row.
  bool careful = false;
  // Rows whose largest |value| exceeds this take the NaN-ordering path too.
  T x_limit = 0;
  // Screening data (float32 only, else null): [P][bf16_pairs(D)][kPanel]
  // words, each holding coordinates 2t (low half) and 2t+1 (high half) of a
  // packed code in bfloat16; and the largest packed-code norm and |bias|,
  // which scale the screening window.
  const uint32_t* bf16 = nullptr;
  double code_norm_max = 0;
  double bias_abs_max = 0;
};

inline int64_t num_panels(int64_t K) { return (K + kPanel - 1) / kPanel; }

// Rows per block and panels per block, sized so each fits about 256 KiB.
struct Blocking {
  int64_t rows;
  int64_t panels;
};

template <typename T>
inline Blocking choose_blocking(int64_t D) {
  const int64_t bytes = 256 * 1024;
  const int64_t per_row = (D > 0 ? D : 1) * int64_t(sizeof(T));
  int64_t rows = bytes / per_row / kMaxMR * kMaxMR;
  rows = rows < kMaxMR ? kMaxMR : (rows > 4096 ? 4096 : rows);
  int64_t panels = bytes / (per_row * kPanel);
  panels = panels < 1 ? 1 : panels;
  return {rows, panels};
}

// Scratch (in T) one search_rows call needs for a given blocking: packed
// rows and running scores, plus the screening state (4-byte words).
template <typename T>
inline int64_t scratch_size(const Blocking& b, int64_t D) {
  const int64_t screen = b.rows * (bf16_pairs(D) + 3 + 2 * kScreenCap);
  return b.rows * (D > 0 ? D : 1) + b.rows + screen;
}

// Defined in codebook_cpu_generic.cpp (float and double). `bf16`, when not
// null, receives the screening copy of the codes (float only).
template <typename T>
void pack_codes(const T* codebook, int64_t K, int64_t D, Metric metric, T* packed, T* bias,
                uint32_t* bf16, PackedCodes<T>* out);

// The best instruction-set level the search has code for in this build:
// avx512-bf16 (AVX-512 with bf16 screening) in an x86-64 build, else generic.
// The search runs at cpu_isa_for(kSearchIsa).
constexpr CpuIsa kSearchIsa = PYVQ_CPU_AVX512_BUILD ? CpuIsa::kAvx512Bf16 : CpuIsa::kGeneric;

// Whether float32 searches of dimension D use bf16 screening at level isa.
bool use_screening(int64_t D, CpuIsa isa);

// Best code index of each of the n rows of x (row-major [n][D]), with the
// AVX-512 build when isa is avx512 or above, else the portable one.
// `scratch` holds scratch_size<T>(b, D) elements, `iscratch` b.rows ints.
template <typename T>
void search_rows(CpuIsa isa, const PackedCodes<T>& codes, const T* x, int64_t n, const Blocking& b,
                 T* scratch, int32_t* iscratch, int64_t* out_index);

// ---------------------------------------------------------------------------
// The driver, instantiated by each ISA's translation unit with its own vector
// traits `V`. V provides: T, vec, ivec, mask, L (lanes), MR (= 2 * L),
// zero(), load(), store(), set1(), fmadd(), add(), lt(), nan(), blend(),
// iset1(), iload(), istore(), iblend(), beyond() (|a| > lim or NaN), and
// the mask operators none(), mor(), mandn(), any().
// It uses no library templates, so the two instantiations cannot collide.
// ---------------------------------------------------------------------------
#ifdef PYVQ_CODEBOOK_DRIVER

template <class V, bool kCareful>
static inline __attribute__((always_inline)) void micro_kernel(const typename V::T* __restrict xp,
                                                               const typename V::T* __restrict cp,
                                                               const typename V::T* __restrict bias,
                                                               int64_t D, int32_t kbase, int kvalid,
                                                               typename V::T* __restrict best,
                                                               int32_t* __restrict index) {
  // The running (best, index) of the MR rows lives in memory (L1), not in
  // registers: the dot-product loop needs 2 * kPanel accumulators, 2 row
  // vectors and a broadcast, and holding 4 more vectors across it makes the
  // compiler spill a row vector inside the hot loop.
  using vec = typename V::vec;
  vec a0[kPanel], a1[kPanel];
#pragma GCC unroll 12
  for (int j = 0; j < kPanel; ++j) {
    a0[j] = V::zero();
    a1[j] = V::zero();
  }
  for (int64_t d = 0; d < D; ++d) {
    const vec x0 = V::load(xp + d * V::MR);
    const vec x1 = V::load(xp + d * V::MR + V::L);
    const typename V::T* c = cp + d * kPanel;
#pragma GCC unroll 12
    for (int j = 0; j < kPanel; ++j) {
      const vec cj = V::set1(c[j]);
      a0[j] = V::fmadd(x0, cj, a0[j]);
      a1[j] = V::fmadd(x1, cj, a1[j]);
    }
  }
  vec b0 = V::load(best), b1 = V::load(best + V::L);
  typename V::ivec i0 = V::iload(index), i1 = V::iload(index + V::L);
#pragma GCC unroll 12
  for (int j = 0; j < kPanel; ++j) {
    if (j >= kvalid) break;
    const vec bj = V::set1(bias[j]);
    const vec s0 = V::add(a0[j], bj);
    const vec s1 = V::add(a1[j], bj);
    typename V::mask m0 = V::lt(s0, b0);
    typename V::mask m1 = V::lt(s1, b1);
    if (kCareful) {  // a NaN score beats any number; the first NaN stays
      m0 = V::mor(m0, V::mandn(V::nan(b0), V::nan(s0)));
      m1 = V::mor(m1, V::mandn(V::nan(b1), V::nan(s1)));
    }
    const typename V::ivec k = V::iset1(kbase + j);
    b0 = V::blend(m0, b0, s0);
    b1 = V::blend(m1, b1, s1);
    i0 = V::iblend(m0, i0, k);
    i1 = V::iblend(m1, i1, k);
  }
  V::store(best, b0);
  V::store(best + V::L, b1);
  V::istore(index, i0);
  V::istore(index + V::L, i1);
}

// Transpose rows [0, rows) of x into micro-panels; pad with zeros. Returns
// true when the block needs the NaN-ordering path (a NaN, an infinity, or a
// value beyond x_limit).
template <class V>
static bool pack_rows(const typename V::T* x, int64_t rows, int64_t D, typename V::T x_limit,
                      typename V::T* out) {
  using T = typename V::T;
  const int64_t nmp = (rows + V::MR - 1) / V::MR;
  for (int64_t mp = 0; mp < nmp; ++mp) {
    T* o = out + mp * D * V::MR;
    const int64_t r0 = mp * V::MR;
    const int64_t rn = rows - r0 < V::MR ? rows - r0 : V::MR;
    for (int64_t i = 0; i < V::MR; ++i) {
      if (i < rn) {
        const T* src = x + (r0 + i) * D;
        for (int64_t d = 0; d < D; ++d) o[d * V::MR + i] = src[d];
      } else {
        for (int64_t d = 0; d < D; ++d) o[d * V::MR + i] = T(0);
      }
    }
  }
  typename V::mask bad = V::none();
  const typename V::vec lim = V::set1(x_limit);
  for (int64_t i = 0; i < nmp * D * V::MR; i += V::L)
    bad = V::mor(bad, V::beyond(V::load(out + i), lim));
  return V::any(bad);
}

template <class V, bool kCareful>
static void search_block(const PackedCodes<typename V::T>& codes, const typename V::T* xp,
                         int64_t nmp, int64_t panels_per_block, typename V::T* best,
                         int32_t* best_index) {
  using T = typename V::T;
  const int64_t D = codes.D;
  const int64_t P = num_panels(codes.K);
  for (int64_t p0 = 0; p0 < P; p0 += panels_per_block) {
    const int64_t p1 = p0 + panels_per_block < P ? p0 + panels_per_block : P;
    for (int64_t mp = 0; mp < nmp; ++mp) {
      T* bm = best + mp * V::MR;
      int32_t* im = best_index + mp * V::MR;
      const T* xm = xp + mp * D * V::MR;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t kbase = p * kPanel;
        const int64_t left = codes.K - kbase;
        micro_kernel<V, kCareful>(xm, codes.packed + p * D * kPanel, codes.bias + kbase, D,
                                  int32_t(kbase), left < kPanel ? int(left) : kPanel, bm, im);
      }
    }
  }
}

// search_block from a fresh running minimum (+inf, index 0) for each row.
template <class V, bool kCareful>
static void search_block_fresh(const PackedCodes<typename V::T>& codes, const typename V::T* xp,
                               int64_t nmp, int64_t panels_per_block, typename V::T* best,
                               int32_t* best_index) {
  for (int64_t i = 0; i < nmp * V::MR; ++i) {
    best[i] = __builtin_inf();
    best_index[i] = 0;
  }
  search_block<V, kCareful>(codes, xp, nmp, panels_per_block, best, best_index);
}

template <class V>
static void search_rows_impl(const PackedCodes<typename V::T>& codes, const typename V::T* x,
                             int64_t n, const Blocking& blk, typename V::T* scratch,
                             int32_t* iscratch, int64_t* out_index) {
  using T = typename V::T;
  const int64_t D = codes.D;
  T* xp = scratch;
  T* best = scratch + blk.rows * (D > 0 ? D : 1);
  for (int64_t r0 = 0; r0 < n; r0 += blk.rows) {
    const int64_t rows = n - r0 < blk.rows ? n - r0 : blk.rows;
    const int64_t nmp = (rows + V::MR - 1) / V::MR;
    const bool careful = pack_rows<V>(x + r0 * D, rows, D, codes.x_limit, xp) || codes.careful;
    if (careful)
      search_block_fresh<V, true>(codes, xp, nmp, blk.panels, best, iscratch);
    else
      search_block_fresh<V, false>(codes, xp, nmp, blk.panels, best, iscratch);
    for (int64_t i = 0; i < rows; ++i) out_index[r0 + i] = iscratch[i];
  }
}

#endif  // PYVQ_CODEBOOK_DRIVER

}  // namespace cpu
}  // namespace codebook
}  // namespace pyvq
