// AVX-512 instantiation of the CPU codebook search driver.
//
// Compiled with AVX-512 enabled for this file only (the pragma below), and
// called only after codebook_cpu_generic.cpp has checked the CPU supports it.
// No ATen or standard-library templates are included here: an inline
// function compiled with AVX-512 must never be shared with baseline code.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#include <immintrin.h>

#define PYVQ_CODEBOOK_DRIVER
#include "codebook_cpu_kernel.h"

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
  static ivec iblend(mask m, ivec a, ivec b) {
    return _mm512_mask_mov_epi32(a, m, b);
  }
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
  static void istore(int32_t* p, ivec v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
  static ivec iblend(mask m, ivec a, ivec b) {
    return _mm256_mask_mov_epi32(a, m, b);
  }
};

}  // namespace

void search_rows_avx512(const PackedCodes<float>& codes, const float* x,
                        int64_t n, const Blocking& b, float* scratch,
                        int32_t* iscratch, int64_t* out_index) {
  search_rows_impl<Avx512F32>(codes, x, n, b, scratch, iscratch, out_index);
}

void search_rows_avx512(const PackedCodes<double>& codes, const double* x,
                        int64_t n, const Blocking& b, double* scratch,
                        int32_t* iscratch, int64_t* out_index) {
  search_rows_impl<Avx512F64>(codes, x, n, b, scratch, iscratch, out_index);
}

}  // namespace cpu
}  // namespace codebook
}  // namespace pyvq
#endif
