# Two entry points, both self-contained on a fresh machine with python3.11:
#   make main   - set up .venv, build the default synthetic world, train stages 1-3, evaluate.
#   make test   - set up .venv, run the test suite.
PYTHON ?= python3
VENV ?= .venv
OUT ?= out/default
PY := $(VENV)/bin/python
TRAIN := $(PY) -m modit_jax.train --dataset=$(OUT)/dataset

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: setup main test bench
setup: $(VENV)/.installed

# Every stage resumes from its workdir, so an interrupted `make main` picks up where it stopped.
main: $(VENV)/.installed
	$(PY) -m modit_jax.make_dataset --config=configs/synthetic.py --out=$(OUT)/dataset
	$(TRAIN) --config=configs/pretrain.py --workdir=$(OUT)/pretrain
	$(TRAIN) --config=configs/cpt.py --config.init_from=$(OUT)/pretrain --workdir=$(OUT)/cpt
	$(TRAIN) --config=configs/sft.py --config.init_from=$(OUT)/cpt --workdir=$(OUT)/sft
	$(PY) -m modit_jax.evaluate --config=configs/evaluate.py --dataset=$(OUT)/dataset \
	  --workdir=$(OUT)/eval \
	  --config.methods=seed_centroid,global_attribute,centroid_global_shift,rerank,oracle_shift,pretrained_gr,modit_cpt,modit_sft \
	  --config.references=pretrained_gr,strongest_baseline \
	  --config.workdirs.pretrained_gr=$(OUT)/pretrain --config.workdirs.modit_cpt=$(OUT)/cpt \
	  --config.workdirs.modit_sft=$(OUT)/sft

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) bench/retrieval.py
	$(PY) bench/train_step.py
