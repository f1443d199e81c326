r"""Stage 2: multi-domain metric-ordered continuation pretraining (the `modit_cpt` method).

Launch (after stage 1):
  python -m modit_jax.cli.train --config=configs/cpt.py \
      --config.init_from=out/default/pretrain \
      --dataset=out/default/dataset --workdir=out/default/cpt
Order ablation (`order_random`, `order_reversed`): `configs/cpt.py:random` and
`configs/cpt.py:reversed` (combine with `tiny` as `configs/cpt.py:tiny,random`).
Trajectories: items of one latent cluster (k-means over train items), ordered by the metric
predictor's density for domain m; context = a prefix, target = the next item, domain token = m.
The model has learned positions, so it sees the prefix's order (every order variant has them, so
the ablation changes the order alone); at inference its seeds are put in ascending density by
the metric predictor saved with the run. Stage 3 drops the position table (seed sets).
"""

import ml_collections

from modit_jax import training
from modit_jax import variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the stage-2 config; `arg`: comma-separated from tiny, metric, random, reversed."""
  orders = ("metric", "random", "reversed")
  tokens = variants.parse(arg, ("tiny",) + orders, "cpt")
  c = training.default_config(variants.join(*(t for t in tokens if t not in orders)))
  orders = [t for t in tokens if t in orders]
  c.stage = "cpt"
  c.init_from = "out/default/pretrain"
  c.cpt.order = orders[-1] if orders else "metric"
  # Without positions the model sees a prefix as a set; order then reaches it only through
  # which item is the target (docs/decisions.md, "Learned positions in stage 2").
  c.model.learned_positions = True
  return c
