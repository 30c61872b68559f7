// The Python module stub of pyvq._C and its build information. Only this
// file includes Python; ops are registered with the dispatcher elsewhere, so
// the CMake build (libtorch only) compiles every other source unchanged.
// Ops report their own build facts (common/build_facts.h); this file only
// lists them.
#include <Python.h>

#include "common/build_facts.h"
#include "common/cpu_isa.h"

#include <pybind11/pybind11.h>

#ifndef PYVQ_CUDA_ARCHS
#define PYVQ_CUDA_ARCHS ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyvq compiled ops (registered under torch.ops.pyvq)";
  m.def("build_info", [] {
    py::dict d;
#ifdef PYVQ_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["cuda_archs"] = std::string(PYVQ_CUDA_ARCHS);
    d["cpu_isa"] = std::string(pyvq::cpu_isa_name(pyvq::cpu_isa()));
    // Per op, the level its CPU kernel runs at now (PYVQ_CPU_ISA applied).
    py::dict by_op;
    for (const pyvq::CpuOpFacts& facts : pyvq::cpu_ops())
      by_op[facts.op] = std::string(pyvq::cpu_isa_name(pyvq::cpu_isa_for(facts.best)));
    d["cpu_isa_by_op"] = by_op;
    return d;
  });
}
