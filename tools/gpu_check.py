"""Build pyvq on a GPU machine, run its CUDA tests and benchmarks, write a report.

    python3 tools/gpu_check.py OUT          # or: make gpu-check OUT=<folder>

Meant to run unattended inside one 10-minute command on a machine that has a
CUDA GPU, its own torch and no package registry. In order, each stage
time-boxed (``--budget-s`` in all, default 560 s; a stage that hangs is
killed with its children and reported, and later stages get what is left):

1. probe: the machine (GPUs, driver, CPU count, Python, torch, Triton, CUDA,
   nvcc) through this Python in a subprocess, so a broken torch still
   yields a report;
2. build: ``python setup.py build_ext --inplace`` with ``PYVQ_WITH_CUDA=1``,
   ``TORCH_CUDA_ARCH_LIST`` from the devices' compute capabilities and
   ``MAX_JOBS`` = the CPU count, logged with the slowest compiles (ninja's
   log); then ``pyvq.info()`` of the result (CUDA architectures, which ops
   have CUDA kernels, whether Triton is interpreted: it must not be);
3. tests: pytest on the CUDA cases of tests/ops (``-k "cuda or triton or
   no_host_sync"``: the CUDA-vs-reference tests, every Triton test module,
   tests/ops/test_no_host_sync.py) and the CUDA-build check of
   tests/test_info.py, with ``TRITON_INTERPRET=0`` so the Triton kernels
   compile for the GPU (tests/conftest.py would otherwise decide from
   /dev/nvidiactl); junit XML parsed into pass / fail / error / skip counts
   (or, when pytest was killed, the verbose log);
4. benchmarks: every op benchmark (benchmarks/bench_*.py of the ops, and the
   model-level ones with a ``--device`` option) with ``--quick --device
   cuda``, each given a fair share of the time left.

OUT then holds at most 8 files (the device tool brings back 8): report.md
(machine, versions, build time, counts with failing test ids, benchmark
tables), summary.json (everything the report says, as data), build.log,
tests.log, junit.xml, benchmarks.log and benchmarks.json (every table the
benchmarks wrote).

The build is the long pole: the CUDA files and the attention CPU files
take a minute or more each on one core (multigrained_attention_cpu.cpp took
13 minutes until GCC's RTL GCSE was switched off for it; 91 s since), so on
a machine where it eats the budget, run again at once, while the machine is
still warm and the build outputs are still in the tree, with
``--skip-build`` (``make gpu-check OUT=... GPU_CHECK_ARGS=--skip-build``).

Exit status: 0 when everything ran and passed, and also when there is no
CUDA device (the report then says "no CUDA device: nothing run"; with
``--require-cuda`` that is status 3 instead); 1 when the probe, the build or
the tests failed (or no test was collected); 2 for bad arguments (OUT
missing or not writable: one line on stderr, no report); 4 when only
benchmarks failed or ran out of time.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA, EXIT_BENCH_FAILED = 0, 1, 2, 3, 4
# What a run writes into OUT (an earlier run's copies are removed first).
OUT_FILES = ("report.md", "summary.json", "build.log", "tests.log", "junit.xml", "benchmarks.log", "benchmarks.json")
NO_CUDA_LINE = "no CUDA device: nothing run"

# The pytest selection of the CUDA cases (see the module docstring).
TEST_PATHS = ("tests/ops", "tests/test_info.py")
TEST_KEYWORDS = "cuda or triton or no_host_sync"

# (name, script, extra arguments, arguments that drop torch.compile's column),
# cheapest first: each gets an even share of the time left, so what a quick
# one leaves goes to the slow ones (the attention tables compile the most).
BENCHMARKS = (
    ("grid", "benchmarks/bench_grid.py", (), ()),
    ("codebook", "benchmarks/bench_codebook.py", (), ("--no-compile",)),
    ("posterior", "benchmarks/bench_posterior.py", (), ("--no-compile",)),
    ("train_step", "benchmarks/bench_train_step.py", (), ()),
    ("kmeans", "benchmarks/bench_kmeans.py", (), ("--no-compile",)),
    ("multigrained_attention", "benchmarks/bench_multigrained_attention.py", (), ("--columns", "pyvq,ref,sdpa")),
    ("window_attention", "benchmarks/bench_window_attention.py", (), ("--columns", "pyvq,ref,timm,flex")),
)
REPORT_RESERVE_S = 10.0  # kept back from the budget for writing the report
BENCH_RESERVE_S = 30.0  # kept back from the tests for the benchmarks (the tests come first)

PROBE = r"""
import json, os, platform, shutil, subprocess, sys
out = {"python": platform.python_version(), "executable": sys.executable, "cpus": len(os.sched_getaffinity(0)),
       "platform": platform.platform()}
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    out["gpus"] = [
        {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
        for p in (torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count()))
    ] if out["cuda_available"] else []
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    import triton
    out["triton"] = triton.__version__
