# The two commands a fresh machine needs: `make demo` and `make test` (each creates .venv if missing).
# On a GPU machine with its own torch (and no network): `make gpu-check PYTHON=python3`.

SHELL := /bin/bash
VENV := .venv
PYTHON ?= $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
PYTEST_ARGS ?=

# Reuse compiled objects across clones and rebuilds when ccache is installed (CI builds in a fresh clone).
# (ccache's compiler links go first on PATH: torch checks the compiler named in CXX, so no CXX="ccache g++".)
ifneq ($(wildcard /usr/lib/ccache/c++),)
export PATH := /usr/lib/ccache:$(PATH)
export PYTORCH_NVCC := ccache nvcc
export CCACHE_BASEDIR := $(CURDIR)
export CCACHE_NOHASHDIR := 1
export CCACHE_SLOPPINESS := include_file_mtime,include_file_ctime,time_macros
endif

.PHONY: help deps build test demo gpu-check bench info clean diffusers-tests

help:
	@echo "make test       create .venv, build (CPU + CUDA kernels when nvcc exists), run the test suite"
	@echo "make demo       create .venv, build, generate a video from the bundled image"
	@echo "make bench      run every benchmark on this machine (results in benchmarks/results/)"
	@echo "make gpu-check  on a GPU machine, <= 8 min: build, needs_cuda tests, sanitizer smoke, every benchmark, summary"
	@echo "                (PYTHON=python3 to use its torch; GPU_CHECK_ARGS=--dry-run on a CPU machine; tools/gpu_check.py)"
	@echo "make info       backends, versions, build flags"
	@echo "make diffusers-tests DIFFUSERS_SRC=/path/to/diffusers"
	@echo "                diffusers' own model tests unpatched and patched, compared (tools/diffusers_upstream_tests.py)"

# The venv only when PYTHON is the venv's own interpreter; an outside PYTHON is used as it is.
ifeq ($(PYTHON),$(VENV)/bin/python)
deps: $(VENV)/.deps
else
deps:
	@$(PYTHON) -c "import torch; print('using', torch.__file__, torch.__version__)"
endif

$(VENV)/.deps: pyproject.toml Makefile
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)" numpy einops pytest ninja pybind11 "setuptools>=64" wheel \
	  "diffusers>=0.33,<0.43" "transformers>=4.46,<6" ftfy pillow av safetensors tqdm
	touch $@

build: deps
	set -o pipefail; $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	@$(PYTHON) -c "import i2v_kernels._C" || { echo "build failed: i2v_kernels._C does not import" >&2; exit 1; }
	@$(PYTHON) -m i2v_kernels info

test: build
	$(PYTHON) -m pytest -q $(PYTEST_ARGS) tests

demo: build
	@$(PYTHON) -c "import i2v_model, sys; sys.exit(0 if i2v_model.BUNDLED else 1)" || { \
	  echo "make demo: the trained tiny weights (model/weights/tiny.safetensors) are not bundled yet; no video was made." >&2; \
	  echo "  make them with: $(PYTHON) -m i2v_model train --run runs/tiny && $(PYTHON) -m i2v_model train --run runs/tiny --export" >&2; exit 1; }
	$(PYTHON) -m i2v_model generate

BENCHES = $(basename $(notdir $(wildcard benchmarks/bench_*.py)))

bench: build
	@for b in $(BENCHES); do echo "== $$b"; $(PYTHON) -m benchmarks.$$b $(BENCH_ARGS) || exit 1; done

# tools/gpu_check.py builds with $(PYTHON) itself (pip install -e . for the visible GPU), so only deps here:
# a venv only when PYTHON is the venv's own interpreter. Stages, caps and outputs: python tools/gpu_check.py --help.
gpu-check: deps
	$(PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)

# diffusers' own tests of the models patch() knows, run unpatched then patched and compared; the report goes
# to docs/diffusers_upstream_tests.md. DIFFUSERS_SRC: a checkout of the diffusers repository (its tests are
# in neither wheel nor sdist). accelerate and psutil, which diffusers' test helpers import, are installed
# into build/ (pip --target), not into the venv. More options: DIFFUSERS_TESTS_ARGS="--help".
DIFFUSERS_SRC ?= $(I2V_DIFFUSERS_TESTS)
UPSTREAM_DEPS := build/diffusers-tests-deps

diffusers-tests: build
	@test -n "$(DIFFUSERS_SRC)" || { echo "make diffusers-tests: set DIFFUSERS_SRC=/path/to/diffusers" >&2; exit 2; }
	@$(PYTHON) -c "import accelerate, psutil" 2>/dev/null || test -d $(UPSTREAM_DEPS)/accelerate || \
	  $(PYTHON) -m pip install -q --target $(UPSTREAM_DEPS) --no-deps accelerate psutil
	$(PYTHON) tools/diffusers_upstream_tests.py --src "$(DIFFUSERS_SRC)" --deps "$(abspath $(UPSTREAM_DEPS))" \
	  $(DIFFUSERS_TESTS_ARGS)

info: build
	$(PYTHON) -m i2v_kernels info

clean:
	rm -rf build *.egg-info i2v_kernels/_C*.so i2v_kernels/_build_info.py
