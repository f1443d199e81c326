"""What a training stage is, and what stages share: the denoising loop and the data path.

A stage builds what `engine.train_loop` takes (the loss, the batch source and, where it needs
them, a per-step hook, frozen params and a resume period) from its `Inputs`, and says what a
model it trains is (`run_dir.ModelFacts`). `training.train` does the rest, the same for all.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

from absl import logging
import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import dit
from modit_jax import metric_predictor
from modit_jax import models
from modit_jax import retrieval
from modit_jax import run_dir
from modit_jax import trajectories


@dataclasses.dataclass(frozen=True)
class Inputs:
  """What `training.train` hands a stage: the resolved config, the catalog and the model."""
  config: ml_collections.ConfigDict
  catalog: catalog_lib.Catalog
  model: dit.DiT
  init_params: Any  # the parameters training starts from (the earlier stage's, fitted)
  dataset: str
  workdir: str
  # An index over `catalog.embeddings` the caller holds (the pipeline's), reused for the
  # catalog offsets when it is the default one (`evidence.offset_index`); None: built.
  catalog_index: retrieval.Index | None = None


def _no_check(config: ml_collections.ConfigDict) -> None:
  del config


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage; a module of `modit_jax.stages` defines one as `STAGE`."""
  name: str
  order: int                # its place in the pipeline; stages are listed in this order
  conditioned: bool         # its model reads a domain token (False: asked with the null domain)
  reads_evidence: bool      # its batches can carry neighbour evidence (`model.neighbour_evidence`)
  # `engine.train_loop`'s keyword arguments besides the config, workdir and init params.
  loop_args: Callable[[Inputs], dict[str, Any]]
  # Refuses a config this stage cannot train (errors.UserError), before anything is written.
  check: Callable[[ml_collections.ConfigDict], None] = _no_check

  def facts(self, config: ml_collections.ConfigDict) -> run_dir.ModelFacts:
    """What inference must know about a model this stage trains with `config`."""
    return run_dir.ModelFacts(self.name, self.conditioned, bool(config.model.learned_positions))


def denoising_loop_args(inputs: Inputs, source: Callable[..., dict[str, np.ndarray]]
                        ) -> dict[str, Any]:
  """The denoising loss on the batches of `source(step, batch_size, process, processes)`."""
  config = inputs.config
  return dict(loss_fn=models.denoising_loss_fn(inputs.model, config),
              batch_fn=lambda step, pi, pc: source(step, config.batch_size, pi, pc))


def trajectory_source(config: ml_collections.ConfigDict, catalog: catalog_lib.Catalog,
                      dataset: str, workdir: str) -> trajectories.TrajectorySource:
  """Stages 2-4's data path (predictor density, latent clusters), its diagnostics saved.

  With `config.data_cache` (a directory), the path is computed once per (catalog, clusters,
  seed, predictor config) and reused by every later run that shares them: the pipeline's
  stages and ablations would otherwise each retrain the same predictor and k-means.
  """
  key = json.dumps({"dataset": os.path.abspath(dataset), "manifest": catalog.manifest,
                    "num_clusters": config.num_clusters, "seed": config.seed,
                    "predictor": config.metric_predictor.to_dict()}, sort_keys=True,
                   default=str)
  cache = (os.path.join(config.data_cache,
                        f"source_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
           if config.data_cache else "")
  arrays = {}
  if cache and os.path.isfile(cache):
    with np.load(cache) as saved:
      # A cache written before the predictor's parameters were saved is built again.
      if metric_predictor.has_saved(saved.files):
        logging.info("Reusing the predictor density and latent clusters cached in %s", cache)
        arrays = {name: saved[name] for name in saved.files}
  if not arrays:
    source, predictor = trajectories.build_source(
        catalog, config.num_clusters, config.seed, config.metric_predictor)
    validation = predictor.validation
    arrays = dict(
        train_items=source.train_items, assign=source.assign, density=source.density,
        predictor_auc=np.array([v["auc"] for v in validation], np.float64),
        predictor_ece=np.array([v["ece"] for v in validation], np.float64),
        predictor_n=np.array([v["n_heldout"] for v in validation], np.int64),
        **predictor.to_arrays())
    if cache:
      run_dir.save_npz_atomically(cache, arrays)
  # What evaluation reports about the data path (predictor validation, cluster agreement),
  # and the predictor that orders a learned-positions model's context at inference.
  run_dir.save_npz_atomically(os.path.join(workdir, run_dir.DIAGNOSTICS_FILE), arrays)
  return trajectories.TrajectorySource(arrays["train_items"], arrays["assign"],
                                       arrays["density"], catalog.embeddings)
