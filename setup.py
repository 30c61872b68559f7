"""Build pyvq and its compiled extension pyvq._C.

CPU kernels are always built. CUDA kernels are built when torch is a CUDA
build and a CUDA toolkit is found; PYVQ_WITH_CUDA=auto|0|1 controls this
(1 fails loudly when CUDA cannot be built). TORCH_CUDA_ARCH_LIST picks the
architectures (default "8.0;9.0").
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_toolkit_root():
    """The real toolkit directory, or None.

    The `nvcc` on PATH may be a wrapper script living outside the toolkit, so
    torch's guess from its location can be wrong. CUDA_HOME wins when set;
    otherwise nvcc itself reports its root (`#$ TOP=...` in a dry run).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.realpath(root)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "pyvq_probe.cu"], capture_output=True, text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    if match:
        return os.path.realpath(match.group(1).strip())
    return os.path.realpath(os.path.join(os.path.dirname(nvcc), ".."))


def _nvidia_wheel_dirs():
    """Header and library dirs of the nvidia-* wheels torch depends on."""
    purelib = sysconfig.get_paths()["purelib"]
    incs, libs = [], []
    for base in sorted(glob.glob(os.path.join(purelib, "nvidia", "cu*"))):
        if os.path.isdir(os.path.join(base, "include")):
            incs.append(os.path.join(base, "include"))
        if os.path.isdir(os.path.join(base, "lib")):
            libs.append(os.path.join(base, "lib"))
    return incs, libs


def _check_torch():
    """Stop with one line when the installed torch is older than pyvq's
    floor (pyvq/_requirements.py, loaded by path: pyvq itself needs the
    extension being built)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "pyvq_requirements", os.path.join(ROOT, "pyvq", "_requirements.py"))
    requirements = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(requirements)
    try:
        import torch
    except ImportError as exc:
        sys.exit(f"pyvq: building needs torch >= {'.'.join(map(str, requirements.TORCH_FLOOR))} "
                 f"installed first; import torch failed: {exc}")
    problem = requirements.torch_problem(torch.__version__)
    if problem:
        sys.exit(f"{problem} at {torch.__file__}")


def _want_cuda():
    mode = os.environ.get("PYVQ_WITH_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"PYVQ_WITH_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, None
    root = _cuda_toolkit_root()
    import torch

    problems = []
    if torch.version.cuda is None:
        problems.append("torch is not a CUDA build")
    if root is None:
        problems.append("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")
    if problems:
        if mode == "1":
            sys.exit("PYVQ_WITH_CUDA=1 but CUDA cannot be built: " + "; ".join(problems))
        print("pyvq: building without CUDA: " + "; ".join(problems))
        return False, None
    return True, root


def _extensions():
    _check_torch()
    with_cuda, cuda_root = _want_cuda()
    if with_cuda:
        # Must be set before torch.utils.cpp_extension is imported: it reads
        # CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_root
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_root

    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp"))
        + glob.glob(os.path.join("csrc", "*", "*.cpp"))
    )
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fvisibility=hidden"]
    macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs = []
    kwargs = {}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "*", "*.cu")))
        incs, libs = _nvidia_wheel_dirs()
        include_dirs += incs
        library_dirs += libs
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        macros += [("PYVQ_WITH_CUDA", "1"), ("PYVQ_CUDA_ARCHS", f'"{archs}"')]
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr",
                     "-DPYVQ_WITH_CUDA=1", f'-DPYVQ_CUDA_ARCHS="{archs}"'],
        }
        ext_cls = cpp_extension.CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="pyvq._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        define_macros=macros,
        extra_link_args=["-fopenmp"],
        **kwargs,
    )
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()

setup(
    packages=find_packages(include=["pyvq", "pyvq.*"]) + ["pyvq.triton_kernels"],
    package_dir={"pyvq.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
