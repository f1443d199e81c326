# Two entry points, both self-contained on a fresh machine with python3.11:
#   make main   - set up .venv, build the default synthetic world, evaluate.
#   make test   - set up .venv, run the test suite.
PYTHON ?= python3
VENV ?= .venv
OUT ?= out/default
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: setup main test bench
setup: $(VENV)/.installed

main: $(VENV)/.installed
	$(PY) -m modit_jax.make_dataset --config=configs/synthetic.py --out=$(OUT)/dataset
	$(PY) -m modit_jax.evaluate --config=configs/evaluate.py --dataset=$(OUT)/dataset --workdir=$(OUT)/eval

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/retrieval.py
