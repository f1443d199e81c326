"""Stage 4: HPPO, DPO on preference pairs from candidate pools scored by the online oracle.

It starts from an SFT model, which is also the frozen DPO reference; every `hppo.pool_every`
updates a hook rebuilds the candidate pools from the current policy (`modit_jax.hppo`).
"""

from typing import Any

import ml_collections

from modit_jax import errors
from modit_jax import hppo
from modit_jax import models
from modit_jax import oracle as oracle_lib
from modit_jax.stages import base


def _check(config: ml_collections.ConfigDict) -> None:
  if config.model.learned_positions:
    raise errors.UserError("the hppo stage does not support model.learned_positions: its pools "
                           "and pairs give the model seed sets in no order")
  if not config.init_from:
    raise errors.UserError("the hppo stage starts from an SFT model: set config.init_from to "
                           "its workdir (it is also the frozen DPO reference)")
  every = int(config.hppo.pool_every)
  if every <= 0 or config.checkpoint_every % every:
    raise errors.UserError(
        f"config.checkpoint_every ({config.checkpoint_every}) must be a positive multiple of "
        f"hppo.pool_every ({every}): a resumed run rebuilds its pool at the checkpoint step")
  regress = int(config.hppo.get("regress_steps", 0))
  if regress < 0 or regress % every or regress > config.num_steps:
    raise errors.UserError(
        f"hppo.regress_steps ({regress}) must be a multiple of hppo.pool_every ({every}) "
        f"between 0 and num_steps ({config.num_steps})")
  hide = config.hppo.get("hide_cluster_prob", 0.0)
  if isinstance(hide, bool) or not isinstance(hide, (int, float)) or not 0 <= hide <= 1:
    raise errors.UserError(f"hppo.hide_cluster_prob must be in [0, 1]; got {hide!r}")
  if hide and not regress:
    raise errors.UserError("hppo.hide_cluster_prob shapes the regression phase's targets: set "
                           "hppo.regress_steps > 0 too")
  hppo.parse_policies(config.hppo.policies)
  hppo.uses_best_target(config.hppo)


def _loop_args(inputs: base.Inputs) -> dict[str, Any]:
  """DPO loss, pair batches, the pool hook, and the starting model as frozen reference."""
  config, catalog, model = inputs.config, inputs.catalog, inputs.model
  reference = inputs.init_params
  source = base.trajectory_source(config, catalog, inputs.dataset, inputs.workdir)
  oracle = oracle_lib.OnlineOracle(catalog, k=config.hppo.oracle_k,
                                   index_kind=config.hppo.oracle_index_kind)
  space = models.target_space(config, model.dim)
  pools = hppo.CandidatePools(catalog, source, oracle, models.apply_fn(model), reference,
                              config, model.num_domains, space,
                              models.sample_temperature(config),
                              models.neighbour_evidence(config, catalog, source.assign,
                                                       inputs.catalog_index))
  batches = hppo.PairBatches(pools, config)
  loss_fn = hppo.dpo_loss_fn(models.apply_fn(model), space, config.hppo.beta,
                             config.hppo.sft_weight)
  # A resumed run rebuilds its pool from the checkpoint's policy: exact only at a pool start.
  return dict(loss_fn=loss_fn, frozen_params=reference, before_step=batches.before_step,
              batch_fn=lambda step, pi, pc: batches(step, pi, pc, config.batch_size),
              resume_every=int(config.hppo.pool_every))


STAGE = base.Stage("hppo", order=4, conditioned=True, reads_evidence=True,
                   loop_args=_loop_args, check=_check)
