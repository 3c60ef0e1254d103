# Quorum: two commands for a newcomer.
#   make demo   train, export, evaluate and serve a 256-M-4-H λ=0.99 ensemble (idempotent)
#   make test   lint, type-check, the whole test suite, and the serving tests without torch
# And while working:
#   make test-fast      the fast tier: no training, no processes (about a minute on 2 cores)
#   make test-serving   runtime and server tests in a venv with ONNX Runtime's CPU wheel and no torch (an edge device)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
PORT ?= 8000
EPOCHS ?= 10
DATA_DIR ?= $(or $(QUORUM_DATA_DIR),/usr/share/datasets/fashion-mnist)

# ONNX Runtime's wheel (an extra of the package): gpu where an NVIDIA driver is present, else cpu.
# `make setup ORT=cpu` chooses. The two wheels install the same module: one replaces the other.
ORT ?= $(if $(wildcard /proc/driver/nvidia/version),gpu,cpu)
ORT_WHEEL = $(if $(filter gpu,$(1)),onnxruntime-gpu,onnxruntime)
ORT_OTHER = $(if $(filter gpu,$(1)),onnxruntime,onnxruntime-gpu)

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# $(call only_ort,PYTHON,cpu|gpu): uninstall the other ONNX Runtime wheel, and this one with it (they
# share files), so that the install that follows puts this one back whole.
define only_ort
	@if $(1) -m pip show -q $(call ORT_OTHER,$(2)) 2>/dev/null; then \
		$(1) -m pip uninstall -y -q $(call ORT_OTHER,$(2)) $(call ORT_WHEEL,$(2)); fi
endef

.PHONY: help setup data demo test test-fast test-serving lint typecheck pytest clean

help:
	@sed -n 's/^#  *make /make /p' Makefile

# Re-install when the pinned dependencies change.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(call only_ort,$(BIN)/python,$(ORT))
	$(BIN)/python -m pip install --quiet -e '.[$(ORT),train,dev]'
	@touch $@

setup: $(STAMP) data

data:
	@scripts/install-dataset.sh "$(DATA_DIR)"

demo: setup
	$(BIN)/quorum demo --epochs $(EPOCHS) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow setuptools' package-dir mapping; give it the installed layout as links.
typecheck: $(STAMP)
	@rm -rf build/typecheck && mkdir -p build/typecheck/quorum
	@for f in quorum/*.py; do ln -s ../../../$$f build/typecheck/quorum/; done
	@for d in core trainer exporter runtime server experiments; do ln -s ../../../$$d build/typecheck/quorum/$$d; done
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest --durations=15

# 40 generated requests per property test and 6 per schema operation (CI's full run: 150 and 25)
test-fast: setup
	QUORUM_FUZZ_EXAMPLES=40 $(BIN)/pytest -m "not slow"

# The serving side alone, as an edge device installs it: `pip install -e '.[cpu,dev]'` brings the CPU
# wheel of ONNX Runtime and no torch; the tests prove the runtime and the server need nothing more
# (tests/server/test_install.py serves a bundle from a real process and checks the wheel).
test-serving: data
	@test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(call only_ort,$(SERVE_VENV)/bin/python,cpu)
	$(SERVE_VENV)/bin/python -m pip install --quiet -e '.[cpu,dev]'
	@if $(SERVE_VENV)/bin/python -c 'import torch' 2>/dev/null; then echo "torch is installed in $(SERVE_VENV)"; exit 1; fi
	QUORUM_SERVING_INSTALL=cpu $(SERVE_VENV)/bin/pytest -p no:cacheprovider tests/core tests/runtime tests/server tests/test_layers.py

test: lint typecheck pytest test-serving

clean:
	rm -rf build .pytest_cache .ruff_cache .mypy_cache $(SERVE_VENV)
