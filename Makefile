# Quorum: two commands for a newcomer.
#   make demo   train, export, evaluate and serve a 256-M-4-H λ=0.99 ensemble (idempotent)
#   make test   lint, type-check, the whole test suite, and the serving tests without torch
# And while working:
#   make test-fast      the fast tier: no training, no processes (well under a minute)
#   make test-serving   runtime and server tests in a venv without torch (what an edge device installs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
PORT ?= 8000
EPOCHS ?= 10
DATA_DIR ?= $(or $(QUORUM_DATA_DIR),/usr/share/datasets/fashion-mnist)

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help setup data demo test test-fast test-serving lint typecheck pytest clean

help:
	@sed -n 's/^#  *make /make /p' Makefile

# Re-install when the pinned dependencies change.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,dev]'
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

test-fast: setup
	$(BIN)/pytest -m "not slow"

# The serving side alone: `pip install -e .[dev]` brings no torch; the tests prove the runtime and
# the server need none.
test-serving: data
	@test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@if $(SERVE_VENV)/bin/python -c 'import torch' 2>/dev/null; then echo "torch is installed in $(SERVE_VENV)"; exit 1; fi
	$(SERVE_VENV)/bin/pytest -p no:cacheprovider tests/core tests/runtime tests/server tests/test_layers.py

test: lint typecheck pytest test-serving

clean:
	rm -rf build .pytest_cache .ruff_cache .mypy_cache $(SERVE_VENV)
