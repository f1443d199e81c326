"""Training one stage: the stage config's schema, and `train`, the same for every stage.

What a stage trains on (its batches, its loss, its hooks) is its module in `modit_jax.stages`;
`train` resolves the config's sizes on the catalog, builds the model, fits the earlier stage's
checkpoint to it (`config.init_from`), records the run directory (`run_dir`, with the model's
facts, so that evaluation and serving rebuild the model without this module) and runs the
shared `engine.train_loop`.
"""

from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import dit
from modit_jax import engine
from modit_jax import errors
from modit_jax import hppo
from modit_jax import metric_predictor
from modit_jax import models
from modit_jax import retrieval
from modit_jax import run_dir
from modit_jax import sizing
from modit_jax import stages
from modit_jax import variants
from modit_jax.stages import base as stages_base

# The neighbourhood sizes of the conditioned stages' evidence when it is on (docs/evidence.md):
# the span of local_shift's validation grid, from a pattern's core to its siblings.
NEIGHBOUR_EVIDENCE = (50, 200, 800)
# What the conditioned stages (SFT, HPPO) read of the catalog around their seeds by default:
# the unlabelled offsets of the 200 and 800 nearest catalog items, the anchor stepped twice
# along the first (docs/evidence.md, "The catalog around the seeds as evidence": on the
# development world the model alone rose by +0.02 to +0.03 Joint@20 on item holdout and by
# +0.03 to +0.12 on pattern holdout).
CATALOG_OFFSETS = (200, 800)
ANCHOR_OFFSET_STEP = 2.0


def set_catalog_offsets(c: ml_collections.ConfigDict, read: bool) -> None:
  """Sets a conditioned stage's config to read the catalog offsets or not.

  Reading: the offset tokens of `CATALOG_OFFSETS`, the targets anchored `ANCHOR_OFFSET_STEP`
  along the first (SFT and HPPO share them, as HPPO's model is SFT's). Not reading: no tokens,
  no step, and an HPPO config's pool loses its `catalog_offset` candidates; the three were
  measured only together (docs/evidence.md). Reading adds no candidate: a pool without them
  (the `hppo_no_catalog_offset` ablation) stays so.
  """
  c.model.catalog_offsets = CATALOG_OFFSETS if read else ()
  c.diffusion.anchor_offset_step = ANCHOR_OFFSET_STEP if read else 0.0
  if not read and c.stage == "hppo":
    c.hppo.policies = ",".join(p for p in variants.split(c.hppo.policies)
                               if p != "catalog_offset")


def default_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The schema of every stage config; `configs/<stage>.py` start from it.

  Args:
    variant: comma-separated tokens; `tiny` gives the test-sized model and schedule.
  """
  tokens = set(variants.parse(variant, ("tiny",), "stage"))
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
  # Neighbourhood sizes of the unlabelled offsets over the whole catalog a conditioned model
  # reads (evidence tokens: the mean of the n catalog items nearest the seeds minus the seeds'
  # mean, what the neighbourhood_offset baseline steps along). (): none.
  c.model.catalog_offsets = ()
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
  # > 0 (with model.catalog_offsets): the anchor also steps this far along the first catalog
  # offset, so the model generates its displacement from the neighbourhood_offset query's
  # unshifted part (diffusion.TargetSpace). 0: the seeds' mean alone.
  c.diffusion.anchor_offset_step = 0.0
  c.diffusion.cond_drop_prob = 0.1
  c.diffusion.sample_steps = 8
  # The sampler's start x_1 ~ N(0, temperature^2 I). 0: the deterministic path from x_1 = 0,
  # the model's most central answer; on the real catalog it kept stage 1's Purity@20 at 0.68
  # against 0.51 at temperature 1, and on the default world it changed Joint@20 by < 0.02
  # (docs/diffusion.md). A query wants one good answer, not a draw from the distribution.
  c.diffusion.sample_temperature = 0.0
  c.diffusion.guidance_scale = 1.0

  # Stage 1's sequences: "raw" (the catalog's), "walks" (nearest-neighbour walks over the train
  # items), "auto": raw, or walks when the catalog has none (docs/decisions.md, "Stage 1
  # without usable sequences").
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.sequences = "auto"
  c.pretrain.walk_neighbours = 10   # a walk's next item: one of the current item's 10 nearest
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
  # Devices the train step is data-parallel over: 0 = `engine.train_mesh`'s rule (every device,
  # but one CPU device for wide models), N = the first N.
  c.mesh_devices = 0

  if "tiny" in tokens:
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
  return c


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


def _resolved(config: ml_collections.ConfigDict,
              dataset: str) -> tuple[ml_collections.ConfigDict, catalog_lib.Catalog]:
  """The config with its catalog-derived sizes, and the catalog (memory-mapped: batches and the
  data path read rows by id, and at 10M items a full read would hold 2.6 GB of embeddings the
  step never needs at once)."""
  catalog = catalog_lib.load_catalog(dataset, mmap=True)
  return _resolve_sizes(config, catalog), catalog


def check_finished_run(config: ml_collections.ConfigDict, dataset: str, workdir: str) -> None:
  """Refuses to reuse the finished run in `workdir` unless it trained `config` on `dataset`'s
  catalog (`run_dir.check_same_run`): a skipped run stands for the config asked for."""
  run_dir.check_same_run(workdir, *_resolved(config, dataset))


def train(config: ml_collections.ConfigDict, dataset: str, workdir: str,
          catalog_index: retrieval.Index | None = None) -> engine.TrainState:
  """Trains the stage `config.stage` on the catalog at `dataset` into `workdir` (resumable).

  `catalog_index`: an index over the catalog's embeddings the caller holds (the pipeline's
  serving index), reused for the catalog offsets when it is the default one
  (`evidence.offset_index`), so a pipeline builds that index once instead of once per run.
  """
  stage = stages.get(config.stage)
  # Before anything is read or written: a refused run leaves no run config in `workdir`.
  engine.validate_config(config)
  stage.check(config)
  if any(models.evidence_sizes(config.model)) and not stage.reads_evidence:
    readers = [name for name in stages.names() if stages.get(name).reads_evidence]
    raise errors.UserError(
        f"model.neighbour_evidence and model.catalog_offsets are read by the "
        f"{' and '.join(readers)} stages only; "
        f"the {config.stage} stage's batches have none")
  config, catalog = _resolved(config, dataset)
  if run_dir.latest_step(workdir):  # a resume: only of the same run
    run_dir.check_same_run(workdir, config, catalog)
  model = models.make_model(config.model, catalog.dim, catalog.num_domains)
  mesh = engine.train_mesh(dit.flops_per_example(model, model.max_context),
                           int(config.mesh_devices))
  engine.validate_config(config, mesh)  # the batch must split over the mesh chosen
  if config.init_from:
    logging.info("Initialising from %s", config.init_from)
    init_params = _fit_to_model(engine.restore_params(config.init_from, use_ema=True), model,
                                config)
  else:
    init_params = jax.device_get(dit.init_params(model, jax.random.PRNGKey(config.seed)))
  loop_args = stage.loop_args(stages_base.Inputs(config, catalog, model, init_params, dataset,
                                                 workdir, catalog_index))
  run_dir.write_run_config(workdir, config, catalog.dim, catalog.num_domains,
                           stage.facts(config), dataset, run_dir.catalog_fingerprint(catalog))
  return engine.train_loop(config, workdir, init_params=init_params, mesh=mesh, **loop_args)
