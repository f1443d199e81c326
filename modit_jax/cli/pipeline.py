r"""Runs the whole job: dataset, the four stages and their ablations, evaluation, report.

  python -m modit_jax.cli.pipeline --config=configs/pipeline.py --workdir=out/pipeline
  python -m modit_jax.cli.pipeline --config=configs/pipeline.py --config.dataset=DIR --workdir=OUT
  python -m modit_jax.cli.pipeline --config=configs/pipeline.py:tiny,no_ablations --workdir=/tmp/p

Run it again after an interruption: finished runs are skipped and an interrupted one resumes
from its last checkpoint. See modit_jax/workflow.py for the output layout.
"""

from typing import Sequence

from absl import flags
from ml_collections import config_flags

from modit_jax import workflow
from modit_jax.cli import app

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pipeline config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (see workflow.py).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  del argv
  workflow.use_compilation_cache(_WORKDIR.value)
  path = workflow.run_pipeline(_CONFIG.value, _WORKDIR.value)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
