# Two entry points, both self-contained on a fresh machine with python3.11:
#   make main   - set up .venv, run the pipeline on the default synthetic world (OUT/report.md).
#   make test   - set up .venv, run the test suite.
PYTHON ?= python3
VENV ?= .venv
OUT ?= out/default
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,byo,real]'
	touch $@

.PHONY: setup main test bench
setup: $(VENV)/.installed

# The whole job (modit_jax/workflow.py): dataset, stages 1-4 and their ablations, evaluation,
# OUT/report.md with plots. Re-running skips finished runs and resumes an interrupted one.
main: $(VENV)/.installed
	$(PY) -m modit_jax.cli.pipeline --config=configs/pipeline.py --workdir=$(OUT)

# One worker per core, at most 4 (each holds its own JAX runtime); a test file stays on one
# worker, so its module fixtures are built once. `pytest -q tests` runs the same tests serially.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile tests

# faiss-cpu (for bench/faiss_compare.py) is a bench-only extra.
bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/retrieval.py
	$(PY) bench/train_step.py --torch_peer
	$(PY) bench/scale.py
	$(PY) bench/faiss_compare.py
	$(PY) bench/end_to_end.py
	$(PY) bench/catalog_offsets.py
