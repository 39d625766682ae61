# One entry point for a fresh machine: `make demo` and `make test` set everything up first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-cuda bench inn itnet lint fuzz

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

# one pytest worker per core (pytest-xdist), at most four: the suite is mostly single-threaded
# analysis and TVM compiles
test: setup
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4

# every example operator's CUDA kernels built with nvcc for sm_80 and sm_90 (the default
# run builds one of each kind)
test-cuda: setup
	ITDSL_TEST_CUDA=all $(BIN)/python -m pytest -q tests/test_cuda.py

bench: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"  # pykeops, a peer in the table
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/conv2d.py
	$(BIN)/python benchmarks/distributed.py

# INN resampling against L1 structured pruning without fine-tuning (experiments/inn/):
# results under experiments/inn/results/; QUICK=1 for a smoke run
inn: setup
	$(BIN)/python -m pip install --quiet -e ".[inn]"  # scikit-learn, mlxtend, torch-pruning, …
	$(BIN)/python -m experiments.inn.run $(if $(QUICK),--quick)

# ITNet against plain-torch baselines of the same size on six small data sets
# (experiments/itnet/): results under experiments/itnet/results/; QUICK=1 for a smoke run
itnet: setup
	$(BIN)/python -m pip install --quiet -e ".[itnet]"  # scikit-learn, mnist1d, sktime, …
	$(BIN)/python -m experiments.itnet.run $(if $(QUICK),--quick)

# The differential fuzzer (tests/fuzzing/): N programs through the torch paths, TVM of them
# through the TVM kernels too; failing programs go to tests/fuzz_corpus/new/.
N ?= 10000
TVM ?= 500
SEED ?= 0
JOBS ?= 2
fuzz: setup
	PYTHONPATH=tests $(BIN)/python -m fuzzing --n $(N) --tvm $(TVM) --seed $(SEED) --jobs $(JOBS)

lint: setup
	$(BIN)/python -m pip install --quiet ruff && $(BIN)/ruff check itdsl tests examples benchmarks experiments
