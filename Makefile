# covid-cxr: `make demo` (offline end-to-end demo) and `make test` (the whole suite).
# Both create .venv first if it is missing. Override the interpreter with PYTHON=python3.11,
# and the PyTorch pins with TORCH="torch==X torchvision==Y" (e.g. for a CPU-only wheel index).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.covid-cxr-installed

.PHONY: setup demo test test-slow test-all clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[all,test]'
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/covid-cxr demo --out demo-output

# The quick suite runs in TEST_WORKERS processes (pytest-xdist), whole files to a process so that a file's fixtures
# are built once; each test process uses one intra-op thread (tests/conftest.py). 2 cores: 4 min 15 s with 2
# processes against 6 min 36 s in one (docs/development.md). Default: the usable cores, at most 4 (each process
# holds its own PyTorch and fixtures); one core, or TEST_WORKERS=0, runs it in this process.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1); print(min(n, 4) if n > 1 else 0)")

test: $(STAMP)  ## the stage contracts (import-linter), then the quick suite: everything but the long training tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=10

test-slow: $(STAMP)  ## the long training tests only
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)  ## everything
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

clean:
	rm -rf demo-output .pytest_cache
