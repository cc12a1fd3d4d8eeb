# fogline — developer entry points.  `make help` lists them.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint format typecheck demo bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: ## create .venv and install fogline with its dev tools (keeps a torch you installed first)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"

test: ## run the whole test suite (starts its own broker and redis-server)
	$(BIN)/python -m pytest -q

test-fast: ## the suite without the slow quality/end-to-end checks
	$(BIN)/python -m pytest -q -m "not slow"

lint: ## ruff lint + format check and mypy; never edits files
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MAKE) --no-print-directory typecheck

# mypy cannot follow setuptools' package-dir mapping through the editable
# install, so it checks a tree of symlinks laid out as the installed `fogline`
# package (build/typecheck/fogline/{models,drift,daemon,replay_data,cli,bench}).
typecheck: ## mypy over the package as it installs (fogline.*)
	rm -rf build/typecheck && mkdir -p build/typecheck/fogline
	for f in fogline/*; do ln -s ../../../$$f build/typecheck/fogline/; done
	for d in models drift daemon replay_data; do ln -s ../../../$$d build/typecheck/fogline/$$d; done
	$(BIN)/mypy

format: ## apply ruff's formatter and autofixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: ## the embedded end-to-end demo: broker + redis + daemon, nothing started by hand
	$(BIN)/fogline demo

clean: ## remove build outputs (keeps .venv)
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache fogline-out
