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

test: $(STAMP)  ## the stage contracts (import-linter), then the quick suite: everything but the long training tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(STAMP)  ## the long training tests only
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)  ## everything
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

clean:
	rm -rf demo-output .pytest_cache
