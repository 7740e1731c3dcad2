# Two entry points: `make demo` (install the package + run the main job) and `make test` (install
# everything, the test and Ray extras and kronfluence too, + run the tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PBRF_DATA ?= $(abspath ../shared/datasets)
export PBRF_DATA

.PHONY: install install-core demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# what `pbrf run` needs, no more (the demo's first minute is this install)
install-core: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e .

install: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e ".[test,ray]"
	$(BIN)/pip install -q -c constraints.txt --no-deps kronfluence==1.0.1 && $(BIN)/pip install -q -c constraints.txt accelerate einops einconv opt-einsum

demo: install-core
	$(BIN)/pbrf run

# Two workers (one torch thread each, see tests/conftest.py); the 15 slowest tests are printed at
# the end so that a regression is visible.
test: install
	$(BIN)/ruff check src tests bench tools
	$(BIN)/python tools/check_layout.py src
	$(BIN)/python -m pytest -q -n 2 --durations=15

bench: install
	$(BIN)/python bench/bench_influence.py
	$(BIN)/python bench/bench_respond.py
	$(BIN)/python bench/bench_run.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_certify.py
	$(BIN)/python bench/bench_accurate.py
	$(BIN)/python bench/bench_continuation.py
	$(BIN)/python bench/bench_rows.py
	$(BIN)/python bench/bench_jacobian.py

clean:
	rm -rf runs .pytest_cache
