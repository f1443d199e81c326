"""Stage training on top of the shared engine: model, loss and batches per stage.

Every stage trains the same DiT with the same denoising objective through `engine.train_loop`;
a stage only decides what the context, the domain and the target of an example are (its batch
function) and which earlier checkpoint it starts from (`config.init_from`). The workdir is a
`run_dir` run directory, so that evaluation and serving rebuild the model a checkpoint belongs
to without this module.
"""

import hashlib
import json
import os
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import data
from modit_jax import diffusion
from modit_jax import dit
from modit_jax import engine
from modit_jax import errors
from modit_jax import hppo
from modit_jax import metric_predictor
from modit_jax import models
from modit_jax import oracle as oracle_lib
from modit_jax import run_dir
from modit_jax import sizing
from modit_jax import trajectories

STAGES = ("pretrain", "cpt", "sft", "hppo")
# The neighbourhood sizes of the conditioned stages' evidence when it is on (docs/evidence.md):
# the span of local_shift's validation grid, from a pattern's core to its siblings.
NEIGHBOUR_EVIDENCE = (50, 200, 800)
# The stages whose batches carry evidence (SFT examples, HPPO pairs).
EVIDENCE_STAGES = ("sft", "hppo")


def default_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The schema of every stage config; `configs/<stage>.py` start from it.

  Args:
    variant: comma-separated tokens; `tiny` gives the test-sized model and schedule.
  """
  tokens = {t for t in (variant or "").split(",") if t and t != "default"}
  c = ml_collections.ConfigDict()
  c.stage = "pretrain"
  c.init_from = ""                  # workdir of the earlier stage to start from ("": scratch)
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  # Sized so that the whole pipeline (12 training runs and the evaluation) fits 20 minutes on
  # 2 CPU cores (docs/decisions.md, "Model and schedule size"). Scale width and steps up for
  # real catalogs and accelerators.
  c.model.width = 64
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_ratio = 4
  c.model.max_context = 16
  # Raw sequences are walks in random order and seed sets are sets: no positions, except in
  # stage 2 (configs/cpt.py), whose trajectories are ordered.
  c.model.learned_positions = False
  # Neighbourhood sizes of the evidence vectors a conditioned model reads besides its seeds
  # (modit_jax/evidence.py: the global direction, and per size the observed-label contrast
  # and the offset of the train items nearest the seeds). (): none, the model reads seeds only.
  c.model.neighbour_evidence = ()
  # Compute dtype of the DiT's Dense matmuls: float32 or bfloat16 (mixed precision: params,
  # optimiser state, norms, softmax and loss stay float32). Worth it where the hardware has
  # bf16 units (TPU, GPU tensor cores, CPUs with AMX): on this 2-core AMX CPU the matmuls ran
  # 4-6x and the train step 1.34-1.87x faster (docs/benchmarks.md).
  c.model.dtype = "float32"

  c.diffusion = ml_collections.ConfigDict()
  # 0: sqrt(d), unit per-coordinate variance (models.target_space()).
  c.diffusion.target_scale = 0.0
  # Generate the query's displacement from the context's mean instead of the query itself
  # (diffusion.TargetSpace; docs/diffusion.md, "Anchored targets").
  c.diffusion.anchored = True
  c.diffusion.cond_drop_prob = 0.1
  c.diffusion.sample_steps = 8
  # The sampler's start x_1 ~ N(0, temperature^2 I). 0: the deterministic path from x_1 = 0,
  # the model's most central answer; on the real catalog it kept stage 1's Purity@20 at 0.68
  # against 0.51 at temperature 1, and on the default world it changed Joint@20 by < 0.02
  # (docs/diffusion.md). A query wants one good answer, not a draw from the distribution.
  c.diffusion.sample_temperature = 0.0
  c.diffusion.guidance_scale = 1.0

  # Stages 2 and 3: latent clusters and the metric predictor (train items, observed labels).
  # 0: one per 10 seed sets of train items (sizing.num_latent_clusters, docs/sizing.md); the
  # pipeline always sets it from that rule.
  c.num_clusters = 0
  c.data_cache = ""                 # directory reused across runs for the two below ("": none)
  c.metric_predictor = metric_predictor.default_config()
  c.cpt = ml_collections.ConfigDict()
  # The longest trajectory prefix (a trajectory has one item more): the seed-set size, so every
  # position a seed takes at inference was trained. Shorter trajectories take bigger steps in
  # density; 12 scored lower on train queries (docs/decisions.md, "Stages 2 and 3").
  c.cpt.trajectory_length = 8
  c.cpt.order = "metric"            # metric | random | reversed (the order ablation)
  c.sft = ml_collections.ConfigDict()
  c.sft.context_size = 8            # as many as a query's seeds
  c.sft.tail_fraction = 0.2
  c.sft.low_fraction = 0.6          # seeds come from the low part of their pattern
  # With neighbour evidence: the share of examples whose own latent cluster is hidden from the
  # neighbourhood, so the model also learns seed sets of patterns with no train items nearby.
  c.sft.hide_cluster_prob = 0.5
  # Stage 4: candidate pools, pairs and the DPO loss (hppo.default_config documents fields).
  c.hppo = hppo.default_config()

  # Optimiser (engine.make_optimizer): AdamW, linear warm-up then cosine decay.
  c.learning_rate = 1e-3
  c.warmup_steps = 100
  c.weight_decay = 0.01
  c.grad_clip_norm = 1.0
  c.b1 = 0.9
  c.b2 = 0.99

  # Loop (engine.train_loop).
  c.num_steps = 600
  c.batch_size = 256
  c.ema_decay = 0.99                # a ~100-update average: a sixth of a 600-step run
  c.log_every = 50
  c.checkpoint_every = 300
  c.keep_checkpoints = 2
  c.fsdp = False

  if "tiny" in tokens:
    tokens.discard("tiny")
    c.model.width = 32
    c.model.depth = 2
    c.model.num_heads = 2
    c.diffusion.sample_steps = 4
    c.num_clusters = 30
    c.metric_predictor.num_steps = 300
    c.metric_predictor.hidden = (64,)
    c.num_steps = 300
    c.batch_size = 64
    c.warmup_steps = 20
    c.ema_decay = 0.9
    c.checkpoint_every = 100
    c.hppo.pool_queries = 32
    c.hppo.pool_every = 50
    c.hppo.policy_guidance = (1.0, 4.0)
    c.hppo.policy_noise_seeds = 1
    c.hppo.reference_guidance = (4.0,)
    c.hppo.oracle_index_kind = "exact"
  if tokens:
    raise ValueError(f"unknown config variant(s) {sorted(tokens)}")
  return c


def denoising_loss_fn(model: dit.DiT, config: ml_collections.ConfigDict):
  """The engine's `loss_fn(params, batch, rng)`: the denoising loss on batch targets.

  Targets are unit embeddings mapped to x0 by `target_space` (scaled, and anchored at the
  context's mean when `diffusion.anchored`); samples are mapped back and re-normalised.
  """
  space = models.target_space(config, model.dim)
  null_domain = model.num_domains
  drop = float(config.diffusion.cond_drop_prob)

  def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    cond = diffusion.Condition(batch["context"], batch["context_mask"], batch["domain"],
                               batch.get("evidence"))
    x0 = space.encode(batch["target"], cond)
    loss, _ = diffusion.training_loss(models.apply_fn(model), params, x0, cond, rng,
                                      null_domain, drop)
    return loss, {}

  return loss_fn


def _trajectory_source(config: ml_collections.ConfigDict, catalog: catalog_lib.Catalog,
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


def _batch_fn(config: ml_collections.ConfigDict, catalog: catalog_lib.Catalog, null_domain: int,
              dataset: str, workdir: str) -> Callable[[int, int, int], dict[str, np.ndarray]]:
  """The `batch_fn(step, process_index, process_count)` of stages 1-3."""
  if config.stage == "pretrain":
    source = data.SequencePrefixes(catalog.sequences, np.asarray(catalog.embeddings),
                                   config.model.max_context, null_domain, config.seed)
    return lambda step, pi, pc: source(step, config.batch_size, pi, pc)
  trajectory_source = _trajectory_source(config, catalog, dataset, workdir)
  if config.stage == "cpt":
    if config.cpt.trajectory_length > config.model.max_context:
      raise errors.UserError(
          f"cpt.trajectory_length {config.cpt.trajectory_length} exceeds model.max_context "
          f"{config.model.max_context}")
    source = trajectories.MetricOrderedTrajectories(
        trajectory_source, config.cpt.trajectory_length, config.cpt.order, null_domain,
        config.seed)
  else:
    source = trajectories.TailCentroidTargets(
        trajectory_source, config.sft.context_size, config.sft.tail_fraction,
        config.sft.low_fraction, null_domain, config.seed,
        # A model with positions reads its context in ascending density, as inference gives it.
        context_order="metric" if config.model.learned_positions else "random",
        evidence=models.neighbour_evidence(config, catalog, trajectory_source.assign),
        hide_cluster_prob=float(config.sft.get("hide_cluster_prob", 0.0)))
  return lambda step, pi, pc: source(step, config.batch_size, pi, pc)


def _hppo_loop_args(config: ml_collections.ConfigDict, catalog: catalog_lib.Catalog,
                    model: dit.DiT, reference: Any, dataset: str,
                    workdir: str) -> dict[str, Any]:
  """`train_loop` arguments of stage 4: DPO loss, pair batches, pool hook, frozen reference."""
  if not config.init_from:
    raise errors.UserError("the hppo stage starts from an SFT model: set config.init_from to "
                           "its workdir (it is also the frozen DPO reference)")
  every = int(config.hppo.pool_every)
  if every <= 0 or config.checkpoint_every % every:
    raise errors.UserError(
        f"config.checkpoint_every ({config.checkpoint_every}) must be a positive multiple of "
        f"hppo.pool_every ({every}): a resumed run rebuilds its pool at the checkpoint step")
  hppo.parse_policies(config.hppo.policies)
  source = _trajectory_source(config, catalog, dataset, workdir)
  oracle = oracle_lib.OnlineOracle(catalog, k=config.hppo.oracle_k,
                                   index_kind=config.hppo.oracle_index_kind)
  space = models.target_space(config, model.dim)
  pools = hppo.CandidatePools(catalog, source, oracle, models.apply_fn(model), reference,
                              config, model.num_domains, space,
                              models.sample_temperature(config),
                              models.neighbour_evidence(config, catalog))
  batches = hppo.PairBatches(pools, config)
  loss_fn = hppo.dpo_loss_fn(models.apply_fn(model), space, config.hppo.beta,
                             config.hppo.sft_weight)
  # A resumed run rebuilds its pool from the checkpoint's policy: exact only at a pool start.
  return dict(loss_fn=loss_fn, frozen_params=reference, before_step=batches.before_step,
              batch_fn=lambda step, pi, pc: batches(step, pi, pc, config.batch_size),
              resume_every=every)


# Parameters one stage's model may have and the next may not (see _fit_to_model).
_STAGE_SPECIFIC_PARAMS = ("context_pos", "evidence_embed", "evidence_slot")


def _fit_to_model(restored: Any, model: dit.DiT, config: ml_collections.ConfigDict) -> Any:
  """An earlier stage's parameters, fitted to this stage's model.

  The only differences allowed are `_STAGE_SPECIFIC_PARAMS`: stage 2 adds a learned position
  table to a stage-1 model (freshly initialised) and stage 3 drops it (seed sets have no
  order); a model that reads neighbour evidence adds its evidence projection and slots.
  Anything else that differs is a wrong `init_from` and is refused.
  """
  shapes = jax.eval_shape(lambda: dit.init_params(model, jax.random.PRNGKey(config.seed)))
  fitted = dict(restored)
  fresh = None
  for name in _STAGE_SPECIFIC_PARAMS:
    if name in fitted and name not in shapes:
      logging.info("Dropping %s of %s: this model has none", name, config.init_from)
      del fitted[name]
    if name in shapes and name not in fitted:
      logging.info("Adding freshly initialised %s to %s", name, config.init_from)
      if fresh is None:
        fresh = jax.device_get(dit.init_params(model, jax.random.PRNGKey(config.seed)))
      fitted[name] = jax.tree.map(np.asarray, fresh[name])
  expected = jax.tree.map(lambda x: tuple(x.shape), shapes)
  found = jax.tree.map(lambda x: tuple(np.shape(x)), fitted)
  if found != expected:
    raise errors.UserError(
        f"the checkpoint in {config.init_from} does not fit this stage's model (width "
        f"{model.width}, depth {model.depth}, d {model.dim}, {model.num_domains} domains): "
        "start from a run of the same model config")
  return fitted


def _resolve_sizes(config: ml_collections.ConfigDict,
                   catalog: catalog_lib.Catalog) -> ml_collections.ConfigDict:
  """`config` with the sizes left at 0 taken from their rules on `catalog` (docs/sizing.md).

  The latent clusters, and an anchored model's target scale; the run config records the
  values, so inference never needs the rules again.
  """
  resolved = ml_collections.ConfigDict(config.to_dict())
  if not resolved.num_clusters and resolved.stage != "pretrain":
    resolved.num_clusters = sizing.num_latent_clusters(len(catalog.train_items()),
                                                       sizing.train_seed_size(catalog))
    logging.info("num_clusters = %d (one per %d seed sets of train items)",
                 resolved.num_clusters, sizing.SEED_SETS_PER_CLUSTER)
  if not resolved.diffusion.target_scale and resolved.diffusion.anchored:
    resolved.diffusion.target_scale = sizing.anchored_target_scale(catalog)
    logging.info("diffusion.target_scale = %.4g (sqrt(d) / the seed-set spread)",
                 resolved.diffusion.target_scale)
  return resolved


def train(config: ml_collections.ConfigDict, dataset: str, workdir: str) -> engine.TrainState:
  """Trains the stage `config.stage` on the catalog at `dataset` into `workdir` (resumable)."""
  if config.stage not in STAGES:
    raise errors.UserError(f"unknown stage {config.stage!r}; known: {', '.join(STAGES)}")
  # Before anything is read or written: a refused run leaves no run config in `workdir`.
  engine.validate_config(config)
  if config.stage == "hppo" and config.model.learned_positions:
    raise errors.UserError("the hppo stage does not support model.learned_positions: its pools "
                           "and pairs give the model seed sets in no order")
  if config.model.get("neighbour_evidence", ()) and config.stage not in EVIDENCE_STAGES:
    raise errors.UserError(
        f"model.neighbour_evidence is read by the {' and '.join(EVIDENCE_STAGES)} stages only; "
        f"the {config.stage} stage's batches have none")
  catalog = catalog_lib.load_catalog(dataset)
  config = _resolve_sizes(config, catalog)
  model = models.make_model(config.model, catalog.dim, catalog.num_domains)
  if config.init_from:
    logging.info("Initialising from %s", config.init_from)
    init_params = _fit_to_model(engine.restore_params(config.init_from, use_ema=True), model,
                                config)
  else:
    init_params = jax.device_get(dit.init_params(model, jax.random.PRNGKey(config.seed)))
  if config.stage == "hppo":
    # The reference is the starting (SFT) model itself, kept frozen outside the state.
    loop_args = _hppo_loop_args(config, catalog, model, init_params, dataset, workdir)
  else:
    loop_args = dict(loss_fn=denoising_loss_fn(model, config),
                     batch_fn=_batch_fn(config, catalog, model.num_domains, dataset, workdir))
  run_dir.write_run_config(workdir, config, catalog.dim, catalog.num_domains, dataset)
  return engine.train_loop(config, workdir, init_params=init_params, **loop_args)
