r"""Evaluation of methods on a catalog's 8 cells (DESIGN.md section 6).

Launch:
  python -m modit_jax.cli.evaluate --config=configs/evaluate.py \
      --dataset=out/default/dataset --workdir=out/default/eval
Pick methods with e.g. `--config.methods=seed_centroid,global_attribute`.
Variant `configs/evaluate.py:tiny` (tests): exact search, fewer resamples, a quick predictor.
"""

import ml_collections

from modit_jax import evaluation
from modit_jax import variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the evaluation config; `arg` in {None, 'default', 'tiny'}."""
  c = evaluation.default_config()
  if variants.parse(arg, ("tiny",), "evaluate"):
    c.index_kind = "exact"
    c.oracle_index_kind = "exact"
    c.shift_grid = (0.0, 0.1, 0.2, 0.4, 0.8)
    c.rerank_pool_grid = (50, 100)
    c.local_neighbourhood_grid = (50, 100)
    c.local_shift_grid = (0.0, 1.0, 4.0)
    c.offset_neighbourhood_grid = (25, 50)
    c.offset_step_grid = (2.0, 8.0)
    c.metric_predictor.num_steps = 500
    c.metric_predictor.hidden = (64,)
    c.guidance_grid = (1.0, 4.0)
    c.num_resamples = 1000
  return c