except Exception as exc:
    out["triton"] = None
    out["triton_error"] = f"{type(exc).__name__}: {exc}"
import importlib.util
out["modules"] = {m: importlib.util.find_spec(m) is not None for m in ("xdist", "pytest_timeout", "timm", "faiss")}
def first_line(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
        return lines[-1].strip() if lines else None
    except Exception:
        return None
try:
    spec = importlib.util.spec_from_file_location("pyvq_requirements", os.path.join("pyvq", "_requirements.py"))
    req = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(req)
    out["floor_problems"] = [p for p in (req.torch_problem(out["torch"]) if out.get("torch") else None,
                                         req.triton_problem(out["triton"]) if out.get("triton") else None) if p]
except Exception as exc:
    out["floor_problems"] = [f"cannot read pyvq/_requirements.py: {exc}"]
out["nvcc"] = first_line(["nvcc", "--version"]) if shutil.which("nvcc") else None
out["driver"] = (first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
                 if shutil.which("nvidia-smi") else None)
print(json.dumps(out))
"""

INFO = r"""
import json, pyvq
print(json.dumps(pyvq.info()))
"""


class UsageError(Exception):
    """A bad command line: main() prints it as one line and exits 2."""


@dataclass
class Stage:
    """One time-boxed subprocess: how it ended."""

    name: str
    cmd: list
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    skipped: str | None = None  # why it did not run
    log: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is None and not self.timed_out and self.rc == 0

    def status(self) -> str:
        if self.skipped is not None:
            return f"not run ({self.skipped})"
        if self.timed_out:
            return f"timed out after {self.seconds:.0f} s"
        return "ok" if self.rc == 0 else f"failed (exit status {self.rc})"


@dataclass
class TestCounts:
    passed: int = 0
    failed: int = 0
    errors: int = 0
    skipped: int = 0
    failing: list = field(default_factory=list)  # [(test id, first line of the message)]
    skip_reasons: dict = field(default_factory=dict)  # reason -> count
    source: str = ""  # "junit" or "log"

    @property
    def total(self) -> int:
        return self.passed + self.failed + self.errors + self.skipped


# ---------------------------------------------------------------- arguments


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", help="folder for the report and logs (created if missing)")
    p.add_argument("--out", dest="out_opt", help="the same, as an option")
    p.add_argument("--budget-s", type=float, default=560.0, help="seconds for all stages together (default 560)")
    p.add_argument("--build-timeout-s", type=float, default=480.0, help="most seconds of the build (default 480)")
    p.add_argument("--tests-timeout-s", type=float, default=200.0, help="most seconds of the tests")
    p.add_argument("--python", default=sys.executable, help="the Python (and torch) to build and run with")
    p.add_argument("--skip-build", action="store_true", help="use the pyvq/_C built by an earlier run")
    p.add_argument("--tests", choices=("cuda", "ops"), default="cuda",
                   help="cuda: the CUDA cases (default); ops: all of tests/ops and tests/test_info.py")
    p.add_argument("--benchmarks", default=",".join(b[0] for b in BENCHMARKS),
                   help="comma-separated subset of " + ",".join(b[0] for b in BENCHMARKS) + " ('' for none)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave torch.compile(reference) out of the benchmarks (saves compile time)")
    p.add_argument("--require-cuda", action="store_true",
                   help=f"exit {EXIT_NO_CUDA} instead of {EXIT_OK} when there is no CUDA device")
    args = p.parse_args(argv)
    if args.out and args.out_opt and args.out != args.out_opt:
        raise UsageError(f"OUT given twice with different folders: {args.out!r} and {args.out_opt!r}")
    args.out = args.out or args.out_opt
    if not args.out:
        raise UsageError("OUT is required: the folder the report goes to "
                         "(python3 tools/gpu_check.py OUT, or make gpu-check OUT=<folder>)")
    known = {b[0] for b in BENCHMARKS}
    args.benchmarks = [b for b in args.benchmarks.split(",") if b]
    unknown = [b for b in args.benchmarks if b not in known]
    if unknown:
        raise UsageError(f"--benchmarks: unknown {', '.join(unknown)}; expected a subset of {', '.join(sorted(known))}")
    if args.budget_s <= REPORT_RESERVE_S:
        raise UsageError(f"--budget-s must be more than {REPORT_RESERVE_S:.0f} seconds, got {args.budget_s:g}")
    return args


def prepare_out(path: str) -> str:
    """The absolute, writable folder ``path`` (created if missing), or UsageError."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"OUT must be a folder, got a file: {path}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"OUT {path}: cannot create the folder ({exc.strerror})") from None
    probe = os.path.join(path, ".gpu_check_write_test")
    try:
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"OUT {path}: folder is not writable ({exc.strerror})") from None
    return path


