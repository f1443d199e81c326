r"""Trains one stage; the config selects it and names the earlier stage it starts from.

  python -m modit_jax.cli.train --config=configs/pretrain.py --dataset=DIR --workdir=OUT

Resumes from the latest checkpoint in OUT. Multi-host: set --distributed (or the MODIT_*
environment variables, see docs/engine.md) to call jax.distributed.initialize() first.
"""

from typing import Sequence

from absl import flags
from ml_collections import config_flags

from modit_jax import engine
from modit_jax import training
from modit_jax.cli import app

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file.")
_DATASET = flags.DEFINE_string("dataset", None, "Catalog directory (modit-catalog/1).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config go here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (coordinator discovered by JAX "
    "on TPU pods and Slurm, or given by MODIT_COORDINATOR etc.).")
flags.mark_flags_as_required(["config", "dataset", "workdir"])


def main(argv: Sequence[str]) -> None:
  del argv
  engine.maybe_initialize_distributed("auto" if _DISTRIBUTED.value else None)
  training.train(_CONFIG.value, _DATASET.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
