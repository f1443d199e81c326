#!/usr/bin/env bash
#SBATCH --job-name=modit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --output=modit-%j.out
#
# Trains stages on a Slurm GPU cluster, one process per GPU: every stage is one `srun` step of
# nodes x ntasks-per-node tasks, and `train --distributed` lets JAX read the coordinator (first
# node of the step), process count (SLURM_NTASKS) and rank (SLURM_PROCID) from Slurm.
# Keep --ntasks-per-node equal to --gpus-per-node (older sites: --gres=gpu:8).
#
# Submit from the repository root (sbatch runs a spooled copy of this file, so it finds the
# repository through SLURM_SUBMIT_DIR; sbatch passes your environment to the job):
#   DATASET=/shared/dataset OUT=/shared/out sbatch launch/slurm_gpu.sh
#   DATASET=... OUT=... sbatch --nodes=4 launch/slurm_gpu.sh   # options override #SBATCH lines
#
# Variables:
#   DATASET      catalog directory (modit-catalog/1) on storage every node mounts; required
#   OUT          output root on a filesystem shared by all nodes (Orbax writes every process's
#                shards there); stage S writes OUT/S (default: out/slurm)
#   STAGES       stage configs to train in order, configs/<stage>.py (default: "pretrain cpt sft");
#                each stage after the first starts from the previous one (--config.init_from)
#   INIT_FROM    workdir the first stage starts from (default: empty, its config's own init_from)
#   EXTRA_FLAGS  more flags for every stage, e.g. "--config.num_steps=5000" (default: empty)
#   PYTHON       interpreter with modit_jax and a CUDA jax on every node
#                (default: .venv/bin/python);
#                install with: pip install -e . "jax[cuda12]==0.10.2" (setup.py pins jax[cpu];
#                use jax[cuda13] for CUDA 13 drivers)
#   JAX_COORDINATOR_PORT  coordinator port (default: JAX derives one from the job id)
#   JAX_LOCAL_DEVICE_IDS  set to 0 only if your site binds one GPU per task (see below)
#
# Why JAX's Slurm detection rather than MODIT_COORDINATOR=$(scontrol show hostnames
# $SLURM_JOB_NODELIST | head -1), MODIT_NUM_PROCESSES=$SLURM_NTASKS, MODIT_PROCESS_ID=$SLURM_PROCID:
# both name the same host and ranks, but detection runs inside every task, per job step, needs
# neither scontrol on the compute nodes nor a hand-picked port, and it also picks each process's
# GPU: process i of a node drives the node's GPU i (SLURM_LOCALID). JAX applies that GPU choice
# whenever Slurm variables are present, MODIT_COORDINATOR or not, so the manual path gains
# nothing. It is also why GPUs are requested per node and not with --gpus-per-task=1: per-task
# binding leaves each task one visible GPU (ordinal 0) and local ranks 1.. fail with "invalid
# device ordinal" (jax-ml/jax#23452). If your site binds GPUs to tasks anyway, export
# JAX_LOCAL_DEVICE_IDS=0 so each process takes the one GPU it sees.
#
# Evaluation is single-process: afterwards run `modit_jax.cli.evaluate` on one node (README).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
: "${DATASET:?set DATASET to the catalog directory (on storage every node mounts)}"
OUT="${OUT:-out/slurm}"
STAGES="${STAGES:-pretrain cpt sft}"
INIT_FROM="${INIT_FROM:-}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
PYTHON="${PYTHON:-.venv/bin/python}"

read -r -a extra <<< "$EXTRA_FLAGS"
previous="$INIT_FROM"
for stage in $STAGES; do
  init=()
  if [[ -n "$previous" ]]; then init=(--config.init_from="$previous"); fi
  # --kill-on-bad-exit: one failed process ends the step instead of leaving the rest waiting
  # in a collective. --cpus-per-task again: srun does not inherit it from sbatch (Slurm 22.05+).
  srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$PYTHON" -m modit_jax.cli.train --distributed --config="configs/$stage.py" \
    --dataset="$DATASET" --workdir="$OUT/$stage" "${init[@]}" "${extra[@]}"
  previous="$OUT/$stage"
done
