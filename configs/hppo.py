r"""Stage 4: HPPO preference optimisation (the `modit_hppo` method and its ablations).

Launch (after stage 3):
  python -m modit_jax.train --config=configs/hppo.py \
      --config.init_from=out/default/sft \
      --dataset=out/default/dataset --workdir=out/default/hppo
Candidate-policy ablation (`hppo_no_<policy>` methods): `configs/hppo.py:no_reference` removes
the frozen reference's candidates from the pool; likewise `no_policy`, `no_seed_centroid`,
`no_tail_centroid`, `no_interpolation`, `no_feedback` (combine with `tiny` as
`configs/hppo.py:tiny,no_policy`).
The frozen reference of the DPO loss is always the `init_from` (SFT) model.
"""

import ml_collections

from modit_jax import hppo
from modit_jax import training


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the stage-4 config; `arg`: comma-separated from tiny and no_<policy>."""
  tokens = [t for t in (arg or "").split(",") if t]
  removed = [t[len("no_"):] for t in tokens if t.startswith("no_")]
  c = training.default_config(",".join(t for t in tokens if not t.startswith("no_")))
  c.stage = "hppo"
  c.init_from = "out/default/sft"
  # Preference optimisation moves a trained model a little: a lower rate than SFT's, a short
  # warm-up, and an EMA that follows the policy within the run's few hundred steps. With the
  # relevance-feedback winners in the pool, 200 steps at 1e-4 left the policy below the seed
  # centroid on the real catalog's train queries; 600 at 3e-4 had just reached it
  # (docs/real_data.md). 400 at 3e-4 with a pool every 100 steps costs what 200 with a pool
  # every 50 did (pools, not updates, are most of an HPPO run's time).
  c.learning_rate = 3e-4
  c.warmup_steps = 20
  c.num_steps = 400
  c.hppo.pool_every = 100
  c.batch_size = 128
  c.ema_decay = 0.99
  c.log_every = 20
  c.checkpoint_every = 100
  if "tiny" in tokens:
    c.num_steps = 100
    c.batch_size = 32
    c.checkpoint_every = 50
    c.hppo.pool_every = 50
    c.warmup_steps = 5
    c.ema_decay = 0.9
  unknown = [p for p in removed if p not in hppo.POLICIES]
  if unknown:
    raise ValueError(f"unknown policies to remove {unknown}; known: {', '.join(hppo.POLICIES)}")
  c.hppo.policies = ",".join(p for p in hppo.POLICIES if p not in removed)
  return c
