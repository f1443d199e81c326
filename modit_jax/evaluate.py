r"""Evaluates methods on a catalog and writes report.md, results.json and retrieved ids.

  python -m modit_jax.evaluate --config=configs/evaluate.py --dataset=DIR --workdir=OUT
  python -m modit_jax.evaluate --config=configs/evaluate.py \
      --config.methods=seed_centroid,global_attribute --dataset=DIR --workdir=OUT
"""

from typing import Sequence

from absl import flags
from ml_collections import config_flags

from modit_jax import app
from modit_jax import catalog as catalog_lib
from modit_jax import evaluation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file.")
_DATASET = flags.DEFINE_string("dataset", None, "Catalog directory (modit-catalog/1).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
flags.mark_flags_as_required(["config", "dataset", "workdir"])


def main(argv: Sequence[str]) -> None:
  del argv
  catalog = catalog_lib.load_catalog(_DATASET.value)
  result = evaluation.evaluate(catalog, _CONFIG.value)
  evaluation.write(result, _WORKDIR.value, _DATASET.value)
  print(evaluation.headline_table(result.records))
  print(f"wrote {_WORKDIR.value}/report.md, results.json and retrieved/")


if __name__ == "__main__":
  app.run(main)
