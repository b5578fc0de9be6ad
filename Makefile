# Two commands do all the set-up on a fresh machine:
#   make demo   — create .venv, install StepGuard, run `stepguard demo`
#   make test   — create .venv, install StepGuard with every test extra, run the test suite
#
# TORCH_SPEC is installed first and kept pinned, so pip never swaps in a multi-GB CUDA
# build; override it for another build, e.g. `make test TORCH_SPEC='torch==2.5.1'`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all
PYTEST_ARGS ?=
DEMO_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.stepguard-$(EXTRAS)

.PHONY: demo test lint docs venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $@

demo: $(STAMP)
	$(BIN)/stepguard demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check stepguard integrations tests examples

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) site runs .pytest_cache
