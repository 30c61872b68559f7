"""The CPU-side logic of the sanitizer run (``make sanitize``): choosing the
ops library with PYVQ_OPS_LIBRARY (pyvq/_backend.py) and the runner
tools/sanitize/run.py. The sanitized build itself runs in ``make sanitize``
(too slow for the suite); tests/build/test_cmake.py loads a plain CMake build
through PYVQ_OPS_LIBRARY."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from pyvq import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_PY = os.path.join(ROOT, "tools", "sanitize", "run.py")


def _load_runner():
    spec = importlib.util.spec_from_file_location("pyvq_sanitize_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load_runner()


# --- PYVQ_OPS_LIBRARY ------------------------------------------------------

def test_missing_library_is_one_clear_error_at_import(tmp_path):
    """`import pyvq` with PYVQ_OPS_LIBRARY naming no file fails once, naming
    the variable and the path, and never falls back to pyvq._C."""
    missing = tmp_path / "nowhere" / "libpyvq_ops.so"
    env = dict(os.environ, PYVQ_OPS_LIBRARY=str(missing), PYTHONPATH=ROOT)
    code = "import sys\ntry:\n    import pyvq\nexcept FileNotFoundError as e:\n" \
           "    print('pyvq._C' in sys.modules); print(e); sys.exit(3)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    loaded_c, message = proc.stdout.strip().split("\n", 1)
    assert loaded_c == "False"
    assert "PYVQ_OPS_LIBRARY" in message and str(missing) in message and "no such file" in message


def test_library_errors_name_the_variable_and_the_file(tmp_path):
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"")
    with pytest.raises(ImportError, match=r"PYVQ_OPS_LIBRARY=.*empty\.so.*cannot be loaded as a shared library"):
        _backend._OpsLibrary(str(empty))
    # A real shared library that is not pyvq's (torch's libc10, already loaded here).
    c10 = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    if not os.path.isfile(c10):
        pytest.skip(f"torch ships no {c10} to stand in for a foreign library")
    with pytest.raises(ImportError, match=r"PYVQ_OPS_LIBRARY must name a libpyvq_ops.so .*libc10\.so.*does not export"):
        _backend._OpsLibrary(c10)


def test_sanitizer_build_without_asan_runtime_says_how_to_preload(tmp_path):
    """A library that needs libasan, in a process without the ASan runtime:
    a clear error instead of ASan aborting the process at dlopen."""
    if _backend._asan_loaded():
        pytest.skip("this process runs with the ASan runtime loaded")
    fake = tmp_path / "libpyvq_ops.so"
    fake.write_bytes(b"\x7fELF....libasan.so.8\x00....")  # never dlopen'ed: the check comes first
    with pytest.raises(ImportError, match=r"sanitizer build.*LD_PRELOAD=\$\(gcc -print-file-name=libasan.so\)"):
        _backend._OpsLibrary(str(fake))


# --- tools/sanitize/run.py -------------------------------------------------

def test_runner_environment(tmp_path):
    lib = tmp_path / "libpyvq_ops.so"
    env = run.sanitizer_env(str(lib), str(tmp_path / "reports"), "/opt/libasan.so.8",
                            environ={"LD_PRELOAD": "/x/libfoo.so", "ASAN_OPTIONS": "detect_leaks=0",
                                     "PATH": "/bin"})
    assert env["PATH"] == "/bin"
    # The ASan runtime must come first; what was preloaded stays after it.
    assert env["LD_PRELOAD"] == "/opt/libasan.so.8 /x/libfoo.so"
    assert env["PYVQ_OPS_LIBRARY"] == str(lib)
    asan = env["ASAN_OPTIONS"].split(":")
    assert "detect_leaks=1" in asan and f"log_path={tmp_path / 'reports' / 'asan'}" in asan
    assert asan[-1] == "detect_leaks=0", "the caller's options come last, so they win"
    ubsan = env["UBSAN_OPTIONS"].split(":")
    assert {"print_stacktrace=1", "halt_on_error=1"} <= set(ubsan)
    supp = [o.split("=", 1)[1] for o in env["LSAN_OPTIONS"].split(":") if o.startswith("suppressions=")]
    assert len(supp) == 1 and os.path.isfile(supp[0])
    assert run.sanitizer_env(str(lib), str(tmp_path), "/a.so", environ={})["LD_PRELOAD"] == "/a.so"


def test_runner_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--library", str(tmp_path / "missing.so")])
    err = capsys.readouterr().err
    assert "--library must be the libpyvq_ops.so" in err and "missing.so" in err
    lib = tmp_path / "libpyvq_ops.so"
    lib.write_bytes(b"")
    args = run.parse_args(["--library", str(lib), "--", "tests/ops", "-k", "not compile"])
    assert args.pytest_args == ["tests/ops", "-k", "not compile"]


def test_runner_refuses_a_report_dir_with_old_reports(tmp_path):
    lib = tmp_path / "libpyvq_ops.so"
    lib.write_bytes(b"")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "asan.123").write_text("old")
    with pytest.raises(SystemExit, match=r"already holds reports \(asan\.123\)"):
        run.main(["--library", str(lib), "--report-dir", str(tmp_path / "reports")])


def test_runner_needs_a_compiler_with_asan(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=r"'no-such-cc-pyvq'.*not on PATH"):
        run.asan_runtime("no-such-cc-pyvq")
    # A "compiler" that knows no libasan: -print-file-name echoes the name.
    fake = tmp_path / "fakecc"
    fake.write_text("#!/bin/sh\necho libasan.so\n")
    fake.chmod(0o755)
    with pytest.raises(SystemExit, match=r"gave 'libasan.so'.*not installed"):
        run.asan_runtime(str(fake))


NOISE_LEAK = """Direct leak of 104 byte(s) in 1 object(s) allocated from:
    #0 0x7f in operator new(unsigned long) asan_new_delete.cpp:95
    #1 0x7f in pybind11::cpp_function::make_function_record() (/site-packages/torch/lib/libtorch_python.so+0xa61acd)
    #2 0x7f in _PyEval_EvalFrameDefault Python/ceval.c:5091"""
