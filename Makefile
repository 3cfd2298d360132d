# The README's commands. `make test` and `make demo` do all set-up on a fresh machine: a virtual
# environment with pinned dependencies, the package built in place, then the run.
# On a machine whose Python already has torch (a GPU machine, no network): make test PYTHON=python3
SHELL := /bin/bash
.DEFAULT_GOAL := test

TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton
# One virtual environment per torch spec (.venv-torch-2.13.0, .venv-torch-2.14.1, ...), so that
# `make test TORCH_SPEC=...` gets that torch and switching back reinstalls nothing.
empty :=
space := $(empty) $(empty)
VENV ?= .venv-$(subst ==,-,$(subst $(space),,$(TORCH_SPEC)))
FUSEDOPT_BUILD_EXT ?= auto
export FUSEDOPT_BUILD_EXT

ifdef PYTHON
PY := $(PYTHON)
SETUP_STAMP := build/.setup-external
else
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.setup-done
endif
# The extension is built in place (fusedopt/_C*.so) for one interpreter at a time; the stamp
# names it, and another interpreter rebuilds.
BUILD_STAMP := build/.built
ifneq ($(shell cat $(BUILD_STAMP) 2>/dev/null),$(PY))
.PHONY: $(BUILD_STAMP)
endif
SOURCES := $(wildcard setup.py pyproject.toml csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: test demo bench setup build clean
# The demo's and the benchmarks' own dependencies (plots, progress bars, the regression suite).
DEMO_DEPS := matplotlib tqdm pytest-benchmark

$(VENV)/.setup-done:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet "$(TRITON_SPEC)" ninja setuptools wheel pytest numpy expecttest lion-pytorch \
		$(DEMO_DEPS)
	touch $@

# An interpreter that brings its own torch: use what it has, install nothing (there may be no network).
build/.setup-external:
	mkdir -p build
	$(PY) -c "import torch, pytest; print('using torch', torch.__version__, 'from', torch.__file__)"
	touch $@

setup: $(SETUP_STAMP)

$(BUILD_STAMP): $(SETUP_STAMP) $(SOURCES)
	mkdir -p build
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	echo "$(PY)" > $@

build: $(BUILD_STAMP)

# Two pytest runs: Triton's interpreter must be switched on before triton is first imported.
test: build
	$(PY) -m pytest tests -q -m "not interpret"
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -m interpret
	@# bench/'s tests: the demo at a toy size, and the benchmark suite with each case run once
	@# (it times nothing here).
	@if $(PY) -c "import pytest_benchmark, matplotlib, tqdm" 2>/dev/null; then \
		$(PY) -m pytest bench -q --benchmark-disable; \
	else echo "this interpreter lacks $(DEMO_DEPS): bench/ not tested"; fi

# Peers measured by the benchmark when they install (DeepSpeed's CPU Adam, optimi's and
# pytorch-optimizer's Lion); best effort, and never with PYTHON= (that interpreter may have no
# network).
$(VENV)/.bench-peers: $(VENV)/.setup-done
	for peer in deepspeed torch-optimi pytorch_optimizer; do \
		$(VENV)/bin/pip install --quiet "$$peer" "$(TORCH_SPEC)" || \
			echo "$$peer did not install: not benchmarked"; \
	done
	touch $@
build/.bench-peers-external:
	mkdir -p build && touch $@
BENCH_STAMP := $(if $(PYTHON),build/.bench-peers-external,$(VENV)/.bench-peers)

# The set-up installs them too (make test runs bench/'s tests); this covers an older set-up.
$(VENV)/.demo-deps: $(VENV)/.setup-done
	$(VENV)/bin/pip install --quiet $(DEMO_DEPS) "$(TORCH_SPEC)"
	touch $@
build/.demo-deps-external:
	mkdir -p build
	$(PY) -c "import matplotlib, tqdm, pytest_benchmark" || \
		{ echo "make demo PYTHON=...: that interpreter needs $(DEMO_DEPS)"; exit 1; }
	touch $@
DEMO_STAMP := $(if $(PYTHON),build/.demo-deps-external,$(VENV)/.demo-deps)

# The main job: a small language model trained with each optimizer (bench/demo.py), its table
# and plots under bench/results/<machine>/.
demo: build $(DEMO_STAMP)
	$(PY) bench/demo.py

# Every kernel benchmark (python -m bench): tables and charts under bench/results/<machine>/.
bench: build $(DEMO_STAMP) $(BENCH_STAMP)
	$(PY) -m bench

clean:
	rm -rf build *.egg-info fusedopt/_C*.so
