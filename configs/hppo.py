r"""Stage 4: HPPO preference optimisation (the `modit_hppo` method and its ablations).

Launch (after stage 3):
  python -m modit_jax.cli.train --config=configs/hppo.py \
      --config.init_from=out/default/sft \
      --dataset=out/default/dataset --workdir=out/default/hppo
Candidate-policy ablation (`hppo_no_<policy>` methods): `configs/hppo.py:no_reference` removes
the frozen reference's candidates from the pool; likewise `no_policy`, `no_seed_centroid`,
`no_tail_centroid`, `no_interpolation`, `no_feedback`, `no_neighbourhood` (combine with `tiny` as
`configs/hppo.py:tiny,no_policy`).
The frozen reference of the DPO loss is always the `init_from` (SFT) model.
"""

import ml_collections

from modit_jax import hppo
from modit_jax import training
from modit_jax import variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the stage-4 config; `arg`: comma-separated from tiny and no_<policy>."""
  tokens = variants.parse(arg, ("tiny",) + tuple(f"no_{p}" for p in hppo.POLICIES), "hppo")
  removed = [t[len("no_"):] for t in tokens if t.startswith("no_")]
  c = training.default_config(variants.join(*(t for t in tokens if not t.startswith("no_"))))
  c.stage = "hppo"
  c.init_from = "out/default/sft"
  # A short warm-up, and an EMA that follows the policy within a few hundred steps. With the
  # SFT term on each query's best candidate (hppo.default_config) the policy was under-fitted
  # at 1e-3 (on the development world, Joint@20 rose with the rate up to 8e-3 and was flat
  # from there to 3.2e-2 at β 2; docs/hppo.md, "One target per query").
  c.learning_rate = 8e-3
  c.warmup_steps = 20
  # 1,000 updates of regression on every fit query's best policy-free candidate, then 200 of
  # DPO on two pools. The policy learns a region's direction from many updates on fixed
  # targets (development mean Joint@20 0.531 -> 0.597-0.599; docs/hppo.md, "A regression
  # phase"); a regression update costs a third of a pair update and needs no pool.
  c.num_steps = 1200
  c.hppo.regress_steps = 1000
  c.hppo.pool_every = 100
  c.batch_size = 128
  c.ema_decay = 0.99
  c.log_every = 20
  c.checkpoint_every = 100
  if "tiny" in tokens:
    c.num_steps = 150
    c.hppo.regress_steps = 100
    c.batch_size = 32
    c.checkpoint_every = 50
    c.hppo.pool_every = 50
    c.warmup_steps = 5
    c.ema_decay = 0.9
  c.hppo.policies = ",".join(p for p in hppo.POLICIES if p not in removed)
  return c
