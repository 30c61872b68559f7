// The Python module stub of pyvq._C and its build information. Only this
// file includes Python; ops are registered with the dispatcher elsewhere, so
// the CMake build (libtorch only) compiles every other source unchanged.
#include <Python.h>

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
    return d;
  });
}
