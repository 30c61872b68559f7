"""Run pytest against the ASan + UBSan build of pyvq's ops (``make sanitize``).

    python tools/sanitize/run.py --library build-sanitize/libpyvq_ops.so \\
        [--report-dir DIR] [-- PYTEST_ARGS...]

Starts a fresh interpreter (this one) with

- ``LD_PRELOAD`` = the compiler's ASan runtime (``$CC -print-file-name=libasan.so``,
  CC defaulting to gcc), which must come first in an uninstrumented Python,
  and its libstdc++ (see ``asan_runtime``);
  the child drops the variable again before pytest starts, so the
  subprocesses tests start (inductor's g++, a CLI) run without it;
- ``PYVQ_OPS_LIBRARY`` = the library, so ``import pyvq`` loads it instead of
  ``pyvq._C`` (pyvq/_backend.py);
- ``ASAN_OPTIONS`` with ``detect_leaks=1``, ``UBSAN_OPTIONS`` with
  ``halt_on_error=1`` (the build has ``-fno-sanitize-recover=undefined``, so
  a UBSan finding aborts the run), ``LSAN_OPTIONS`` with the suppressions of
  ``lsan.supp`` (one-time allocations of CPython and torch only); variables
  already set in the environment are appended, so they win;
- ASan's reports written to files under ``--report-dir``, and pytest run
  with ``--capture=sys`` so that UBSan's (always on stderr) are not swallowed
  with a test's captured output when the process exits right after one.

Exit status: pytest's, or 1 when a sanitizer found something in pyvq's code
(each finding is printed), whatever pytest said: any ASan or UBSan error,
and any leak with a pyvq frame in its allocation stack (``classify``). The
time the run took is printed last.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SUPPRESSIONS = os.path.join(HERE, "lsan.supp")

ASAN_OPTIONS = (
    "detect_leaks=1",
    "halt_on_error=1",
    "abort_on_error=0",
    "strict_init_order=1",
    "check_initialization_order=1",
    # torch and CPython are built without frame pointers: unwind with DWARF
    # info, so a leak's stack reaches the pyvq frame that allocated it.
    "fast_unwind_on_malloc=0",
    "malloc_context_size=30",
)
UBSAN_OPTIONS = ("print_stacktrace=1", "halt_on_error=1")
LSAN_OPTIONS = ("print_suppressions=0", "report_objects=0")

# The child: drop the preload (it already took effect) so that subprocesses
# of tests do not run under ASan, run pytest, and record its exit status
# (LSan's check at exit replaces the process's status with ASan's exitcode).
_CHILD = (
    "import os, sys; os.environ.pop('LD_PRELOAD', None); import pytest; "
    "rc = int(pytest.main(sys.argv[1:])); "
    "open(os.environ['PYVQ_SANITIZE_STATUS'], 'w').write(str(rc)); sys.exit(rc)"
)
LEAKS_HEADER = "ERROR: LeakSanitizer: detected memory leaks"


def _compiler_file(cc: str, name: str) -> str:
    out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True,
                         timeout=60).stdout.strip()
    # print-file-name echoes the bare name back when the file is not found.
    if not os.path.isabs(out) or not os.path.exists(out):
        raise SystemExit(f"sanitize: {cc} -print-file-name={name} gave {out!r}, not an existing "
                         f"file: {name} is not installed for this compiler")
    return os.path.realpath(out)


def asan_runtime(cc: str | None = None) -> str:
    """What to preload: the shared ASan runtime of the C compiler ``cc``
    (default $CC, else gcc), then its libstdc++. Python is not a C++
    program, so libstdc++ would otherwise be loaded after ASan has set up
    its interceptors, and the first C++ exception (a pybind11 import in
    triton, a TORCH_CHECK) would stop ASan with "real___cxa_throw != 0"."""
    cc = cc or os.environ.get("CC") or "gcc"
    if shutil.which(cc) is None:
        raise SystemExit(f"sanitize: the C compiler {cc!r} (from CC, default gcc) is not on PATH; "
                         "it is asked where its libasan.so is")
    return " ".join(_compiler_file(cc, name) for name in ("libasan.so", "libstdc++.so"))


def _options(own: tuple[str, ...], current: str | None, report_dir: str, name: str) -> str:
    parts = [*own, f"log_path={os.path.join(report_dir, name)}"]
    return ":".join(parts + ([current] if current else []))


def sanitizer_env(library: str, report_dir: str, runtime: str, environ: dict | None = None) -> dict:
    """The environment of the sanitized pytest process."""
    env = dict(os.environ if environ is None else environ)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = runtime + (f" {preload}" if preload else "")
    env["PYVQ_OPS_LIBRARY"] = os.path.abspath(library)
    env["ASAN_OPTIONS"] = _options(ASAN_OPTIONS, env.get("ASAN_OPTIONS"), report_dir, "asan")
    # gcc's UBSan runtime writes to stderr whatever log_path says (checked):
    # pytest runs with --capture=sys, so native stderr reaches the log.
    env["UBSAN_OPTIONS"] = ":".join(UBSAN_OPTIONS + ((env["UBSAN_OPTIONS"],) if env.get("UBSAN_OPTIONS") else ()))
    lsan = (*LSAN_OPTIONS, f"suppressions={SUPPRESSIONS}")
    env["LSAN_OPTIONS"] = ":".join(lsan + ((env["LSAN_OPTIONS"],) if env.get("LSAN_OPTIONS") else ()))
    return env


def reports(report_dir: str) -> list[str]:
    """The sanitizer report files under ``report_dir``, oldest first."""
    found = [p for p in glob.glob(os.path.join(report_dir, "*")) if os.path.isfile(p)
             and not os.path.basename(p).startswith("pytest-status")]
    return sorted(found, key=os.path.getmtime)


def pyvq_markers(library: str) -> tuple[str, ...]:
    """Text that marks a stack frame as pyvq's: the library's file (frames
    without debug info) or a source file of this checkout's csrc/ or
    tools/sanitize/ (frames with it)."""
    root = os.path.dirname(os.path.dirname(HERE))
    return (os.path.basename(library), os.path.realpath(library),
            os.path.join(root, "csrc") + os.sep, HERE + os.sep)


def classify(text: str, markers: tuple[str, ...]) -> tuple[list[str], int]:
    """Splits one report into the findings that fail the run and a count of
    ignored leaks. Every ASan or UBSan error fails it. Of a leak report, only
    the leaks with a pyvq frame in their allocation stack do: the rest are
    objects of CPython, torch, numpy or triton still alive at exit that
    lsan.supp did not already drop (suppressions cannot tell them from a
    pyvq leak by any frame below the allocation, which Python's and torch's
    are). Returns (failing findings, ignored leak count)."""
    if LEAKS_HEADER not in text:
        return [text], 0
    head, _, body = text.partition(LEAKS_HEADER)
    failing = [head] if "ERROR:" in head or "runtime error" in head else []
    ignored = 0
    for block in body.split("\n\n"):
        block = block.strip()
        if not block.startswith(("Direct leak", "Indirect leak")):
            continue
        if any(marker in block for marker in markers):
            failing.append(block)
        else:
            ignored += 1
    return failing, ignored


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/sanitize/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--library", required=True,
                   help="the libpyvq_ops.so of a PYVQ_SANITIZE=ON CMake build")
    p.add_argument("--report-dir", default=None,
                   help="where the sanitizers write their reports (default: a new temporary folder)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="after --: the tests and pytest options")
    args = p.parse_args(argv)
    if not os.path.isfile(args.library):
        p.error(f"--library must be the libpyvq_ops.so of a sanitizer build, got {args.library!r}: "
                "no such file (build it with `make sanitize`)")
    if args.pytest_args[:1] == ["--"]:
        args.pytest_args = args.pytest_args[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    report_dir = args.report_dir or tempfile.mkdtemp(prefix="pyvq-sanitize-")
    os.makedirs(report_dir, exist_ok=True)
    stale = reports(report_dir)
    if stale:
        raise SystemExit(f"sanitize: --report-dir {report_dir!r} already holds reports "
                         f"({', '.join(map(os.path.basename, stale))}); give an empty folder")
    env = sanitizer_env(args.library, report_dir, asan_runtime())
    status_file = os.path.join(report_dir, "pytest-status")
    env["PYVQ_SANITIZE_STATUS"] = status_file
    start = time.monotonic()
    # --capture=sys: pytest captures Python's sys.stdout/stderr only, so a
    # sanitizer's report written to fd 2 just before the process exits is
    # not swallowed with the captured output of the test that caused it.
    cmd = [sys.executable, "-c", _CHILD, "--capture=sys", *args.pytest_args]
    rc = subprocess.run(cmd, env=env).returncode
    elapsed = time.monotonic() - start
    if os.path.exists(status_file):  # pytest finished: its status, not the sanitizer's exit code
        with open(status_file) as f:
            rc = int(f.read())
    else:
        print(f"sanitize: the test process ended before pytest finished (exit status {rc})", file=sys.stderr)
        rc = rc or 1
    failing, ignored = [], 0
    markers = pyvq_markers(args.library)
    for path in reports(report_dir):
        with open(path, errors="replace") as f:
            found, skipped = classify(f.read(), markers)
        failing += [(path, finding) for finding in found]
        ignored += skipped
    for path, finding in failing:
        print(f"\n===== sanitizer finding ({path}) =====\n{finding}", file=sys.stderr)
    if ignored:
        print(f"sanitize: ignored {ignored} leak(s) with no pyvq frame (CPython/torch objects alive at "
              f"exit; reports in {report_dir})")
    if failing:
        print(f"sanitize: {len(failing)} sanitizer finding(s) in pyvq code (above); pytest exit status {rc}",
              file=sys.stderr)
        rc = rc or 1
    print(f"sanitize: tests took {elapsed:.1f} s under ASan + UBSan (exit status {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
