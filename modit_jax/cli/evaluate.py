r"""Evaluates methods on a catalog and writes report.md, results.json and retrieved ids.

  python -m modit_jax.cli.evaluate --config=configs/evaluate.py --dataset=DIR --workdir=OUT
  python -m modit_jax.cli.evaluate --config=configs/evaluate.py \
      --config.methods=seed_centroid,global_attribute --dataset=DIR --workdir=OUT
"""

from typing import Sequence

from absl import flags
from ml_collections import config_flags

from modit_jax import catalog as catalog_lib
from modit_jax import evaluation
from modit_jax import results_markdown
from modit_jax.cli import app

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file.")
_DATASET = flags.DEFINE_string("dataset", None, "Catalog directory (modit-catalog/1).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "dataset", "workdir"])


def main(argv: Sequence[str]) -> None:
  del argv
  catalog = catalog_lib.load_catalog(_DATASET.value, mmap=True)  # rows are read as needed
  result = evaluation.evaluate(catalog, _CONFIG.value)
  results = evaluation.write(result, _WORKDIR.value, _DATASET.value)
  results_markdown.write_evaluation_report(_WORKDIR.value, results)
  print(results_markdown.headline_table(results["records"]))
  print(f"wrote {_WORKDIR.value}/report.md, results.json and retrieved/")


if __name__ == "__main__":
  app.run(main)
