r"""Runs the test-world protocol: the pipeline on each test world, then the pooled report.

  python -m modit_jax.cli.protocol --config=configs/protocol.py --workdir=out/protocol

Run it again after an interruption: finished worlds and runs are skipped, an interrupted run
resumes. Output: OUT/world_<seed>/ (one pipeline directory per world), OUT/results.json (pooled,
the format of an evaluation's results.json), OUT/report.md. See docs/protocol.md.
"""

from typing import Sequence

from absl import flags
from ml_collections import config_flags

from modit_jax import workflow
from modit_jax.cli import app

_CONFIG = config_flags.DEFINE_config_file("config", None, "Protocol config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> None:
  del argv
  workflow.use_compilation_cache(_WORKDIR.value)
  path = workflow.run_protocol(_CONFIG.value, _WORKDIR.value)
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
