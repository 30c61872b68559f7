# The two commands of the README:
#   make demo   set everything up from a fresh clone and run the main job
#               (train a tiny VQGAN, evaluate, ReFiT, write runs/demo/report.md)
#   make test   set everything up and run the whole test suite
#   make demo-inpaint   (after or including the demo) the Asymmetric VQGAN job
# Both create .venv with the pinned requirements, then build pyvq in place.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# Architectures of the CUDA kernels; `make test` builds one to stay quick.
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: demo demo-inpaint test install venv bench clean gpu-check sanitize

$(VENV)/.requirements: requirements.txt requirements-bench.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (torch==2.14.1 wheels are for Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade-strategy only-if-needed -r requirements.txt -r requirements-bench.txt
	touch $@

venv: $(VENV)/.requirements

# Editable, in-place build: ninja recompiles only what changed.
install: venv
	TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" $(PY) -m pip install --no-build-isolation --no-deps -e .

test: export PYVQ_WITH_CUDA = 1
test: TORCH_CUDA_ARCH_LIST = 9.0
test: install
	$(PY) -m pytest -q

# ASan + UBSan (with leak detection) over the C++ ops' CPU tests: builds
# csrc/ with CMake (PYVQ_SANITIZE=ON) into build-sanitize/ and runs the tests
# against that library instead of pyvq._C (tools/sanitize/run.py). Needs only
# the venv, not `make install`. SANITIZE_TESTS: the C++ ops' test files, not
# their Triton ones (interpreted Triton is numpy code, not pyvq's) nor
# test_kmeans.py (Python over nearest_code, whose kernel test_codebook.py
# covers; its statistical tests were the slowest under ASan). Left out:
# the torch.compile tests (inductor's C++ compile dominates and adds no pyvq
# code path the eager tests miss) and the two tests asserting that the
# generic and AVX-512 builds of a loop round differently, which holds for
# the -O3 build only (at -O1 GCC does not auto-vectorize, so both builds
# give the same bits).
CMAKE ?= cmake
SANITIZE_BUILD ?= build-sanitize
SANITIZE_TESTS ?= tests/ops/test_codebook.py tests/ops/test_grid.py tests/ops/test_posterior.py \
	tests/ops/test_window_attention.py tests/ops/test_multigrained_attention.py
SANITIZE_PYTEST ?= -q -p no:cacheprovider -k "not compile" \
	--deselect tests/ops/test_posterior.py::test_cpu_isa_generic_reaches_the_posterior \
	--deselect tests/ops/test_multigrained_attention.py::test_generic_build_is_reached
sanitize: venv
	@command -v $(CMAKE) >/dev/null || { echo "sanitize: need $(CMAKE) (3.18 or newer; set CMAKE=...)"; exit 1; }
	@mkdir -p $(SANITIZE_BUILD) && rm -rf $(SANITIZE_BUILD)/reports
	@start=$$(date +%s); \
	$(CMAKE) -S . -B $(SANITIZE_BUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
	  -DPYVQ_PYTHON=$(abspath $(PY)) -DPYVQ_SANITIZE=ON -DPYVQ_WITH_CUDA=OFF >$(SANITIZE_BUILD)/build.log 2>&1 \
	  && $(CMAKE) --build $(SANITIZE_BUILD) --parallel $(MAX_JOBS) >>$(SANITIZE_BUILD)/build.log 2>&1 \
	  || { tail -40 $(SANITIZE_BUILD)/build.log; echo "sanitize: the build failed (log: $(SANITIZE_BUILD)/build.log)"; exit 1; }; \
	built=$$(date +%s); echo "sanitize: build took $$((built - start)) s"; \
	$(PY) tools/sanitize/run.py --library $(SANITIZE_BUILD)/libpyvq_ops.so --report-dir $(SANITIZE_BUILD)/reports \
	  -- $(SANITIZE_TESTS) $(SANITIZE_PYTEST); rc=$$?; \
	echo "sanitize: build + tests took $$(($$(date +%s) - start)) s"; exit $$rc

demo: install
	$(VENV)/bin/pyvq info
	$(VENV)/bin/pyvq demo --out runs/demo

# Asymmetric VQGAN: a heavier, mask-conditioned decoder trained on the demo's
# frozen VQGAN, compared with the vanilla decoder (runs/demo-inpaint/report.md).
demo-inpaint: install
	test -d runs/demo/train/model || $(VENV)/bin/pyvq demo --out runs/demo
	$(VENV)/bin/pyvq demo-inpaint --base runs/demo/train --out runs/demo-inpaint

# Every benchmarks/bench_*.py, at full size.
bench: install
	@set -e; for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script; done

# On a GPU machine (no registry, its own torch): build pyvq in place with
# CUDA, run the CUDA tests and every op benchmark on CUDA tensors, write
# $(OUT)/report.md; within one 10-minute command (tools/gpu_check.py).
# Uses the machine's python, not .venv:  make gpu-check OUT=/tmp/gc
gpu-check: PYTHON = python3
gpu-check:
	$(PYTHON) tools/gpu_check.py --out "$(OUT)" $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info pyvq/_C*.so $(SANITIZE_BUILD)
