"""tools/gpu_check.py's CPU-side logic (arguments, the no-GPU path, parsing
pytest's output, the report), the benchmarks' ``--device`` option, and the
torch-version floor. What needs a GPU (the build with CUDA, the CUDA tests,
the CUDA timings) runs in ``make gpu-check`` on a GPU machine."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "tools", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gc = _load_gpu_check()
_REAL_LINK = gc.link_triton_kernels

NO_CUDA_MACHINE = {"python": "3.12.3", "executable": "/usr/bin/python3", "cpus": 2, "torch": "2.11.0+cu130",
                   "torch_cuda": "13.0", "cuda_available": False, "gpus": [], "triton": "3.6.0",
                   "modules": {}, "floor_problems": [], "nvcc": None, "driver": None}
CUDA_MACHINE = dict(NO_CUDA_MACHINE, cuda_available=True, cpus=16, driver="580.159.03",
                    gpus=[{"name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8}],
                    modules={"xdist": True, "pytest_timeout": True})
CUDA_INFO = {"built_with_cuda": True, "cuda_archs": "9.0", "triton": {"interpreted": False},
             "ops": {"nearest_code": {"cuda": True, "triton": False},
                     "window_attention": {"cuda": False, "triton": True}}}

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="6">
<testcase classname="tests.ops.test_grid" name="test_cuda_matches_reference[hash-float32]" time="0.1"/>
<testcase classname="tests.ops.test_grid" name="test_cuda_matches_reference[hash-float64]" time="0.1"/>
<testcase classname="tests.ops.test_posterior" name="test_cuda_matches_reference[8-4]" time="0.1">
  <failure message="AssertionError: Tensor-likes are not close!&#10;Mismatched elements: 3 / 64">trace</failure>
</testcase>
<testcase classname="tests.ops.test_window_attention_triton" name="test_compile" time="0.1">
  <error message="failed on setup with &quot;RuntimeError: boom&quot;">trace</error>
</testcase>
<testcase classname="tests.ops.test_kmeans" name="test_faiss_peer" time="0.0">
  <skipped type="pytest.skip" message="could not import 'faiss': No module named 'faiss'">skip</skipped>
</testcase>
<testcase classname="tests.ops.test_kmeans" name="test_faiss_inertia" time="0.0">
  <skipped type="pytest.skip" message="could not import 'faiss': No module named 'faiss'">skip</skipped>
</testcase>
</testsuite></testsuites>
"""

VERBOSE_LOG = """\
============================= test session starts ==============================
tests/ops/test_grid.py::test_cuda_matches_reference[hash-float32] PASSED [ 20%]
tests/ops/test_grid.py::test_cuda_matches_reference[hash-float64] FAILED [ 40%]
[gw1] [ 60%] PASSED tests/ops/test_window_attention_triton.py::test_forward[0-float16]
[gw0] [ 80%] SKIPPED tests/ops/test_kmeans.py::test_faiss_peer
tests/ops/test_posterior.py::test_cuda_matches_reference[8-4] ERROR      [100%]
=========================== short test summary info ============================
SKIPPED [1] tests/ops/test_kmeans.py:434: could not import 'faiss'
FAILED tests/ops/test_grid.py::test_cuda_matches_reference[hash-float64] - AssertionError
"""


def _main(argv, capsys):
    status = gc.main(argv)
    return status, capsys.readouterr()


# ---------------------------------------------------------------- arguments


def test_missing_out_is_one_clear_line(capsys):
    status, io = _main([], capsys)
    assert status == gc.EXIT_USAGE
    lines = io.err.strip().splitlines()
    assert len(lines) == 1 and "OUT is required" in lines[0], io.err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    status, io = _main([str(f)], capsys)
    assert status == gc.EXIT_USAGE
    assert io.err.count("\n") == 1 and "must be a folder" in io.err and str(f) in io.err


