// CPU feature detection and the PYVQ_CPU_ISA cap of common/cpu_isa.h.
#include "common/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace pyvq {
namespace {

constexpr CpuIsa kLevels[] = {CpuIsa::kGeneric, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16};

CpuIsa detect() {
#if PYVQ_CPU_AVX512_BUILD
  __builtin_cpu_init();
#if defined(__clang__) || __GNUC__ < 12
  // No ISA-level names in __builtin_cpu_supports: the AVX-512 parts of x86-64-v4 and its main
  // x86-64-v3 ones (every CPU with the former has the latter).
  const bool v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
                  __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
                  __builtin_cpu_supports("bmi2");
#else
  // What PYVQ_TARGET_AVX512 compiles for; it includes the AVX-512 F, DQ, BW and VL the codebook's
  // AVX-512 translation unit is compiled for.
  const bool v4 = __builtin_cpu_supports("x86-64-v4");
#endif
  if (!v4) return CpuIsa::kGeneric;
  return __builtin_cpu_supports("avx512bf16") ? CpuIsa::kAvx512Bf16 : CpuIsa::kAvx512;
#else
  return CpuIsa::kGeneric;
#endif
}

// The cap PYVQ_CPU_ISA sets: the highest level when unset or empty.
CpuIsa env_cap() {
  const char* value = std::getenv("PYVQ_CPU_ISA");
  if (value == nullptr || *value == '\0') return CpuIsa::kAvx512Bf16;
  for (CpuIsa level : kLevels)
    if (std::strcmp(value, cpu_isa_name(level)) == 0) return level;
  TORCH_CHECK(false,
              "pyvq: environment variable PYVQ_CPU_ISA must be 'generic', 'avx512' or "
              "'avx512-bf16' (or unset for the best this CPU has), got '",
              value, "'");
}

CpuIsa lower(CpuIsa a, CpuIsa b) { return static_cast<int>(a) < static_cast<int>(b) ? a : b; }

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Bf16: return "avx512-bf16";
    case CpuIsa::kAvx512: return "avx512";
    default: return "generic";
  }
}

CpuIsa cpu_isa_detected() {
  static const CpuIsa level = detect();
  return level;
}

CpuIsa cpu_isa() { return lower(cpu_isa_detected(), env_cap()); }

CpuIsa cpu_isa_for(CpuIsa best) { return lower(cpu_isa(), best); }

}  // namespace pyvq
