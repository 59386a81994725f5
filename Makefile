# The README's two quick-start commands: `make demo` and `make test`. Both install first (once).
#
# torch goes first, on its own: a range would pull a multi-GB CUDA build on CPU machines (shared NOTES), and the
# exact pins of constraints/pins.txt leave torch out, so they hold on a CPU box and on a CUDA box alike.
#   make install                          torch==2.13.0 (the build pip picks: CPU where a CPU wheel is offered,
#                                         e.g. through PIP_FIND_LINKS or PIP_INDEX_URL; PyPI's Linux wheel is CUDA)
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"   a chosen CUDA build
#   make install TORCH= VENV_FLAGS=--system-site-packages    keep the torch already installed (NGC or a cluster image)
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH ?= torch==2.13.0
PINS ?= constraints/pins.txt
PY := $(VENV)/bin/python

.PHONY: install browser demo ui test test-all bench gpu-check
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(PINS)
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(strip $(TORCH)),$(PY) -m pip install -q $(TORCH))
	$(PY) -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	$(PY) -m pip install -q -c $(PINS) -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/foundry-train

# Debian's Chromium for foundry-ui's browser test (tests/integration/test_ui_browser.py, Playwright drives it). Installed
# where this runs as root with apt-get (CI, containers); elsewhere the test is skipped and this says so.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	      --no-install-recommends chromium >/dev/null && echo "browser: installed $$(chromium --version)") \
	      || echo "browser: apt-get failed; the browser test will be skipped"; \
	  else echo "browser: no chromium (install Debian's chromium as root to run the browser test); it will be skipped"; fi; }

ui: install
	$(VENV)/bin/foundry-ui

test: install browser
	$(PY) -m pytest

test-all: install browser
	$(PY) -m pytest -m "not gpu"

bench: install
	$(PY) benchmarks/bench_loop.py

# The GPU check (benchmarks/gpu_check.py): one JSON of throughput/MFU, optimizers, strategies' memory, host syncs, the
# digits demo, the gpu tests and the memory stages; under 8 minutes on one H100. Without CUDA every stage is skipped.
gpu-check: install
	$(PY) benchmarks/gpu_check.py --out outputs/gpu_check.json
