// Portable instantiation of the CPU codebook search driver, code packing,
// and the run-time choice between it and the AVX-512 build.
//
// The portable vector type is a plain array the compiler vectorises with the
// baseline ISA. PYVQ_CPU_ISA=generic forces this path (tests use it to check
// both paths against the reference on an AVX-512 machine; see
// common/cpu_isa.h).
#define PYVQ_CODEBOOK_DRIVER
#include "codebook/codebook_cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace pyvq {
namespace codebook {
namespace cpu {

#if PYVQ_CPU_AVX512_BUILD
// Defined in codebook_cpu_avx512.cpp.
void search_rows_avx512(const PackedCodes<float>&, const float*, int64_t, const Blocking&, float*,
                        int32_t*, int64_t*);
void search_rows_avx512(const PackedCodes<double>&, const double*, int64_t, const Blocking&,
                        double*, int32_t*, int64_t*);
#endif

namespace {

template <typename TT, int kLanes>
struct Portable {
  using T = TT;
  static constexpr int L = kLanes;
  static constexpr int MR = 2 * kLanes;
  struct vec {
    T v[kLanes];
  };
  struct ivec {
    int32_t v[kLanes];
  };
  using mask = uint32_t;
  static vec zero() {
    vec r;
    for (int i = 0; i < L; ++i) r.v[i] = T(0);
    return r;
  }
  static vec load(const T* p) {
    vec r;
    for (int i = 0; i < L; ++i) r.v[i] = p[i];
    return r;
  }
  static void store(T* p, const vec& a) {
    for (int i = 0; i < L; ++i) p[i] = a.v[i];
  }
  static vec set1(T s) {
    vec r;
    for (int i = 0; i < L; ++i) r.v[i] = s;
    return r;
  }
  static vec fmadd(const vec& a, const vec& b, const vec& c) {
    vec r;
    for (int i = 0; i < L; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static vec add(const vec& a, const vec& b) {
    vec r;
    for (int i = 0; i < L; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  static mask lt(const vec& a, const vec& b) {
    mask m = 0;
    for (int i = 0; i < L; ++i) m |= mask(a.v[i] < b.v[i]) << i;
    return m;
  }
  static mask nan(const vec& a) {
    mask m = 0;
    for (int i = 0; i < L; ++i) m |= mask(a.v[i] != a.v[i]) << i;
    return m;
  }
  static mask mor(mask a, mask b) { return a | b; }
  static mask none() { return 0; }
  static bool any(mask m) { return m != 0; }
  static mask beyond(const vec& a, const vec& lim) {
    mask m = 0;
    for (int i = 0; i < L; ++i) {
      const T v = a.v[i] < 0 ? -a.v[i] : a.v[i];
      m |= mask(!(v <= lim.v[i])) << i;
    }
    return m;
  }
  static mask mandn(mask a, mask b) { return ~a & b; }
  static vec blend(mask m, const vec& a, const vec& b) {
    vec r;
    for (int i = 0; i < L; ++i) r.v[i] = ((m >> i) & 1u) ? b.v[i] : a.v[i];
    return r;
  }
  static ivec iset1(int32_t s) {
    ivec r;
    for (int i = 0; i < L; ++i) r.v[i] = s;
    return r;
  }
  static ivec iload(const int32_t* p) {
    ivec r;
    for (int i = 0; i < L; ++i) r.v[i] = p[i];
    return r;
  }
  static void istore(int32_t* p, const ivec& a) {
    for (int i = 0; i < L; ++i) p[i] = a.v[i];
  }
  static ivec iblend(mask m, const ivec& a, const ivec& b) {
    ivec r;
    for (int i = 0; i < L; ++i) r.v[i] = ((m >> i) & 1u) ? b.v[i] : a.v[i];
    return r;
  }
};

// Round-to-nearest-even float -> bfloat16 bits (finite inputs).
uint32_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  u += 0x7FFFu + ((u >> 16) & 1u);
  return u >> 16;
}

}  // namespace

bool use_screening(int64_t D, CpuIsa isa) { return D >= kScreenMinD && isa == CpuIsa::kAvx512Bf16; }

template <typename T>
void pack_codes(const T* codebook, int64_t K, int64_t D, Metric metric, T* packed, T* bias,
                uint32_t* bf16, PackedCodes<T>* out) {
  const int64_t P = num_panels(K);
  const T big = std::numeric_limits<T>::max();
  const T scale = score_scale<T>(metric);
  T cmax = 0;
  double norm_max = 0, bias_max = 0;
  bool careful = false;
  std::memset(packed, 0, sizeof(T) * size_t(P * D * kPanel));
  for (int64_t k = 0; k < P * kPanel; ++k) bias[k] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* c = codebook + k * D;
    // Norms in double so a huge code is flagged rather than overflowing.
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += double(c[d]) * double(c[d]);
    const T f = T(code_factor<double>(metric, ss));
    const double b = code_bias<double>(metric, ss);
    careful |= !(std::fabs(b) <= double(big) / 4) || !std::isfinite(double(f));
    bias[k] = T(b);
    bias_max = std::max(bias_max, std::fabs(b));
    T* dst = packed + (k / kPanel) * D * kPanel + (k % kPanel);
    double nn = 0;
    for (int64_t d = 0; d < D; ++d) {
      const T v = scale * (c[d] * f);
      const T a = std::fabs(v);
      careful |= !std::isfinite(v);
      cmax = a > cmax ? a : cmax;
      nn += double(v) * double(v);
      dst[d * kPanel] = v;
    }
    norm_max = std::max(norm_max, std::sqrt(nn));
  }
  if (bf16 != nullptr && !careful) {
    // Pairs of coordinates (2t, 2t+1) of each packed code, as bf16.
    const int64_t D2 = bf16_pairs(D);
    std::memset(bf16, 0, sizeof(uint32_t) * size_t(P * D2 * kPanel));
    for (int64_t k = 0; k < K; ++k) {
      const T* src = packed + (k / kPanel) * D * kPanel + (k % kPanel);
      uint32_t* dst = bf16 + (k / kPanel) * D2 * kPanel + (k % kPanel);
      for (int64_t t = 0; t < D2; ++t) {
        const uint32_t lo = bf16_bits(float(src[2 * t * kPanel]));
        const uint32_t hi = 2 * t + 1 < D ? bf16_bits(float(src[(2 * t + 1) * kPanel])) : 0u;
        dst[t * kPanel] = lo | (hi << 16);
      }
    }
    out->bf16 = bf16;
  }
  out->code_norm_max = norm_max;
  out->bias_abs_max = bias_max;
  out->packed = packed;
  out->bias = bias;
  out->K = K;
  out->D = D;
  out->careful = careful;
  const double denom = 4.0 * double(D > 0 ? D : 1) * double(cmax > 1 ? cmax : 1);
  out->x_limit = T(double(big) / denom);
}

template void pack_codes<float>(const float*, int64_t, int64_t, Metric, float*, float*, uint32_t*,
                                PackedCodes<float>*);
template void pack_codes<double>(const double*, int64_t, int64_t, Metric, double*, double*,
                                 uint32_t*, PackedCodes<double>*);

// Portable vectors are 32 bytes wide (8 floats or 4 doubles).
template <typename T>
void search_rows(CpuIsa isa, const PackedCodes<T>& codes, const T* x, int64_t n, const Blocking& b,
                 T* scratch, int32_t* iscratch, int64_t* out_index) {
#if PYVQ_CPU_AVX512_BUILD
  if (isa >= CpuIsa::kAvx512)
    return search_rows_avx512(codes, x, n, b, scratch, iscratch, out_index);
#endif
  search_rows_impl<Portable<T, int(32 / sizeof(T))>>(codes, x, n, b, scratch, iscratch, out_index);
}

template void search_rows<float>(CpuIsa, const PackedCodes<float>&, const float*, int64_t,
                                 const Blocking&, float*, int32_t*, int64_t*);
template void search_rows<double>(CpuIsa, const PackedCodes<double>&, const double*, int64_t,
                                  const Blocking&, double*, int32_t*, int64_t*);

}  // namespace cpu
}  // namespace codebook
}  // namespace pyvq
