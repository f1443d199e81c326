"""Stage 3: supervised fine-tuning toward the high-attribute tail of a seed set's cluster.

Each example is a seed set drawn from the low part of a latent cluster and, as target, the
centroid of the cluster's high tail for one domain; with `model.neighbour_evidence` the
example also carries the evidence of the train items near its seeds.
"""

from modit_jax import models
from modit_jax import trajectories
from modit_jax.stages import base


def _loop_args(inputs: base.Inputs) -> dict:
  config, catalog = inputs.config, inputs.catalog
  path = base.trajectory_source(config, catalog, inputs.dataset, inputs.workdir)
  source = trajectories.TailCentroidTargets(
      path, config.sft.context_size, config.sft.tail_fraction, config.sft.low_fraction,
      inputs.model.num_domains, config.seed,
      # A model with positions reads its context in ascending density, as inference gives it.
      context_order="metric" if config.model.learned_positions else "random",
      evidence=models.neighbour_evidence(config, catalog, path.assign,
                                         inputs.catalog_index),
      hide_cluster_prob=float(config.sft.get("hide_cluster_prob", 0.0)))
  return base.denoising_loop_args(inputs, source)


STAGE = base.Stage("sft", order=3, conditioned=True, reads_evidence=True, loop_args=_loop_args)
