"""Stage 1: pretraining on the catalog's co-occurrence sequences, unconditioned.

Each example is a sequence prefix as context and its next item as target, with the null
domain: the model learns what comes next inside a pattern, before any attribute is asked.
"""

import numpy as np

from modit_jax import data
from modit_jax.stages import base


def _loop_args(inputs: base.Inputs) -> dict:
  config = inputs.config
  source = data.SequencePrefixes(inputs.catalog.sequences, np.asarray(inputs.catalog.embeddings),
                                 config.model.max_context, inputs.model.num_domains, config.seed)
  return base.denoising_loop_args(inputs, source)


STAGE = base.Stage("pretrain", order=1, conditioned=False, reads_evidence=False,
                   loop_args=_loop_args)
