# Two commands do all the set-up on a fresh machine (only Python >= 3.10 needed):
#   make demo   — create .venv, install PyTorch and StepGuard's core, run `stepguard demo`
#   make test   — create .venv, install PyTorch and StepGuard with every extra, run the tests
# Both share .venv; each keeps its own stamp, so `make demo` never installs the test extras.
#
# PyTorch is installed first, as TORCH_SPEC from TORCH_INDEX_URL (empty: pip's own index),
# then StepGuard with TORCH_SPEC repeated so that pip keeps that build. A plain index
# serves the CUDA build on Linux x86_64 (several GB with its nvidia-* packages); for the
# CPU-only build:
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Another version: make test TORCH_SPEC='torch==2.5.1'

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
EXTRAS ?= all
PYTEST_ARGS ?=
DEMO_ARGS ?=

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet
CORE_STAMP := $(VENV)/.stepguard-core
EXTRAS_STAMP := $(VENV)/.stepguard-extras-$(EXTRAS)
INSTALL_TORCH := $(PIP) $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") "$(TORCH_SPEC)"

.PHONY: demo test lint docs venv clean

venv: $(EXTRAS_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(CORE_STAMP): pyproject.toml | $(BIN)/python
	$(INSTALL_TORCH)
	$(PIP) -e . "$(TORCH_SPEC)"
	touch $@

$(EXTRAS_STAMP): pyproject.toml | $(BIN)/python
	$(INSTALL_TORCH)
	$(PIP) -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $@

demo: $(CORE_STAMP)
	$(BIN)/stepguard demo $(DEMO_ARGS)

test: $(EXTRAS_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(EXTRAS_STAMP)
	$(BIN)/ruff check stepguard integrations tests examples

docs: $(EXTRAS_STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site runs .pytest_cache
