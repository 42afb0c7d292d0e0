# Two entry points for a fresh machine: `make demo` and `make test`; `make docs` regenerates the docs'
# example outputs and the executed notebook from the committed data.
# torch==2.13.0 is installed first so that the hf extra's unpinned torch resolves to the
# CPU build instead of a multi-GB CUDA build; users of the package are not pinned.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH ?= torch==2.13.0

.PHONY: demo long-demo post-demo test lint docs venv venv-test clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.core: $(VENV)/bin/activate pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/bin/activate pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[test]'
	touch $@ $(VENV)/.core

venv: $(VENV)/.core
venv-test: $(VENV)/.test

demo: $(VENV)/.core
	$(VENV)/bin/qwenjax demo --out runs/demo

long-demo: $(VENV)/.core
	$(VENV)/bin/qwenjax demo --long --out runs/long-demo

post-demo: $(VENV)/.core
	$(VENV)/bin/qwenjax demo --post --out runs/post-demo

test: $(VENV)/.test
	$(PY) -m pytest -q --timeout=900 tests

docs: $(VENV)/.test
	$(PY) docs/examples.py --notebook

lint: $(VENV)/.test
	$(VENV)/bin/ruff check qwenjax tests

clean:
	rm -rf $(VENV) runs
