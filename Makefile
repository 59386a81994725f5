# The README's two quick-start commands: `make demo` and `make test`. Both install first (once).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install demo test test-all bench
install: $(VENV)/.installed

# torch goes first and pinned: a range would pull a multi-GB CUDA build on CPU machines (shared NOTES).
$(VENV)/.installed: pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints/cpu.txt -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/foundry-train

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m "not gpu"

bench: install
	$(PY) tests/bench/bench_loop.py
