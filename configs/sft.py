r"""Stage 3: tail-centroid fine-tuning (the `modit_sft` and `modit_sft_only` methods).

Launch (CPT -> SFT, `modit_sft`):
  python -m modit_jax.cli.train --config=configs/sft.py \
      --config.init_from=out/default/cpt \
      --dataset=out/default/dataset --workdir=out/default/sft
SFT only (`modit_sft_only`): `--config.init_from=out/default/pretrain`.
Context = `sft.context_size` items from the low-density part of a latent cluster for domain m;
target = the normalised centroid of the cluster's top `sft.tail_fraction` by density.
"""

import ml_collections

from modit_jax import training


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the stage-3 config; `arg`: '' or 'tiny'."""
  c = training.default_config(arg)
  c.stage = "sft"
  c.init_from = "out/default/cpt"
  training.set_catalog_offsets(c, True)
  return c
