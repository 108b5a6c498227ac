# Two commands on a fresh machine: `make demo` and `make test`. Each builds its own virtualenv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch (only for the PyTorch converter and its parity tests). The CPU build lies on this project's machines'
# disk; elsewhere set TORCH_SPEC, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu".
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean benchmark

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]" $(TORCH_SPEC)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) -m mixbct_jax.demo --out demo_runs

benchmark: $(STAMP)
	$(PY) benchmarks/train_step.py --arch r18 --batch 32

clean:
	rm -rf demo_runs
