"""Tests for launch/*.sh: syntax, headers, commands run, and Slurm detection on loopback."""

import glob
import os
import socket
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))
# A stand-in for python / srun that records its arguments, one invocation per line.
_RECORDER = '#!/usr/bin/env bash\necho "$(basename "$0") $*" >> "$LAUNCH_LOG"\n'


def test_there_are_local_tpu_and_slurm_scripts():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert {"local.sh", "tpu_pod.sh", "slurm_gpu.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_is_valid_bash_with_a_variables_header(script):
  subprocess.run(["bash", "-n", script], check=True)
  text = open(script, encoding="utf-8").read()
  assert text.startswith("#!/usr/bin/env bash\n")
  header = text[:text.index("set -euo pipefail")]  # the header comes before any command
  assert "# Variables:" in header


def _recorder(directory, name):
  path = os.path.join(directory, name)
  with open(path, "w", encoding="utf-8") as f:
    f.write(_RECORDER)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
  return path


def _run(script, tmp_path, **env):
  log = tmp_path / "log"
  full = dict(os.environ, LAUNCH_LOG=str(log), **env)
  result = subprocess.run(["bash", os.path.join(REPO, "launch", script)], env=full,
                          capture_output=True, text=True, timeout=30, check=False)
  lines = log.read_text().splitlines() if log.exists() else []
  return result, lines


def test_tpu_script_runs_every_stage_distributed_and_chained(tmp_path):
  python = _recorder(tmp_path, "python")
  result, lines = _run("tpu_pod.sh", tmp_path, PYTHON=python, DATASET="/data/cat", OUT="/o",
                       STAGES="pretrain cpt", EXTRA_FLAGS="--config.num_steps=7")
  assert result.returncode == 0, result.stderr
  assert lines == [
      "python -m modit_jax.cli.train --distributed --config=configs/pretrain.py "
      "--dataset=/data/cat --workdir=/o/pretrain --config.num_steps=7",
      "python -m modit_jax.cli.train --distributed --config=configs/cpt.py --dataset=/data/cat "
      "--workdir=/o/cpt --config.init_from=/o/pretrain --config.num_steps=7"]


def test_slurm_script_runs_one_srun_step_per_stage(tmp_path):
  _recorder(tmp_path, "srun")
  result, lines = _run("slurm_gpu.sh", tmp_path, PATH=f"{tmp_path}:{os.environ['PATH']}",
                       SLURM_SUBMIT_DIR=REPO, SLURM_CPUS_PER_TASK="4", DATASET="/data/cat",
                       OUT="/o", STAGES="sft", INIT_FROM="/o/cpt", PYTHON="py")
  assert result.returncode == 0, result.stderr
  assert lines == [
      "srun --kill-on-bad-exit=1 --cpus-per-task=4 py -m modit_jax.cli.train --distributed "
      "--config=configs/sft.py --dataset=/data/cat --workdir=/o/sft --config.init_from=/o/cpt"]


@pytest.mark.parametrize("script", ["tpu_pod.sh", "slurm_gpu.sh"])
def test_missing_dataset_is_refused(tmp_path, script):
  env = {k: v for k, v in os.environ.items() if k != "DATASET"}
  result = subprocess.run(["bash", os.path.join(REPO, "launch", script)], env=env,
                          capture_output=True, text=True, timeout=30, check=False)
  assert result.returncode != 0
  assert "DATASET" in result.stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_slurm_environment_is_detected_by_the_distributed_flag_path():
  """Two processes with Slurm's variables (and no MODIT_*) form one JAX cluster on loopback.

  This is what `train --distributed` does under srun: engine.maybe_initialize_distributed("auto").
  """
  code = ("from modit_jax import engine; import jax; "
          "assert engine.maybe_initialize_distributed('auto'); "
          "print(jax.process_index(), jax.process_count())")
  port = _free_port()
  procs = []
  for rank in range(2):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODIT_", "SLURM_"))}
    env.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
               SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), JAX_COORDINATOR_PORT=str(port),
               JAX_PLATFORMS="cpu")
    procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  outputs = []
  for proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    outputs.append(out.strip())
  assert outputs == ["0 2", "1 2"]
