// Build facts each op registers for pyvq.info(), so csrc/module.cpp lists them without knowing
// any op's internals.
//
// An op's CPU file registers, at load time, its public name and the best instruction-set level
// its CPU kernel has code for in this build (common/cpu_isa.h):
//
//   PYVQ_REGISTER_CPU_OP("nearest_code", cpu::kSearchIsa);
//
// pyvq.info() then reports, per op, the level it runs at now: cpu_isa_for(best).
#pragma once

#include "common/cpu_isa.h"

#include <vector>

namespace pyvq {

struct CpuOpFacts {
  const char* op;  // the op's name under torch.ops.pyvq
  CpuIsa best;     // the best instruction-set level its CPU kernel has code for
};

// Adds one op's facts; returns true (it initialises a file-scope constant).
bool register_cpu_op(const char* op, CpuIsa best);

// Every registered op, in registration order.
const std::vector<CpuOpFacts>& cpu_ops();

}  // namespace pyvq

#define PYVQ_FACTS_CONCAT_(a, b) a##b
#define PYVQ_FACTS_CONCAT(a, b) PYVQ_FACTS_CONCAT_(a, b)
#define PYVQ_REGISTER_CPU_OP(op, best)                                                 \
  [[maybe_unused]] static const bool PYVQ_FACTS_CONCAT(pyvq_cpu_op_facts_, __LINE__) = \
      ::pyvq::register_cpu_op(op, best)
