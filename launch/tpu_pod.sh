#!/usr/bin/env bash
# Trains stages on a Cloud TPU pod slice. Every worker runs this same script (one process per
# worker, driving its local chips); `train --distributed` calls jax.distributed.initialize()
# with no arguments, and JAX discovers the coordinator, process count and process id from the
# TPU metadata.
#
# Launch on all workers at once, from a machine with gcloud (the repository checked out at
# ~/modit_jax on every worker, e.g. with a first `--worker=all --command="git clone ..."`):
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
#     --command="cd modit_jax && SETUP=1 DATASET=/mnt/shared/dataset OUT=/mnt/shared/out \
#                bash launch/tpu_pod.sh"
#
# Variables:
#   DATASET      catalog directory (modit-catalog/1); required. Every worker reads it at this
#                same path: put it on shared storage (an NFS / Filestore mount) or copy it to
#                every worker first (gcloud compute tpus tpu-vm scp --recurse --worker=all).
#   OUT          output root; stage S writes OUT/S (default: out/tpu). Must be a filesystem
#                mounted on every worker: Orbax writes each host's shards there. Local paths
#                only (the metrics writer uses plain files, so no gs://).
#   STAGES       stage configs to train in order, configs/<stage>.py (default: "pretrain cpt sft");
#                each stage after the first starts from the previous one (--config.init_from)
#   INIT_FROM    workdir the first stage starts from (default: empty, its config's own init_from)
#   EXTRA_FLAGS  more flags for every stage, e.g. "--config.num_steps=5000" (default: empty)
#   PYTHON       interpreter with modit_jax and jax[tpu] installed (default: .venv/bin/python)
#   SETUP        1: first create .venv (python3.11) on this worker and install modit_jax with
#                jax[tpu]==0.10.2; setup.py pins jax[cpu], the tpu extra adds libtpu (default: 0)
#
# Evaluation is single-process: afterwards run `modit_jax.cli.evaluate` on one machine (README).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATASET:?set DATASET to the catalog directory (the same path on every worker)}"
OUT="${OUT:-out/tpu}"
STAGES="${STAGES:-pretrain cpt sft}"
INIT_FROM="${INIT_FROM:-}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
PYTHON="${PYTHON:-.venv/bin/python}"
SETUP="${SETUP:-0}"

if [[ "$SETUP" == 1 ]]; then
  python3.11 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e . "jax[tpu]==0.10.2"
fi

read -r -a extra <<< "$EXTRA_FLAGS"
previous="$INIT_FROM"
for stage in $STAGES; do
  init=()
  if [[ -n "$previous" ]]; then init=(--config.init_from="$previous"); fi
  "$PYTHON" -m modit_jax.cli.train --distributed --config="configs/$stage.py" \
    --dataset="$DATASET" --workdir="$OUT/$stage" "${init[@]}" "${extra[@]}"
  previous="$OUT/$stage"
done