def test_out_that_cannot_be_created_is_refused(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    status, io = _main(["--out", str(f / "report")], capsys)
    assert status == gc.EXIT_USAGE
    assert io.err.count("\n") == 1 and "cannot create the folder" in io.err, io.err


def test_unwritable_out_is_refused(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root: folder permissions do not stop root from writing")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        status, io = _main([str(d)], capsys)
    finally:
        d.chmod(0o700)
    assert status == gc.EXIT_USAGE and "not writable" in io.err


@pytest.mark.parametrize("argv, message", [
    (["--benchmarks", "codebook,nope"], "--benchmarks: unknown nope"),
    (["--budget-s", "5"], "--budget-s must be more than"),
    (["a", "--out", "b"], "OUT given twice"),
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, message):
    argv = [a if a not in ("a", "b") else str(tmp_path / a) for a in argv]
    if "--out" not in argv and not any(a.startswith(str(tmp_path)) for a in argv):
        argv = [str(tmp_path / "out"), *argv]
    status, io = _main(argv, capsys)
    assert status == gc.EXIT_USAGE and message in io.err and io.err.count("\n") == 1, io.err


# ---------------------------------------------------------------- no GPU


def test_no_cuda_device_writes_report_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gc, "run_json", lambda *a, **k: (dict(NO_CUDA_MACHINE), ""))
    status, io = _main([str(tmp_path / "new" / "out")], capsys)
    assert status == gc.EXIT_OK
    report = (tmp_path / "new" / "out" / "report.md").read_text()
    assert "no CUDA device: nothing run" in report and "torch 2.11.0+cu130" in report
    summary = json.loads((tmp_path / "new" / "out" / "summary.json").read_text())
    assert summary["exit_status"] == 0 and summary["stages"] == {}
    assert sorted(os.listdir(tmp_path / "new" / "out")) == ["report.md", "summary.json"]


def test_stale_files_of_an_earlier_run_are_removed(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gc, "run_json", lambda *a, **k: (dict(NO_CUDA_MACHINE), ""))
    (tmp_path / "benchmarks.json").write_text("[]")
    (tmp_path / "mine.txt").write_text("kept")
    status, _ = _main([str(tmp_path)], capsys)
    assert status == gc.EXIT_OK and sorted(os.listdir(tmp_path)) == ["mine.txt", "report.md", "summary.json"]


def test_no_cuda_device_with_require_cuda_exits_3(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gc, "run_json", lambda *a, **k: (dict(NO_CUDA_MACHINE), ""))
    status, _ = _main([str(tmp_path), "--require-cuda"], capsys)
    assert status == gc.EXIT_NO_CUDA
    assert "no CUDA device: nothing run" in (tmp_path / "report.md").read_text()


def test_broken_torch_still_writes_report(tmp_path, capsys, monkeypatch):
    machine = {k: v for k, v in NO_CUDA_MACHINE.items() if not k.startswith("torch") and k != "cuda_available"}
    machine["torch_error"] = "ImportError: libcudart.so.13: cannot open shared object file"
    monkeypatch.setattr(gc, "run_json", lambda *a, **k: (machine, ""))
    status, _ = _main([str(tmp_path)], capsys)
    assert status == gc.EXIT_FAILED
    assert "torch does not import: ImportError: libcudart.so.13" in (tmp_path / "report.md").read_text()


def test_real_probe_without_gpu(tmp_path):
    """The script itself, on this machine's Python, without a GPU."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the no-GPU path does not run here")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "report.md").read_text()
    assert "no CUDA device: nothing run" in report and f"torch {torch.__version__}" in report


# ---------------------------------------------------------------- stages and parsing


def test_stage_timeout_kills_the_process_group(tmp_path):
    marker = tmp_path / "child_survived"
    # the shell's child would touch the marker after 1 s if it outlived the kill
    cmd = ["sh", "-c", f"(sleep 1; touch {marker}) & sleep 30"]
    t0 = time.monotonic()
    stage = gc.run_stage(gc.Stage("slow", cmd), env=dict(os.environ), log_path=str(tmp_path / "log"),
                         timeout_s=0.5)
    assert stage.timed_out and not stage.ok and time.monotonic() - t0 < 10
    assert "timed out" in stage.status() and "timed out" in (tmp_path / "log").read_text()
    time.sleep(1.5)
    assert not marker.exists()


def test_stage_without_time_left_is_not_run(tmp_path):
    stage = gc.run_stage(gc.Stage("late", ["true"]), env=dict(os.environ), log_path=str(tmp_path / "log"),
                         timeout_s=0)
    assert stage.skipped and stage.status() == "not run (no time left in the budget)"


def test_parse_junit_counts_failures_and_skip_reasons(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    c = gc.parse_junit(str(path))
    assert (c.passed, c.failed, c.errors, c.skipped) == (2, 1, 1, 2)
    assert c.failing == [
        ("tests/ops/test_posterior.py::test_cuda_matches_reference[8-4]", "AssertionError: Tensor-likes are not close!"),
        ("tests/ops/test_window_attention_triton.py::test_compile", 'failed on setup with "RuntimeError: boom"'),
    ]
    assert c.skip_reasons == {"could not import 'faiss': No module named 'faiss'": 2}


def test_parse_junit_missing_or_truncated_is_none(tmp_path):
    assert gc.parse_junit(str(tmp_path / "absent.xml")) is None
    (tmp_path / "cut.xml").write_text(JUNIT[:200])
    assert gc.parse_junit(str(tmp_path / "cut.xml")) is None


def test_parse_pytest_log_of_a_killed_run():
    c = gc.parse_pytest_log(VERBOSE_LOG)
    assert (c.passed, c.failed, c.errors, c.skipped) == (2, 1, 1, 1)
    assert [t for t, _ in c.failing] == ["tests/ops/test_grid.py::test_cuda_matches_reference[hash-float64]",
                                        "tests/ops/test_posterior.py::test_cuda_matches_reference[8-4]"]


def test_arch_list_and_child_environment():
    gpus = [{"capability": "9.0"}, {"capability": "10.0"}, {"capability": "8.0"}, {"capability": "9.0"}]
    assert gc.cuda_arch_list(gpus) == "8.0;9.0;10.0"
    env = gc.child_env({"PYTHONPATH": "/elsewhere", "TRITON_INTERPRET": "1", "PYVQ_BACKEND": "reference"},
                       PYVQ_WITH_CUDA=1)
    # Triton compiles for the GPU; tests/conftest.py then leaves the variable alone
    assert env["TRITON_INTERPRET"] == "0" and "PYVQ_BACKEND" not in env and env["PYVQ_WITH_CUDA"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [gc.ROOT, "/elsewhere"]


def test_pytest_command_selects_the_cuda_cases(tmp_path):
    cmd = gc.pytest_command("python3", str(tmp_path / "j.xml"), "cuda", {"xdist": True, "pytest_timeout": True}, 16)
    assert cmd[cmd.index("-k") + 1] == gc.TEST_KEYWORDS and "tests/ops" in cmd
    assert cmd[cmd.index("-n") + 1] == "8" and "--timeout" in cmd
    plain = gc.pytest_command("python3", "j.xml", "ops", {}, 2)
    assert "-k" not in plain and "-n" not in plain and "--timeout" not in plain


def test_slowest_compiles_from_ninja_logs(tmp_path):
    d = tmp_path / "temp.linux" / "x"
    d.mkdir(parents=True)
    (d / ".ninja_log").write_text(
        "# ninja log v5\n"
        f"0\t13290\t1\t{tmp_path}/temp.linux/csrc/a.o\th1\n"
        f"10\t95010\t1\t{tmp_path}/temp.linux/csrc/b_cuda.o\th2\n"
        "garbage line\n"
        f"0\t5000\t2\t{tmp_path}/temp.linux/csrc/a.o\th3\n")  # a rebuild: the newest entry counts
    assert gc.slowest_compiles(str(tmp_path), n=5) == [("temp.linux/csrc/b_cuda.o", 95.0),
                                                       ("temp.linux/csrc/a.o", 5.0)]
    assert gc.slowest_compiles(str(tmp_path / "absent")) == []


def test_collect_benchmark_tables_skips_what_is_not_a_table(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"title": "A", "rows": [{"N": 1}]}))
    (tmp_path / "b.json").write_text("{not json")
    (tmp_path / "c.json").write_text(json.dumps([1, 2]))
    tables = gc.collect_benchmark_tables(str(tmp_path))
    assert [t["title"] for t in tables] == ["A"] and tables[0]["file"] == "a.json"


# ---------------------------------------------------------------- the whole flow with fakes


def _fake_stages(monkeypatch, *, build_rc=0, junit=JUNIT, bench_timeout=(), tables=True):
    """run_stage that writes what each real stage would: logs, junit, bench JSON."""
    calls = []

    def fake(stage, *, env, log_path, timeout_s, cwd=gc.ROOT, append=False):
        calls.append((stage.name, env))
        stage.log = log_path
        with open(log_path, "a" if append else "w") as f:
            f.write(f"{stage.name} output\n")
        stage.seconds = 1.5
        if stage.name == "build":
            stage.rc = build_rc
        elif stage.name == "tests":
            junit_arg = next(a for a in stage.cmd if a.startswith("--junitxml="))
            with open(junit_arg.split("=", 1)[1], "w") as f:
                f.write(junit)
            stage.rc = 1 if "<failure" in junit or "<error" in junit else 0
        elif stage.name in bench_timeout:
            with open(log_path, "a") as f:
                f.write("       N   pyvq_s\n   16384   0.0042\n")
            stage.timed_out = True
        else:
            stage.rc = 0
            if tables:
                out = stage.cmd[stage.cmd.index("--out") + 1]
                with open(out, "w") as f:
                    json.dump({"title": f"{stage.name} table", "machine": {},
                               "rows": [{"N": 16384, "pyvq_s": 0.00123, "ref/pyvq": 3.5, "diff": None}]}, f)
        return stage

    monkeypatch.setattr(gc, "run_stage", fake)
    return calls


def _fake_probes(monkeypatch, info=CUDA_INFO):
    def run_json(python, code, env, timeout_s=120.0):
        return (dict(CUDA_MACHINE), "") if code is gc.PROBE else (info, "" if info else "ImportError: _C")

    monkeypatch.setattr(gc, "run_json", run_json)
    monkeypatch.setattr(gc, "link_triton_kernels", lambda root: None)  # leave this tree alone


def test_flow_build_failure_reports_its_tail(tmp_path, capsys, monkeypatch):
    _fake_probes(monkeypatch)
    calls = _fake_stages(monkeypatch, build_rc=1)
    status, _ = _main([str(tmp_path)], capsys)
    assert status == gc.EXIT_FAILED and [c[0] for c in calls] == ["build"]
    build_env = calls[0][1]
    assert build_env["PYVQ_WITH_CUDA"] == "1" and build_env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert build_env["MAX_JOBS"] == "16"
    report = (tmp_path / "report.md").read_text()
    assert "failed (exit status 1)" in report and "build output" in report and "FAILED" in report


def test_flow_with_failing_tests_lists_them_and_runs_benchmarks(tmp_path, capsys, monkeypatch):
    _fake_probes(monkeypatch)
    calls = _fake_stages(monkeypatch)
    status, _ = _main([str(tmp_path), "--benchmarks", "codebook,grid"], capsys)
    assert status == gc.EXIT_FAILED
    assert [c[0] for c in calls] == ["build", "tests", "grid", "codebook"]  # the order of BENCHMARKS
    assert calls[1][1]["TRITON_INTERPRET"] == "0"
    report = (tmp_path / "report.md").read_text()
    assert "**2 passed, 1 failed, 1 errors, 2 skipped**" in report
    assert "FAIL `tests/ops/test_posterior.py::test_cuda_matches_reference[8-4]`" in report
    assert "2 x could not import 'faiss'" in report
    assert "CUDA kernels: nearest_code" in report and "Triton interpreted: False" in report
    assert "### codebook table" in report and "| N | pyvq_s | ref/pyvq | diff |" in report
    assert "| 16384 | 0.00123 | 3.5 | - |" in report
    assert len(os.listdir(tmp_path)) <= 8  # what the device tool brings back


def test_flow_passing_tests_with_a_benchmark_timeout_exits_4(tmp_path, capsys, monkeypatch):
    _fake_probes(monkeypatch)
    ok_junit = JUNIT.replace('<failure message="AssertionError: Tensor-likes are not close!&#10;Mismatched '
                             'elements: 3 / 64">trace</failure>', "")
    ok_junit = ok_junit.replace('<error message="failed on setup with &quot;RuntimeError: boom&quot;">trace</error>',
                                "")
    _fake_stages(monkeypatch, junit=ok_junit, bench_timeout=("grid",))
    status, _ = _main([str(tmp_path), "--benchmarks", "codebook,grid", "--no-compile"], capsys)
    assert status == gc.EXIT_BENCH_FAILED
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["benchmarks"]["grid"]["status"].startswith("timed out")
    assert "--no-compile" in summary["benchmarks"]["codebook"]["cmd"]
    assert summary["test_counts"]["passed"] == 4
    report = (tmp_path / "report.md").read_text()
    assert "### grid: timed out after 2 s, the end of its output" in report and "   16384   0.0042" in report
    assert "codebook: ok" in report and "### codebook table" in report


@pytest.mark.parametrize("info, problem", [
    (dict(CUDA_INFO, triton={"interpreted": True}), "Triton is interpreted"),
    (dict(CUDA_INFO, built_with_cuda=False), "pyvq was not built with CUDA"),
    (dict(CUDA_INFO, ops={"window_attention": {"cuda": False, "triton": False}}),
     "Triton is installed but pyvq.triton_kernels is not importable"),
])
def test_flow_build_that_is_not_what_the_gpu_needs_fails(tmp_path, capsys, monkeypatch, info, problem):
    _fake_probes(monkeypatch, info=info)
    calls = _fake_stages(monkeypatch)
    status, _ = _main([str(tmp_path), "--benchmarks", ""], capsys)
    assert status == gc.EXIT_FAILED and problem in (tmp_path / "report.md").read_text()
    assert [c[0] for c in calls] == ["build"]


def test_triton_kernels_link_stands_in_for_the_install(tmp_path):
    (tmp_path / "pyvq").mkdir()
    (tmp_path / "triton_kernels").mkdir()
    (tmp_path / "triton_kernels" / "window_attention.py").write_text("")
    link = gc.link_triton_kernels(str(tmp_path))
    assert link == str(tmp_path / "pyvq" / "triton_kernels")
    assert (tmp_path / "pyvq" / "triton_kernels" / "window_attention.py").exists()
    assert gc.link_triton_kernels(str(tmp_path)) is None  # already there: left alone
    gc.unlink_triton_kernels(link)
    assert not os.path.lexists(link) and (tmp_path / "triton_kernels" / "window_attention.py").exists()


def test_linked_kernels_are_removed_after_the_run(tmp_path, capsys, monkeypatch):
    root = tmp_path / "tree"
    (root / "pyvq").mkdir(parents=True)
    (root / "triton_kernels").mkdir()
    _fake_probes(monkeypatch)
    monkeypatch.setattr(gc, "link_triton_kernels", lambda r: _REAL_LINK(str(root)))  # a tree of our own
    _fake_stages(monkeypatch)
    _main([str(tmp_path / "out"), "--benchmarks", ""], capsys)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["triton_kernels_link"] == str(root / "pyvq" / "triton_kernels")
    assert not os.path.lexists(root / "pyvq" / "triton_kernels")
    assert "linked pyvq/triton_kernels" in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------- benchmarks' --device


BENCH_SCRIPTS = ("bench_codebook", "bench_grid", "bench_posterior", "bench_kmeans", "bench_window_attention",
                 "bench_multigrained_attention", "bench_train_step")


@pytest.mark.parametrize("script", BENCH_SCRIPTS)
def test_benchmark_device_cuda_refuses_without_gpu(script, monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: --device cuda would run")
    from benchmarks import harness

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # no re-exec of the test process
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--quick", "--device", "cuda", "--out",
                                      str(tmp_path / "x.json")])
    module = importlib.import_module(f"benchmarks.{script}")
    try:
        with pytest.raises(SystemExit) as exc:
            module.main()
    finally:
        harness.select_device("cpu")
    assert f"{script}.py: --device cuda: no CUDA device here" in str(exc.value.code)
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("name", ["tpu", "cuda:x", ""])
def test_benchmark_device_malformed(name):
    from benchmarks import harness

    with pytest.raises(SystemExit, match="--device must be cpu or cuda"):
        harness.select_device(name)
    assert harness.current_device().type == "cpu"


def test_benchmark_device_cpu_measures_as_before():
    from benchmarks import harness

    assert harness.select_device("cpu") == torch.device("cpu")
    assert harness.median_time(lambda: None, repeats=3) >= 0
    assert harness.machine_info()["device"] == "cpu"


def test_measure_column_records_a_failing_peer_and_goes_on(capsys):
    from benchmarks import harness

    def broken():
        raise NotImplementedError("FlexAttention does not support backward on CPU\nmore detail")

    row = {}
    harness.measure_column(row, "flex", broken, repeats=1)
    harness.measure_column(row, "pyvq", lambda: torch.ones(4).sum(), repeats=1)
    assert row["flex_ms"] is None and row["flex_MiB"] is None
    assert row["flex_error"] == "NotImplementedError: FlexAttention does not support backward on CPU"
    assert row["pyvq_ms"] > 0 and "flex failed: NotImplementedError" in capsys.readouterr().out


# ---------------------------------------------------------------- the torch floor


def test_floor_message_names_found_needed_and_feature():
    from pyvq import _requirements as req

    msg = req.torch_problem("2.5.1+cu124")
    assert msg.startswith("pyvq needs torch >= 2.6 (") and "triton_op" in msg and msg.endswith("found torch 2.5.1+cu124")
    assert req.torch_problem(torch.__version__) is None
    assert req.torch_problem("2.6.0a0+git1234") is None and req.torch_problem("10.0") is None
    assert req.torch_problem("nightly") is not None
    assert req.triton_problem("2.3.1").startswith("pyvq needs triton >= 3.0") and req.triton_problem("3.6.0") is None


def test_import_with_old_torch_fails_with_one_message(monkeypatch):
    import pyvq

    monkeypatch.setattr(torch, "__version__", "2.5.1")
    try:
        with pytest.raises(ImportError, match=r"pyvq needs torch >= 2\.6 \(.*\); found torch 2\.5\.1 at "):
            importlib.reload(pyvq)
    finally:
        monkeypatch.undo()
        importlib.reload(pyvq)
    assert not hasattr(pyvq, "_torch")
