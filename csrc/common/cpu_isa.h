// The one CPU instruction-set dispatch scheme of every CPU kernel.
//
// A kernel with instruction-set-specific code compiles it twice, never with -march=native: for
// the baseline of the target (any x86-64, or any other CPU) and, in an x86-64 build with GCC or
// clang (PYVQ_CPU_AVX512_BUILD), for AVX-512. At run time it asks cpu_isa_for() which of its
// builds to run:
//   nearest_code           the search driver instantiated in two translation units
//                          (codebook_cpu_generic.cpp, and codebook_cpu_avx512.cpp under
//                          #pragma GCC target), plus bf16 screening at avx512-bf16;
//   multinomial_posterior  the float32 passes instantiated twice in posterior_cpu.cpp, once
//   multinomial_kl         with PYVQ_TARGET_AVX512 (x86-64-v4) and once without.
// Each op's CPU file also registers the best level it has code for (common/build_facts.h), which
// pyvq.info() reports.
//
// Levels, each a superset of the one before:
//   generic      the baseline (SSE2 on x86-64)
//   avx512       x86-64-v4: AVX-512 F, BW, CD, DQ and VL, with AVX2, FMA, BMI2, ...
//   avx512-bf16  avx512 and AVX512_BF16
// cpu_isa() is the best level this CPU supports (detected once), capped by the environment
// variable PYVQ_CPU_ISA: "generic", "avx512", "avx512-bf16", or unset / empty for no cap. The
// variable is read on every call, so a process (a test) can switch paths between calls.
//
// No inline functions here: codebook_cpu_avx512.cpp includes this header and compiles its own
// functions for AVX-512, and an inline function emitted there could be picked by the linker for
// every caller.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYVQ_CPU_AVX512_BUILD 1
// Compiles one function for x86-64-v4; callers check cpu_isa_for(...) >= CpuIsa::kAvx512 first.
#define PYVQ_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define PYVQ_CPU_AVX512_BUILD 0
#define PYVQ_TARGET_AVX512
#endif

namespace pyvq {

enum class CpuIsa : int { kGeneric = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

// "generic", "avx512" or "avx512-bf16" (the values of PYVQ_CPU_ISA and of pyvq.info()).
const char* cpu_isa_name(CpuIsa isa);

// The best level this CPU supports and this build can use (detected once, not capped).
CpuIsa cpu_isa_detected();

// The level CPU kernels may use now: cpu_isa_detected() capped by PYVQ_CPU_ISA. An unknown value
// of PYVQ_CPU_ISA is an error (c10::Error naming the variable, the values it takes and the value
// found).
CpuIsa cpu_isa();

// The level a kernel whose best build is `best` runs at now: the lower of cpu_isa() and `best`.
CpuIsa cpu_isa_for(CpuIsa best);

}  // namespace pyvq
