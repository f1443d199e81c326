#!/usr/bin/env bash
# Runs the main job on this machine (CPU or one local accelerator): the whole pipeline.
#
# Variables:
#   OUT      output directory (default: out/default); OUT/report.md is the result
#   CONFIG   pipeline config (default: configs/pipeline.py; e.g. configs/pipeline.py:tiny)
#   DATASET  an existing catalog to use instead of the synthetic world (default: none)
#   PYTHON   interpreter with modit_jax installed (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/default}"
CONFIG="${CONFIG:-configs/pipeline.py}"
PYTHON="${PYTHON:-.venv/bin/python}"
DATASET_FLAG=()
if [[ -n "${DATASET:-}" ]]; then
  DATASET_FLAG=(--config.dataset="$DATASET")
fi
"$PYTHON" -m modit_jax.cli.pipeline --config="$CONFIG" --workdir="$OUT" "${DATASET_FLAG[@]}"
