#!/usr/bin/env bash
# Runs the main job on this machine (CPU or one local accelerator).
#
# Variables:
#   OUT     output directory (default: out/default)
#   CONFIG  synthetic world config (default: configs/synthetic.py; e.g. configs/synthetic.py:tiny)
#   PYTHON  interpreter with modit_jax installed (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/default}"
CONFIG="${CONFIG:-configs/synthetic.py}"
PYTHON="${PYTHON:-.venv/bin/python}"
"$PYTHON" -m modit_jax.make_dataset --config="$CONFIG" --out="$OUT/dataset"
"$PYTHON" -m modit_jax.evaluate --config=configs/evaluate.py --dataset="$OUT/dataset" \
  --workdir="$OUT/eval"