PYVQ_LEAK = """Direct leak of 777 byte(s) in 1 object(s) allocated from:
    #0 0x7f in __interceptor_malloc asan_malloc_linux.cpp:69
    #1 0x7f in search_cpu<float> {root}/csrc/codebook/codebook_cpu.cpp:24
    #2 0x7f in _PyEval_EvalFrameDefault Python/ceval.c:5091"""
LEAKS = "=================================================================\n==1==ERROR: LeakSanitizer: detected memory leaks\n\n"


@pytest.mark.parametrize("report, pytest_status, expect, says", [
    (None, 0, 0, "tests took"),
    (None, 1, 1, "tests took"),  # a failing test fails the run, whatever the sanitizers say
    ("==1==ERROR: AddressSanitizer: heap-buffer-overflow on address 0x6020", 0, 1, "heap-buffer-overflow"),
    (LEAKS + NOISE_LEAK + "\n\nSUMMARY: AddressSanitizer: 104 byte(s) leaked", 0, 0, "ignored 1 leak"),
    (LEAKS + NOISE_LEAK + "\n\n" + PYVQ_LEAK + "\n\nSUMMARY: ...", 0, 1, "codebook_cpu.cpp:24"),
], ids=["clean", "test-failure", "asan-error", "noise-leak", "pyvq-leak"])
def test_runner_outcome(tmp_path, monkeypatch, capsys, report, pytest_status, expect, says):
    """Any ASan error fails the run even when the tests passed; of the leaks,
    only those with a pyvq frame (csrc/ or the library) do."""
    lib = tmp_path / "libpyvq_ops.so"
    lib.write_bytes(b"")
    reports = tmp_path / "reports"
    monkeypatch.setattr(run, "asan_runtime", lambda cc=None: "/opt/libasan.so")

    class Done:
        returncode = 23 if report else pytest_status  # LSan's exit code replaces pytest's

    def fake_run(cmd, env):
        assert cmd[:2] == [sys.executable, "-c"] and cmd[-1] == "tests/ops"
        with open(env["PYVQ_SANITIZE_STATUS"], "w") as f:
            f.write(str(pytest_status))
        if report:
            (reports / "asan.42").write_text(report.replace("{root}", ROOT))
        return Done()

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    assert run.main(["--library", str(lib), "--report-dir", str(reports), "--", "tests/ops"]) == expect
    out = capsys.readouterr()
    assert says in out.out + out.err


def test_runner_fails_when_the_process_dies_before_pytest_ends(tmp_path, monkeypatch, capsys):
    """UBSan's abort (no report file: it writes to stderr) ends the process early."""
    lib = tmp_path / "libpyvq_ops.so"
    lib.write_bytes(b"")
    monkeypatch.setattr(run, "asan_runtime", lambda cc=None: "/opt/libasan.so")

    class Died:
        returncode = 1

    monkeypatch.setattr(run.subprocess, "run", lambda cmd, env: Died())
    assert run.main(["--library", str(lib), "--report-dir", str(tmp_path / "r"), "--", "tests/ops"]) == 1
    assert "ended before pytest finished" in capsys.readouterr().err
