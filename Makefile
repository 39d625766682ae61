# One entry point for a fresh machine: `make demo` and `make test` set everything up first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench lint

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU build of torch first: a bare range could pull a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python examples/quickstart.py

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"  # pykeops, a peer in the table
	$(BIN)/python benchmarks/run.py

lint: setup
	$(BIN)/python -m pip install --quiet ruff && $(BIN)/ruff check itdsl tests examples benchmarks
