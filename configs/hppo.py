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
  tokens = variants.parse(arg, ("tiny",) + tuple(f"no_{p}" for p in hppo.DEFAULT_POLICIES),
                          "hppo")
  removed = [t[len("no_"):] for t in tokens if t.startswith("no_")]
  c = training.default_config(variants.join(*(t for t in tokens if not t.startswith("no_"))))
  c.stage = "hppo"
  c.init_from = "out/default/sft"
  training.set_catalog_offsets(c, True)  # as its SFT start does
  # A short warm-up, and an EMA that follows the policy within a few hundred steps. With the
  # SFT term on each query's best candidate (hppo.default_config) the policy was under-fitted
  # at 1e-3 (on the development world, Joint@20 rose with the rate up to 8e-3 and was flat
  # from there to 3.2e-2 at β 2; docs/hppo.md, "One target per query").
  c.learning_rate = 8e-3
  c.warmup_steps = 20
  # Every update regresses the policy on each fit query's best model-free candidate: the
  # policy learns a region's direction from many updates on fixed targets. On the development
  # world, 2,000 such updates gave a mean Joint@20 of 0.620 / 0.632 (two seeds) against 0.531
  # for 400 pair updates; DPO pools after the regression added nothing measured (1,000 + 400
  # pair updates 0.603 against 1,400 of regression 0.606; 2,000 + 100 gave 0.600), so the
  # default spends HPPO's time on the regression (a regression update costs a third of a pair
  # update and needs no pool). `hppo.regress_steps` < `num_steps` adds pools after it
  # (docs/hppo.md, "A regression phase"). 4,000 updates rather than 2,000: +0.016 / +0.013
  # mean Joint@20 over two seeds (0.674 / 0.665 against 0.658 / 0.652), on item holdout; 6,000
  # gave 0.668 (docs/hppo.md, "Unseen patterns in the targets, and a longer regression").
  # Those 4,000 updates of 128 are now 2,000 of 256: the same examples in ~18 % less time on
  # 2 CPU cores (4,790 against 3,600 examples/s), served Joint@20 level or higher on the
  # development world, both test-world sets and the music catalog (docs/hppo.md, "The same
  # examples in half the updates").
  c.num_steps = 2000
  c.hppo.regress_steps = 2000
  c.hppo.pool_every = 100
  c.batch_size = 256
  c.ema_decay = 0.99
  c.log_every = 20
  # A save costs about 0.6 s on 2 CPU cores (the asynchronous writer shares them with the
  # step): every 100 steps it was 24 s of a 183-s run. Every 500, a stop loses at most 20 s.
  c.checkpoint_every = 500
  if "tiny" in tokens:
    c.num_steps = 200
    c.hppo.regress_steps = 200
    c.batch_size = 32
    c.checkpoint_every = 50
    c.hppo.pool_every = 50
    c.warmup_steps = 5
    c.ema_decay = 0.9
  c.hppo.policies = ",".join(p for p in hppo.DEFAULT_POLICIES if p not in removed)
  return c
