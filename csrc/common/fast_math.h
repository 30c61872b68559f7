// The vectorisable float exp, log and log1p of the CPU kernels (the
// posterior's per-class loops, the attention kernels' softmax), shared with
// CUDA, where they are libm's.
#pragma once

#include "common/macros.h"

#include <cmath>
#include <cstdint>

// Inlined into the caller, so the loops around a call vectorise inside the
// launchers' per-ISA builds.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PYVQ_FAST_MATH_FN PYVQ_HOST_DEVICE
#else
#define PYVQ_FAST_MATH_FN inline __attribute__((always_inline))
#endif

namespace pyvq {

// exp / log / log1p for per-element loops. float on the host: branch-free
// polynomials (Cephes' expf and logf coefficients, within about 2 ulp of
// libm) that the compiler vectorises; float on CUDA and every double: libm.
// fast_log expects a positive normal argument, fast_log1p a non-negative
// one; fast_exp gives 0 below -87.3 (so exp(-inf) = 0). Both return NaN
// for NaN explicitly: the vectorised clamp (min/max instructions) and the
// bit tricks would otherwise turn a NaN into a finite number, and a NaN or
// +inf logit would then give a finite, wrong posterior instead of NaN.
PYVQ_FAST_MATH_FN float fast_exp(float x) {
#if PYVQ_ON_DEVICE
  return ::expf(x);
#else
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  const float kf = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(x / ln 2)
  const float r = (xc - kf * 0.693359375f) + kf * 2.12194440e-4f;          // x - k ln 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float y = p * __builtin_bit_cast(float, (static_cast<int32_t>(kf) + 127) << 23);
  return x < -87.3f ? 0.0f : (x != x ? x : y);
#endif
}

PYVQ_FAST_MATH_FN float fast_log(float x) {
#if PYVQ_ON_DEVICE
  return ::logf(x);
#else
  const int32_t bits = __builtin_bit_cast(int32_t, x);
  const float m1 =
      __builtin_bit_cast(float, (bits & 0x007fffff) | 0x3f800000);  // mantissa in [1, 2)
  const bool big = m1 > 1.41421356f;
  const float e = static_cast<float>(((bits >> 23) & 0xff) - 127 + (big ? 1 : 0));
  const float f = (big ? 0.5f * m1 : m1) - 1.0f;  // in [sqrt(1/2) - 1, sqrt(2) - 1)
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float y = f * z * p - 2.12194440e-4f * e - 0.5f * z;
  const float out = (f + y) + 0.693359375f * e;
  return x != x ? x : out;
#endif
}

PYVQ_FAST_MATH_FN float fast_log1p(float x) {
#if PYVQ_ON_DEVICE
  return ::log1pf(x);
#else
  const float u = 1.0f + x;
  return fast_log(u) - ((u - 1.0f) - x) / u;  // corrects the rounding of 1 + x
#endif
}

PYVQ_FAST_MATH_FN double fast_exp(double x) { return ::exp(x); }
PYVQ_FAST_MATH_FN double fast_log(double x) { return ::log(x); }
PYVQ_FAST_MATH_FN double fast_log1p(double x) { return ::log1p(x); }

}  // namespace pyvq
