# Quorum: two commands for a newcomer.
#   make demo   train, export, evaluate and serve a 256-M-4-H λ=0.99 ensemble (idempotent)
#   make test   lint, type-check and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8000
EPOCHS ?= 10
DATA_DIR ?= $(or $(QUORUM_DATA_DIR),/usr/share/datasets/fashion-mnist)

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help setup data demo test lint typecheck pytest clean

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
	$(BIN)/pytest

test: lint typecheck pytest

clean:
	rm -rf build .pytest_cache .ruff_cache .mypy_cache
