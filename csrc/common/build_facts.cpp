// The registry of common/build_facts.h.
#include "common/build_facts.h"

namespace pyvq {
namespace {

// Constructed on first use, so registrations from any file's static initialisers find it.
std::vector<CpuOpFacts>& registry() {
  static std::vector<CpuOpFacts> ops;
  return ops;
}

}  // namespace

bool register_cpu_op(const char* op, CpuIsa best) {
  registry().push_back({op, best});
  return true;
}

const std::vector<CpuOpFacts>& cpu_ops() { return registry(); }

}  // namespace pyvq
