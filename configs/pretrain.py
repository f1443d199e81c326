r"""Stage 1: raw-sequence pretraining (the `pretrained_gr` method).

Launch:
  python -m modit_jax.cli.train --config=configs/pretrain.py \
      --dataset=out/default/dataset --workdir=out/default/pretrain
Context = a prefix of a raw sequence (random length), target = the next item's embedding.
Variant `configs/pretrain.py:tiny` (tests). The schema is `modit_jax.training.default_config`.
"""

import ml_collections

from modit_jax import training


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the stage-1 config; `arg`: '' or 'tiny'."""
  c = training.default_config(arg)
  c.stage = "pretrain"
  return c
