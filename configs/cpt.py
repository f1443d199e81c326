r"""Stage 2: multi-domain metric-ordered continuation pretraining (the `modit_cpt` method).

Launch (after stage 1):
  python -m modit_jax.train --config=configs/cpt.py \
      --config.init_from=out/default/pretrain \
      --dataset=out/default/dataset --workdir=out/default/cpt
Order ablation (`order_random`, `order_reversed`): `configs/cpt.py:random` and
`configs/cpt.py:reversed` (combine with `tiny` as `configs/cpt.py:tiny,random`).
Trajectories: items of one latent cluster (k-means over train items), ordered by the metric
predictor's density for domain m; context = a prefix, target = the next item, domain token = m.
"""

import ml_collections

from modit_jax import training


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the stage-2 config; `arg`: comma-separated from tiny, metric, random, reversed."""
  tokens = [t for t in (arg or "").split(",") if t]
  orders = [t for t in tokens if t in ("metric", "random", "reversed")]
  c = training.default_config(",".join(t for t in tokens if t not in orders))
  c.stage = "cpt"
  c.init_from = "out/default/pretrain"
  c.cpt.order = orders[-1] if orders else "metric"
  return c
