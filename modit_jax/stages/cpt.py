"""Stage 2: continued pretraining on metric-ordered trajectories inside latent clusters.

Each example is a trajectory prefix of train items in ascending predicted density
(`cpt.order`: the order ablation) and the next item as target, for one domain.
"""

import ml_collections

from modit_jax import errors
from modit_jax import trajectories
from modit_jax.stages import base


def _check(config: ml_collections.ConfigDict) -> None:
  if config.cpt.trajectory_length > config.model.max_context:
    raise errors.UserError(
        f"cpt.trajectory_length {config.cpt.trajectory_length} exceeds model.max_context "
        f"{config.model.max_context}")


def _loop_args(inputs: base.Inputs) -> dict:
  config = inputs.config
  source = trajectories.MetricOrderedTrajectories(
      base.trajectory_source(config, inputs.catalog, inputs.dataset, inputs.workdir),
      config.cpt.trajectory_length, config.cpt.order, inputs.model.num_domains, config.seed)
  return base.denoising_loop_args(inputs, source)


STAGE = base.Stage("cpt", order=2, conditioned=True, reads_evidence=False,
                   loop_args=_loop_args, check=_check)
