// AVX-512 instantiation of the CPU codebook search driver.
//
// Compiled with AVX-512 enabled for this file only (the pragma below), and
// called only at an instruction-set level of avx512 or above
// (common/cpu_isa.h), which the CPU supports. No ATen or standard-library
// templates are included here: an inline function compiled with AVX-512 must
// never be shared with baseline code.
#include "common/cpu_isa.h"

#if PYVQ_CPU_AVX512_BUILD
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
// GCC 12 flags the deliberately undefined pass-through operand inside its
// own AVX-512 intrinsic headers (_mm512_undefined_*); not our code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define PYVQ_CODEBOOK_DRIVER
#include "codebook/codebook_cpu_kernel.h"

namespace pyvq {
namespace codebook {
namespace cpu {
namespace {

struct Avx512F32 {
  using T = float;
  using vec = __m512;
  using ivec = __m512i;
  using mask = __mmask16;
  static constexpr int L = 16;
  static constexpr int MR = 32;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec load(const T* p) { return _mm512_loadu_ps(p); }
  static void store(T* p, vec v) { _mm512_storeu_ps(p, v); }
  static vec set1(T v) { return _mm512_set1_ps(v); }
  static vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static mask lt(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static mask nan(vec a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static mask mor(mask a, mask b) { return _kor_mask16(a, b); }
  static mask none() { return 0; }
  static bool any(mask m) { return m != 0; }
  static mask beyond(vec a, vec lim) {
    return _mm512_cmp_ps_mask(_mm512_abs_ps(a), lim, _CMP_NLE_UQ);
  }
  static mask mandn(mask a, mask b) { return _kandn_mask16(a, b); }
  static vec blend(mask m, vec a, vec b) { return _mm512_mask_mov_ps(a, m, b); }
  static ivec iset1(int32_t v) { return _mm512_set1_epi32(v); }
  static ivec iload(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void istore(int32_t* p, ivec v) { _mm512_storeu_si512(p, v); }
  static ivec iblend(mask m, ivec a, ivec b) { return _mm512_mask_mov_epi32(a, m, b); }
};

struct Avx512F64 {
  using T = double;
  using vec = __m512d;
  using ivec = __m256i;
  using mask = __mmask8;
  static constexpr int L = 8;
  static constexpr int MR = 16;
  static vec zero() { return _mm512_setzero_pd(); }
  static vec load(const T* p) { return _mm512_loadu_pd(p); }
  static void store(T* p, vec v) { _mm512_storeu_pd(p, v); }
  static vec set1(T v) { return _mm512_set1_pd(v); }
  static vec fmadd(vec a, vec b, vec c) { return _mm512_fmadd_pd(a, b, c); }
  static vec add(vec a, vec b) { return _mm512_add_pd(a, b); }
  static mask lt(vec a, vec b) { return _mm512_cmp_pd_mask(a, b, _CMP_LT_OQ); }
  static mask nan(vec a) { return _mm512_cmp_pd_mask(a, a, _CMP_UNORD_Q); }
  static mask mor(mask a, mask b) { return _kor_mask8(a, b); }
  static mask none() { return 0; }
  static bool any(mask m) { return m != 0; }
  static mask beyond(vec a, vec lim) {
    return _mm512_cmp_pd_mask(_mm512_abs_pd(a), lim, _CMP_NLE_UQ);
  }
  static mask mandn(mask a, mask b) { return _kandn_mask8(a, b); }
  static vec blend(mask m, vec a, vec b) { return _mm512_mask_mov_pd(a, m, b); }
  static ivec iset1(int32_t v) { return _mm256_set1_epi32(v); }
  static ivec iload(const int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static void istore(int32_t* p, ivec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static ivec iblend(mask m, ivec a, ivec b) { return _mm256_mask_mov_epi32(a, m, b); }
};

// ---------------------------------------------------------------------------
// bfloat16 screening for float32 (see kScreenMinD in codebook_cpu_kernel.h).
// Only these functions use AVX512_BF16 instructions; they run only when
// use_screening() saw the avx512-bf16 level.
// ---------------------------------------------------------------------------
#define PYVQ_BF16 __attribute__((target("avx512bf16")))

struct Screen {
  uint32_t* xb;    // [nmp][D2][32] rows as bf16 pairs, like the codes
  float* window;   // [rows] width of the kept window above the best
  float* best;     // [rows] best approximate score so far
  int32_t* count;  // [rows] candidates kept; kScreenCap + 1 = overflowed
  int32_t* index;  // [rows][kScreenCap] candidate codes, increasing
  float* score;    // [rows][kScreenCap] their approximate scores
};

PYVQ_BF16 static inline __m512i bf16_pairs_of(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

// Append code k to the rows of `lanes` (row r0 + lane); a full list first
// drops the entries that have left its window.
static void keep_candidates(Screen& s, int64_t r0, __mmask16 lanes, __m512 score, int32_t k) {
  alignas(64) float sc[16];
  _mm512_store_ps(sc, score);
  while (lanes) {
    const int lane = __builtin_ctz(lanes);
    lanes &= lanes - 1;
    const int64_t r = r0 + lane;
    int32_t n = s.count[r];
    if (n > kScreenCap) continue;
    int32_t* ix = s.index + r * kScreenCap;
    float* sv = s.score + r * kScreenCap;
    if (n == kScreenCap) {
      const float lim = s.best[r] + s.window[r];
      int32_t w = 0;
      for (int32_t i = 0; i < n; ++i) {
        if (sv[i] <= lim) {
          ix[w] = ix[i];
          sv[w] = sv[i];
          ++w;
        }
      }
      n = w;
      if (n == kScreenCap) {
        s.count[r] = kScreenCap + 1;
        continue;
      }
    }
    ix[n] = k;
    sv[n] = sc[lane];
    s.count[r] = n + 1;
  }
}

PYVQ_BF16 static inline __attribute__((always_inline)) void screen_kernel(
    const uint32_t* __restrict xb, const uint32_t* __restrict cb, const float* __restrict bias,
    int64_t D2, int32_t kbase, int kvalid, Screen& s, int64_t r0) {
  __m512 a0[kPanel], a1[kPanel];
#pragma GCC unroll 12
  for (int j = 0; j < kPanel; ++j) {
    a0[j] = _mm512_setzero_ps();
    a1[j] = _mm512_setzero_ps();
  }
  for (int64_t t = 0; t < D2; ++t) {
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xb + t * 32);
    const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xb + t * 32 + 16);
    const uint32_t* c = cb + t * kPanel;
#pragma GCC unroll 12
    for (int j = 0; j < kPanel; ++j) {
      const __m512bh cj = (__m512bh)_mm512_set1_epi32(int32_t(c[j]));
      a0[j] = _mm512_dpbf16_ps(a0[j], x0, cj);
      a1[j] = _mm512_dpbf16_ps(a1[j], x1, cj);
    }
  }
  float* bm = s.best + r0;
  const float* wn = s.window + r0;
  __m512 m0 = _mm512_loadu_ps(bm), m1 = _mm512_loadu_ps(bm + 16);
  const __m512 w0 = _mm512_loadu_ps(wn), w1 = _mm512_loadu_ps(wn + 16);
#pragma GCC unroll 12
  for (int j = 0; j < kPanel; ++j) {
    if (j >= kvalid) break;
    const __m512 bj = _mm512_set1_ps(bias[j]);
    const __m512 s0 = _mm512_add_ps(a0[j], bj);
    const __m512 s1 = _mm512_add_ps(a1[j], bj);
    m0 = _mm512_min_ps(m0, s0);
    m1 = _mm512_min_ps(m1, s1);
    const __mmask16 h0 = _mm512_cmp_ps_mask(s0, _mm512_add_ps(m0, w0), _CMP_LE_OQ);
    const __mmask16 h1 = _mm512_cmp_ps_mask(s1, _mm512_add_ps(m1, w1), _CMP_LE_OQ);
    if (__builtin_expect((h0 | h1) != 0, 0)) {
      _mm512_storeu_ps(bm, m0);
      _mm512_storeu_ps(bm + 16, m1);
      if (h0) keep_candidates(s, r0, h0, s0, kbase + j);
      if (h1) keep_candidates(s, r0 + 16, h1, s1, kbase + j);
    }
  }
  _mm512_storeu_ps(bm, m0);
  _mm512_storeu_ps(bm + 16, m1);
}

// Row norms and screening windows of a packed block, and its bf16 copy.
//
// Window: |approx - exact| and |float32 kernel - exact| are each at most
//   (2u_bf16 + u_bf16^2 + gamma_D) sum_i |x_i c_i| + u (|dot| + |bias|)
//   + flush-to-zero terms,  with u_bf16 = 2^-8, u = 2^-24,
//   gamma_D = D u / (1 - D u), and sum_i |x_i c_i| <= |x| max_k |c_k|.
// A code is kept while its approximate score is within twice that bound
// (times a 1.25 safety factor) of the best approximate score, so the float32
// argmin is always kept.
PYVQ_BF16 static void prepare_screen(const PackedCodes<float>& codes, const float* xp, int64_t nmp,
                                     Screen& s) {
  const int64_t D = codes.D, D2 = bf16_pairs(D);
  const double u = 1.0 / 16777216.0;
  const double gamma = double(D) * u / (1.0 - double(D) * u);
  const double rel = 1.25 * (2.0 / 256.0 + 1.0 / 65536.0 + gamma + u);
  for (int64_t mp = 0; mp < nmp; ++mp) {
    const float* xm = xp + mp * D * 32;
    uint32_t* xbm = s.xb + mp * D2 * 32;
    for (int64_t t = 0; t < D2; ++t) {
      for (int h = 0; h < 2; ++h) {
        const __m512 lo = _mm512_loadu_ps(xm + (2 * t) * 32 + 16 * h);
        const __m512 hi =
            2 * t + 1 < D ? _mm512_loadu_ps(xm + (2 * t + 1) * 32 + 16 * h) : _mm512_setzero_ps();
        _mm512_storeu_si512(xbm + t * 32 + 16 * h, bf16_pairs_of(lo, hi));
      }
    }
    for (int i = 0; i < 32; ++i) {
      double nn = 0;
      for (int64_t d = 0; d < D; ++d) {
        const double v = xm[d * 32 + i];
        nn += v * v;
      }
      const double xn = __builtin_sqrt(nn);
      const double dot = xn * codes.code_norm_max;
      const double tiny = 4e-38 * double(D) * (2.0 + codes.code_norm_max + xn);
      const double bound = rel * dot + u * (dot + codes.bias_abs_max) + tiny;
      const int64_t r = mp * 32 + i;
      s.window[r] = float(2.0 * bound);
      s.best[r] = __builtin_inff();
      s.count[r] = 0;
    }
  }
}

// The float32 kernel's scores of one row and n <= kScreenCap codes, with its
// exact arithmetic: per code a fused multiply-add chain over d in order, then
// the bias. The chains of several codes advance together (independent
// chains hide the FMA latency); each chain's order is unchanged.
static void exact_scores(const PackedCodes<float>& codes, const float* xcol, const int32_t* ks,
                         int n, float* out) {
  constexpr int kGroup = 8;
  for (int g = 0; g < n; g += kGroup) {
    const int m = n - g < kGroup ? n - g : kGroup;
    const float* c[kGroup];
    float acc[kGroup];
    for (int j = 0; j < kGroup; ++j) {
      const int64_t k = ks[g + (j < m ? j : 0)];
      c[j] = codes.packed + (k / kPanel) * codes.D * kPanel + k % kPanel;
      acc[j] = 0.0f;
    }
    for (int64_t d = 0; d < codes.D; ++d) {
      const float xv = xcol[d * 32];
#pragma GCC unroll 8
      for (int j = 0; j < kGroup; ++j) acc[j] = __builtin_fmaf(xv, c[j][d * kPanel], acc[j]);
    }
    for (int j = 0; j < m; ++j) out[g + j] = acc[j] + codes.bias[ks[g + j]];
  }
}

PYVQ_BF16 static void search_rows_screened(const PackedCodes<float>& codes, const float* x,
                                           int64_t n, const Blocking& blk, float* scratch,
                                           int32_t* iscratch, int64_t* out_index) {
  using V = Avx512F32;
  const int64_t D = codes.D, D2 = bf16_pairs(D);
  const int64_t P = num_panels(codes.K);
  const int64_t R = blk.rows;
  float* xp = scratch;
  float* best = xp + R * D;
  Screen s;
  s.xb = reinterpret_cast<uint32_t*>(best + R);
  s.window = reinterpret_cast<float*>(s.xb + R * D2);
  s.best = s.window + R;
  s.count = reinterpret_cast<int32_t*>(s.best + R);
  s.index = s.count + R;
  s.score = reinterpret_cast<float*>(s.index + R * kScreenCap);
  for (int64_t r0 = 0; r0 < n; r0 += R) {
    const int64_t rows = n - r0 < R ? n - r0 : R;
    const int64_t nmp = (rows + 31) / 32;
    if (pack_rows<V>(x + r0 * D, rows, D, codes.x_limit, xp)) {
      // Non-finite or huge rows: the float32 NaN-ordering path.
      search_block_fresh<V, true>(codes, xp, nmp, blk.panels, best, iscratch);
      for (int64_t i = 0; i < rows; ++i) out_index[r0 + i] = iscratch[i];
      continue;
    }
    prepare_screen(codes, xp, nmp, s);
    for (int64_t p0 = 0; p0 < P; p0 += blk.panels) {
      const int64_t p1 = p0 + blk.panels < P ? p0 + blk.panels : P;
      for (int64_t mp = 0; mp < nmp; ++mp) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t kbase = p * kPanel;
          const int64_t left = codes.K - kbase;
          screen_kernel(s.xb + mp * D2 * 32, codes.bf16 + p * D2 * kPanel, codes.bias + kbase, D2,
                        int32_t(kbase), left < kPanel ? int(left) : kPanel, s, mp * 32);
        }
      }
    }
    for (int64_t mp = 0; mp < nmp; ++mp) {
      const float* xm = xp + mp * D * 32;
      bool overflow = false;
      for (int i = 0; i < 32; ++i) overflow |= s.count[mp * 32 + i] > kScreenCap;
      if (overflow) {  // too many near-ties: the float32 kernel decides
        search_block_fresh<V, false>(codes, xm, 1, blk.panels, best + mp * 32, iscratch + mp * 32);
      } else {
        for (int i = 0; i < 32; ++i) {
          const int64_t r = mp * 32 + i;
          const float lim = s.best[r] + s.window[r];
          int32_t ks[kScreenCap];
          float es[kScreenCap];
          int m = 0;
          for (int32_t c = 0; c < s.count[r]; ++c)
            if (s.score[r * kScreenCap + c] <= lim) ks[m++] = s.index[r * kScreenCap + c];
          exact_scores(codes, xm + i, ks, m, es);
          float bs = __builtin_inff();
          int32_t bi = 0;
          for (int c = 0; c < m; ++c) {
            if (es[c] < bs) {  // increasing k: ties keep the lowest index
              bs = es[c];
              bi = ks[c];
            }
          }
          iscratch[r] = bi;
        }
      }
    }
    for (int64_t i = 0; i < rows; ++i) out_index[r0 + i] = iscratch[i];
  }
}

}  // namespace

void search_rows_avx512(const PackedCodes<float>& codes, const float* x, int64_t n,
                        const Blocking& b, float* scratch, int32_t* iscratch, int64_t* out_index) {
  if (codes.bf16 != nullptr && !codes.careful)
    return search_rows_screened(codes, x, n, b, scratch, iscratch, out_index);
  search_rows_impl<Avx512F32>(codes, x, n, b, scratch, iscratch, out_index);
}

void search_rows_avx512(const PackedCodes<double>& codes, const double* x, int64_t n,
                        const Blocking& b, double* scratch, int32_t* iscratch, int64_t* out_index) {
  search_rows_impl<Avx512F64>(codes, x, n, b, scratch, iscratch, out_index);
}

}  // namespace cpu
}  // namespace codebook
}  // namespace pyvq
#endif
