"""Stage 1: pretraining on the catalog's co-occurrence sequences, unconditioned.

Each example is a sequence prefix as context and its next item as target, with the null
domain: the model learns what comes next inside a pattern, before any attribute is asked.

`pretrain.sequences` says which sequences: the catalog's raw ones, nearest-neighbour walks over
the train items (`data.neighbour_walks`), or, by default, the raw ones and walks only where the
catalog has none, so that a catalog without co-occurrence data still trains (docs/decisions.md,
"Stage 1 without usable sequences").
"""

from absl import logging
import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import data
from modit_jax import errors
from modit_jax.stages import base

SEQUENCE_CHOICES = ("auto", "raw", "walks")
# A walk is as long as the rows the real catalogs' raw sequences are cut into.
WALK_LENGTH = 16
# At most this many walks (one per train item below it): 16M ids at 10M train items would
# outgrow the training data path's few GiB.
MAX_WALKS = 1_000_000


def _check(config: ml_collections.ConfigDict) -> None:
  mode = _settings(config)[0]
  if mode not in SEQUENCE_CHOICES:
    raise errors.UserError(f"pretrain.sequences must be one of {', '.join(SEQUENCE_CHOICES)}, "
                           f"got {mode!r}")


def _settings(config: ml_collections.ConfigDict) -> tuple[str, int]:
  # A run config saved before the field existed trained on the raw sequences.
  pretrain = config.get("pretrain") or {}
  return str(pretrain.get("sequences", "raw")), int(pretrain.get("walk_neighbours", 10))


def stage_sequences(config: ml_collections.ConfigDict,
                    catalog: catalog_lib.Catalog) -> tuple[np.ndarray, str]:
  """Stage 1's sequences for `config` on `catalog`, and a line saying which and why."""
  mode, neighbours = _settings(config)
  if mode == "raw":
    return np.asarray(catalog.sequences), "the catalog's raw sequences (pretrain.sequences=raw)"
  if mode == "auto":
    # Any row with a next item will do: low locality is only warned about (the pipeline prints
    # it), since walks did not help on the one such catalog measured (docs/decisions.md,
    # "Stage 1 without usable sequences").
    if (data.item_counts(catalog.sequences) >= 2).any():
      return np.asarray(catalog.sequences), "the catalog's raw sequences"
    why = "the catalog has no raw sequences"
  else:
    why = "pretrain.sequences=walks"
  walks = data.neighbour_walks(catalog.embeddings, catalog.train_items(), neighbours,
                               WALK_LENGTH, MAX_WALKS, int(config.seed))
  return walks, (f"{len(walks)} nearest-neighbour walks of {WALK_LENGTH} train items "
                 f"({neighbours} neighbours a step): {why}")


def _loop_args(inputs: base.Inputs) -> dict:
  config = inputs.config
  sequences, line = stage_sequences(config, inputs.catalog)
  logging.info("Stage 1 trains on %s", line)
  print(f"stage 1 trains on {line}", flush=True)
  source = data.SequencePrefixes(sequences, np.asarray(inputs.catalog.embeddings),
                                 config.model.max_context, inputs.model.num_domains, config.seed)
  return base.denoising_loop_args(inputs, source)


STAGE = base.Stage("pretrain", order=1, conditioned=False, reads_evidence=False,
                   loop_args=_loop_args, check=_check)
