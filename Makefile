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

.PHONY: demo demo-inpaint test install venv bench clean gpu-check

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
	rm -rf build *.egg-info pyvq/_C*.so