# ---------------------------------------------------------------- stages


def run_stage(stage: Stage, *, env: dict, log_path: str, timeout_s: float, cwd: str = ROOT,
              append: bool = False) -> Stage:
    """Run ``stage.cmd`` with its output in ``log_path``; kill its whole
    process group after ``timeout_s`` (ninja's and pytest's children too)."""
    stage.log = log_path
    if timeout_s <= 0:
        stage.skipped = "no time left in the budget"
        return stage
    with open(log_path, "a" if append else "w") as log:
        log.write(f"$ {' '.join(stage.cmd)}\n")
        log.flush()
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(stage.cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.write(f"cannot start: {exc}\n")
            stage.rc, stage.seconds = 127, 0.0
            return stage
        try:
            stage.rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stage.timed_out = True
            _kill_group(proc)
        stage.seconds = time.monotonic() - t0
        log.write(f"\n[gpu_check] {stage.name}: {stage.status()} ({stage.seconds:.1f} s)\n")
    print(f"[gpu_check] {stage.name}: {stage.status()} ({stage.seconds:.0f} s)", flush=True)
    return stage


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_json(python: str, code: str, env: dict, timeout_s: float = 120.0) -> tuple[dict | None, str]:
    """``python -c code`` printing one JSON line: (the dict or None, error text)."""
    try:
        p = subprocess.run([python, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        return None, (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
    return json.loads(lines[-1]), ""


def link_triton_kernels(root: str) -> str | None:
    """Make ``pyvq.triton_kernels`` importable from a source tree.

    setup.py installs ``triton_kernels/`` as ``pyvq.triton_kernels``
    (``package_dir``), which an in-place build on ``PYTHONPATH`` does not:
    there ``import pyvq.triton_kernels`` fails and the attention ops' Triton
    path with it (or, beside an editable install of another checkout, finds
    that checkout's kernels). A link ``pyvq/triton_kernels ->
    ../triton_kernels`` stands in for the install; returns its path, or None
    where ``pyvq/triton_kernels`` already exists. ``unlink_triton_kernels``
    removes it."""
    link = os.path.join(root, "pyvq", "triton_kernels")
    if os.path.lexists(link) or not os.path.isdir(os.path.join(root, "triton_kernels")):
        return None
    os.symlink(os.path.join("..", "triton_kernels"), link)
    return link


def unlink_triton_kernels(link: str | None) -> None:
    if link and os.path.islink(link):
        os.remove(link)


def cuda_arch_list(gpus: list) -> str:
    """TORCH_CUDA_ARCH_LIST for these devices: their capabilities, each once."""
    archs = sorted({g["capability"] for g in gpus}, key=lambda c: tuple(int(x) for x in c.split(".")))
    return ";".join(archs)


def child_env(base: dict | None = None, **extra) -> dict:
    """The environment of every stage: this tree first on the path (the
    in-place build, not an installed pyvq), unbuffered output, Triton
    compiling for the GPU (never its interpreter)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["TRITON_INTERPRET"] = "0"
    env.pop("PYVQ_BACKEND", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def pytest_command(python: str, junit: str, selection: str, modules: dict, cpus: int) -> list:
    cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEs", f"--junitxml={junit}",
           "-o", "junit_family=xunit2"]
    paths = list(TEST_PATHS)
    if os.path.exists(os.path.join(ROOT, "tests", "ops", "test_no_host_sync.py")):
        paths.append("tests/ops/test_no_host_sync.py")
    if selection == "cuda":
        cmd += ["-k", TEST_KEYWORDS]
    if modules.get("pytest_timeout"):
        cmd += ["--timeout", "120"]  # a hung test fails alone instead of eating the stage
    if modules.get("xdist") and cpus > 2:
        cmd += ["-n", str(min(8, cpus // 2))]  # Triton's compiles run in parallel workers
    return cmd + paths


# ---------------------------------------------------------------- parsing


def parse_junit(path: str) -> TestCounts | None:
    """Counts, failing ids and skip reasons from a junit XML file, or None
    where it is missing or unreadable (pytest was killed)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = TestCounts(source="junit")
    for case in root.iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        test_id = _junit_id(cls, name, case.get("file"))
        outcome = None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child
                break
        if outcome is None:
            counts.passed += 1
        elif outcome.tag == "skipped":
            counts.skipped += 1
            reason = _skip_reason(outcome.get("message") or outcome.text or "")
            counts.skip_reasons[reason] = counts.skip_reasons.get(reason, 0) + 1
        else:
            if outcome.tag == "failure":
                counts.failed += 1
            else:
                counts.errors += 1
            message = (outcome.get("message") or outcome.text or "").strip().splitlines()
            counts.failing.append((test_id, message[0][:300] if message else outcome.tag))
    return counts


def _junit_id(classname: str, name: str, file: str | None) -> str:
    """``tests/ops/test_x.py::Class::test_name[param]`` from junit's dotted classname."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        candidate = os.path.join(*parts[:i]) + ".py"
        if os.path.exists(os.path.join(ROOT, candidate)) or (file and file.endswith(candidate)):
            return "::".join([candidate, *parts[i:], name])
    return f"{classname}::{name}" if classname else name


def _skip_reason(message: str) -> str:
    # pytest writes "Skipped: <reason>" or "<file>:<line>: <reason>"
    message = message.strip().splitlines()[0] if message.strip() else "(no reason given)"
    message = re.sub(r"^Skipped:\s*", "", message)
    return message[:200]


_LOG_LINE = re.compile(r"^(?:\[gw\d+\]\s+\[\s*\d+%\]\s+)?(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+"
                       r"(?P<id>\S+::\S+)|^(?P<id2>\S+::\S+)\s+(?P<outcome2>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def parse_pytest_log(text: str) -> TestCounts:
    """Counts from pytest's verbose log (``-v``; with or without xdist):
    what a killed run got through."""
    counts = TestCounts(source="log")
    seen = {}
    for line in text.splitlines():
        m = _LOG_LINE.match(line.strip())
        if not m:
            continue
        outcome = m.group("outcome") or m.group("outcome2")
        test_id = m.group("id") or m.group("id2")
        if outcome == "ERROR" and seen.get(test_id) in ("PASSED", "FAILED"):
            outcome = "ERROR"  # an error in teardown after the call's outcome
        seen[test_id] = outcome
    for test_id, outcome in seen.items():
        if outcome in ("PASSED", "XPASS"):
            counts.passed += 1
        elif outcome in ("SKIPPED", "XFAIL"):
            counts.skipped += 1
        elif outcome == "FAILED":
            counts.failed += 1
            counts.failing.append((test_id, "see tests.log"))
        else:
            counts.errors += 1
            counts.failing.append((test_id, "see tests.log"))
    return counts


def slowest_compiles(build_dir: str, n: int = 6) -> list:
    """[(object file, seconds)] of the ``n`` longest compiles in the ninja
    logs under ``build_dir`` (``.ninja_log`` v5: start ms, end ms, mtime,
    output, hash), the newest entry per output."""
    latest = {}
    for path in glob.glob(os.path.join(build_dir, "**", ".ninja_log"), recursive=True):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split("\t")
            if len(parts) < 4 or not parts[0].isdigit() or not parts[1].isdigit():
                continue
            latest[os.path.relpath(parts[3], build_dir)] = (int(parts[1]) - int(parts[0])) / 1000.0
    return sorted(latest.items(), key=lambda kv: -kv[1])[:n]


def collect_benchmark_tables(folder: str) -> list:
    """Every table JSON a benchmark wrote under ``folder``, in file order."""
    tables = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(payload, dict) and isinstance(payload.get("rows"), list):
            payload["file"] = os.path.basename(path)
            tables.append(payload)
    return tables


# ---------------------------------------------------------------- the report


def _cell(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if v is None:
        return "-"
    return str(v).replace("|", "\\|")


def markdown_table(rows: list) -> str:
    """Rows (dicts) as a markdown table, columns in first-seen order."""
    if not rows:
        return "(no rows)\n"
    columns = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_report(summary: dict) -> str:
    """report.md from the summary dict main() builds (and saves as summary.json)."""
    env = summary.get("machine") or {}
    out = ["# pyvq GPU check", "", f"{summary.get('started', '')}, commit {summary.get('commit') or 'unknown'}; "
           f"result: **{summary.get('result', '?')}** (exit status {summary.get('exit_status')})", ""]
    if summary.get("no_cuda"):
        out += [f"**{NO_CUDA_LINE}.** {summary['no_cuda']}", ""]
    out += ["## Machine", ""]
    gpus = env.get("gpus") or []
    out.append("- GPU: " + ("; ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in gpus)
                            if gpus else "none visible"))
    out.append(f"- driver {env.get('driver') or '?'}; nvcc: {env.get('nvcc') or 'not found'}")
    out.append(f"- {env.get('cpus', '?')} CPUs; Python {env.get('python', '?')} ({env.get('executable', '?')})")
    out.append(f"- torch {env.get('torch', env.get('torch_error', '?'))} (CUDA {env.get('torch_cuda')}), "
               f"Triton {env.get('triton') or env.get('triton_error', 'absent')}")
    for problem in env.get("floor_problems") or []:
        out.append(f"- **{problem}**")
    if summary.get("probe_error"):
        out.append(f"- **{summary['probe_error']}**")
    out.append("")
    stages = summary.get("stages", {})
    build = stages.get("build")
    if build:
        out += ["## Build", "", f"- {build['status']}, {build['seconds']:.0f} s; "
                f"TORCH_CUDA_ARCH_LIST={summary.get('arch_list')}, MAX_JOBS={summary.get('max_jobs')} (build.log)"]
        info = summary.get("pyvq_info")
        if info:
            cuda_ops = [op for op, v in info.get("ops", {}).items() if v.get("cuda")]
            triton_ops = [op for op, v in info.get("ops", {}).items() if v.get("triton")]
            if summary.get("triton_kernels_link"):
                out.append("- linked pyvq/triton_kernels -> ../triton_kernels for this run (what the install "
                           "does), removed at the end")
            out.append(f"- pyvq.info(): built_with_cuda={info.get('built_with_cuda')}, "
                       f"cuda_archs={info.get('cuda_archs') or '-'}; CUDA kernels: {', '.join(cuda_ops) or 'none'}; "
                       f"Triton kernels: {', '.join(triton_ops) or 'none'}; Triton interpreted: "
                       f"{info.get('triton', {}).get('interpreted')}")
        elif summary.get("pyvq_info_error"):
            out.append(f"- import pyvq failed: {summary['pyvq_info_error']}")
        if summary.get("slowest_compiles"):
            out.append("- slowest compiles: " + ", ".join(f"{os.path.basename(o)} {s:.0f} s"
                                                          for o, s in summary["slowest_compiles"]))
        for line in summary.get("build_tail", []):
            out.append(f"    {line}")
        out.append("")
    tests = stages.get("tests")
    if tests:
        c = summary.get("test_counts") or {}
        out += ["## Tests", "", f"- {tests['status']}, {tests['seconds']:.0f} s; selection: "
                f"{summary.get('test_selection')}"]
        if c:
            out.append(f"- **{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped** "
                       f"(from {c['source']}; tests.log, junit.xml)")
            for test_id, message in c.get("failing", []):
                out.append(f"  - FAIL `{test_id}`: {message}")
            if c.get("skip_reasons"):
                out.append("- skip reasons:")
                for reason, n in sorted(c["skip_reasons"].items(), key=lambda kv: -kv[1]):
                    out.append(f"  - {n} x {reason}")
        out.append("")
    benches = summary.get("benchmarks", {})
    if benches:
        out += ["## Benchmarks", "", "`--quick --device cuda`" + (", no torch.compile column"
                                                                  if summary.get("no_compile") else "")
                + "; medians, raw output in benchmarks.log, data in benchmarks.json", ""]
        for name, b in benches.items():
            out.append(f"- {name}: {b['status']}, {b['seconds']:.0f} s")
        out.append("")
        for table in summary.get("benchmark_tables", []):
            out += [f"### {table.get('title', table.get('file'))}", "", markdown_table(table.get("rows", []))]
        for name, b in benches.items():
            if b.get("tail"):
                out += [f"### {name}: {b['status']}, the end of its output", "", "```", *b["tail"], "```", ""]
    out += ["## Files", "", ", ".join(summary.get("files", [])), ""]
    return "\n".join(out)


def write_report(out_dir: str, summary: dict) -> None:
    summary["files"] = sorted(set(os.listdir(out_dir)) | {"report.md", "summary.json"})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render_report(summary))


def _tail(path: str, n: int = 25) -> list:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n")[:300] for line in f.readlines()[-n:]]
    except OSError:
        return []


def _commit() -> str | None:
    try:
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                           timeout=10)
        return p.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        out_dir = prepare_out(args.out)
    except UsageError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    deadline = time.monotonic() + args.budget_s - REPORT_RESERVE_S
    for name in OUT_FILES:  # nothing stale from an earlier run may pass for this one's
        try:
            os.remove(os.path.join(out_dir, name))
        except FileNotFoundError:
            pass

    def left() -> float:
        return deadline - time.monotonic()

    summary = {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "commit": _commit(), "budget_s": args.budget_s, "stages": {}, "no_compile": args.no_compile}
    try:
        status = run_all(args, out_dir, summary, left, lambda: link_triton_kernels(ROOT))
    finally:
        unlink_triton_kernels(summary.get("triton_kernels_link"))
    summary["exit_status"] = status
    summary["result"] = {EXIT_OK: "passed" if not summary.get("no_cuda") else NO_CUDA_LINE,
                         EXIT_FAILED: "FAILED", EXIT_NO_CUDA: NO_CUDA_LINE,
                         EXIT_BENCH_FAILED: "tests passed, benchmarks incomplete"}[status]
    write_report(out_dir, summary)
    print(f"gpu_check: {summary['result']}; report in {os.path.join(out_dir, 'report.md')}")
    return status


def run_all(args, out_dir: str, summary: dict, left, link_kernels) -> int:
    env = child_env()
    machine, error = run_json(args.python, PROBE, env)
    if machine is None:
        summary["machine"] = {"torch_error": error}
        summary["probe_error"] = f"{args.python} could not report the machine: {error}"
        return EXIT_FAILED
    summary["machine"] = machine
    gpus = ", ".join(g["name"] for g in machine.get("gpus", [])) or "no GPU"
    print(f"[gpu_check] {gpus}; torch {machine.get('torch')}, triton {machine.get('triton')}, "
          f"{machine.get('cpus')} CPUs", flush=True)
    if "torch_error" in machine:
        summary["probe_error"] = f"torch does not import: {machine['torch_error']}"
        return EXIT_FAILED
    if not machine.get("cuda_available"):
        summary["no_cuda"] = (f"torch {machine['torch']} (CUDA {machine.get('torch_cuda')}) sees no CUDA device; "
                              "no build, tests or benchmarks were run.")
        return EXIT_NO_CUDA if args.require_cuda else EXIT_OK

    # build
    summary["arch_list"] = cuda_arch_list(machine["gpus"])
    summary["max_jobs"] = machine["cpus"]
    build_log = os.path.join(out_dir, "build.log")
    build = Stage("build", [args.python, "setup.py", "build_ext", "--inplace"])
    if args.skip_build:
        build.skipped = "--skip-build"
    else:
        run_stage(build, env=child_env(env, PYVQ_WITH_CUDA=1, TORCH_CUDA_ARCH_LIST=summary["arch_list"],
                                       MAX_JOBS=summary["max_jobs"]),
                  log_path=build_log, timeout_s=min(args.build_timeout_s, left()))
    summary["stages"]["build"] = {**asdict(build), "status": build.status()}
    summary["slowest_compiles"] = slowest_compiles(os.path.join(ROOT, "build"))
    if not build.ok and not args.skip_build:
        summary["build_tail"] = _tail(build_log)
        return EXIT_FAILED
    summary["triton_kernels_link"] = link_kernels()
    info, error = run_json(args.python, INFO, env)
    summary["pyvq_info"], summary["pyvq_info_error"] = info, error or None
    problem = None
    if info is not None:
        if not info.get("built_with_cuda"):
            problem = "pyvq was not built with CUDA"
        elif info.get("triton", {}).get("interpreted"):
            problem = "Triton is interpreted"
        elif machine.get("triton") and not any(v.get("triton") for v in info.get("ops", {}).values()):
            problem = "Triton is installed but pyvq.triton_kernels is not importable"
    if info is None or problem:
        summary["build_tail"] = _tail(build_log) if info is None else [problem]
        return EXIT_FAILED

    # tests
    junit = os.path.join(out_dir, "junit.xml")
    tests_log = os.path.join(out_dir, "tests.log")
    cmd = pytest_command(args.python, junit, args.tests, machine.get("modules", {}), machine["cpus"])
    summary["test_selection"] = " ".join(cmd[cmd.index("-v"):])
    if os.path.exists(junit):
        os.remove(junit)
    tests = run_stage(Stage("tests", cmd), env=child_env(env, PYVQ_WITH_CUDA=1), log_path=tests_log,
                      timeout_s=min(args.tests_timeout_s, left() - BENCH_RESERVE_S * bool(args.benchmarks)))
    summary["stages"]["tests"] = {**asdict(tests), "status": tests.status()}
    counts = parse_junit(junit) if not tests.timed_out else None
    if counts is None:
        try:
            with open(tests_log, errors="replace") as f:
                counts = parse_pytest_log(f.read())
        except OSError:
            counts = TestCounts(source="log")
    summary["test_counts"] = asdict(counts)
    tests_ok = tests.ok and counts.failed == 0 and counts.errors == 0 and counts.passed > 0

    # benchmarks
    bench_ok = run_benchmarks(args, out_dir, summary, env, left)
    if not tests_ok:
        return EXIT_FAILED
    return EXIT_OK if bench_ok else EXIT_BENCH_FAILED


def run_benchmarks(args, out_dir: str, summary: dict, env: dict, left) -> bool:
    log_path = os.path.join(out_dir, "benchmarks.log")
    open(log_path, "w").close()
    summary["benchmarks"] = {}
    wanted = [b for b in BENCHMARKS if b[0] in args.benchmarks]
    ok = True
    with tempfile.TemporaryDirectory(prefix="pyvq-gpu-bench-") as results:
        for i, (name, script, extra, no_compile) in enumerate(wanted):
            cmd = [args.python, script, "--quick", "--device", "cuda", "--out", os.path.join(results, f"{name}.json"),
                   *extra, *(no_compile if args.no_compile else ())]
            share = left() / (len(wanted) - i)  # an even share of what is left
            start = os.path.getsize(log_path)
            stage = run_stage(Stage(name, cmd), env=env, log_path=log_path, timeout_s=share, append=True)
            summary["benchmarks"][name] = {"status": stage.status(), "seconds": stage.seconds, "cmd": cmd}
            if not stage.ok:  # its printed rows are all there is (tables are saved at the end)
                with open(log_path, errors="replace") as f:
                    f.seek(start)
                    summary["benchmarks"][name]["tail"] = f.read().splitlines()[-40:]
            ok = ok and stage.ok
        tables = collect_benchmark_tables(results)
    summary["benchmark_tables"] = tables
    with open(os.path.join(out_dir, "benchmarks.json"), "w") as f:
        json.dump(tables, f, indent=1)
    return ok


if __name__ == "__main__":
    sys.exit(main())
