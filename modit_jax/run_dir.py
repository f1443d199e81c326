"""A training run directory: what a checkpoint is, and loading it back.

A run directory holds, besides the engine's `checkpoints/` and metric files:

  config.json            the run's resolved config, the catalog's shape (`dim`, `num_domains`),
                         the catalog path it was trained on and its manifest's digest
                         (`catalog_fingerprint`: a run resumes or is reused only for the same
                         config and catalog, `check_same_run`), and `facts` (`ModelFacts`):
                         what inference must know about the trained model;
  data_diagnostics.npz   stages 2-4's data path: latent clusters, the metric predictor's
                         validation and parameters (a learned-positions model orders its seeds
                         with that predictor at inference).

Training writes it (`write_run_config`, `save_npz_atomically`); evaluation and serving read it
here, and nothing of the training stack is needed to load a model (`load`).
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import dit
from modit_jax import engine
from modit_jax import errors
from modit_jax import metric_predictor
from modit_jax import models

CONFIG_FILE = "config.json"
# Latent clusters, the metric predictor's validation and its parameters.
DIAGNOSTICS_FILE = "data_diagnostics.npz"


@dataclasses.dataclass(frozen=True)
class ModelFacts:
  """What inference must know about a trained model, recorded when it is trained."""
  stage: str
  conditioned: bool        # it reads a domain token (False: ask it with the null domain)
  learned_positions: bool  # it reads its context in ascending predicted density

  @classmethod
  def of_legacy_run(cls, config: ml_collections.ConfigDict) -> "ModelFacts":
    """The facts of a run written before they were recorded, from its config.

    Such runs come from the four built-in stages, of which only stage 1 ("pretrain") never
    saw a domain token. Every run written since records its stage's own facts.
    """
    return cls(str(config.stage), config.stage != "pretrain",
               bool(config.model.learned_positions))


# Fields that say how a run is carried out or where its inputs lie, not what it trains: a run
# may be resumed or reused with them changed (its parent is checked as a run of its own). The
# matmul precision, the parameter sharding and the mesh change results within rounding only, as
# the device count does (docs/engine.md).
_BOOKKEEPING_FIELDS = frozenset(
    {"checkpoint_every", "keep_checkpoints", "log_every", "init_from", "data_cache",
     "model.dtype", "fsdp", "mesh_devices"})
_ABSENT = "(absent)"
# Fields added after runs were saved, with the value that means what their absence meant: a
# run saved before such a field stays reusable while the field keeps that value.
# (The values are those of `training.default_config()`; a test keeps them equal.)
_SAME_AS_ABSENT = {"model.catalog_offsets": [], "diffusion.anchor_offset_step": 0.0,
                   "hppo.offset_size": 200, "hppo.offset_shifts": [0.0, 0.4, 0.8],
                   "hppo.offset_steps": [2.0, 6.0, 12.0]}


def catalog_fingerprint(catalog: catalog_lib.Catalog) -> str:
  """A short digest of the catalog's manifest (its source, options, sizes, seed): what a run
  trained on, wherever the catalog directory now lies."""
  text = json.dumps(catalog.manifest, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_run_config(workdir: str, config: ml_collections.ConfigDict, dim: int,
                     num_domains: int, facts: ModelFacts, dataset: str = "",
                     catalog: str = "") -> None:
  """Records what a checkpoint in `workdir` is: the config, the catalog's shape, path and
  `catalog_fingerprint`."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    json.dump({"config": json.loads(config.to_json_best_effort()), "dim": dim,
               "num_domains": num_domains,
               "dataset": os.path.abspath(dataset) if dataset else "",
               "catalog": catalog,
               "facts": dataclasses.asdict(facts)}, f, indent=1)
    f.write("\n")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return flat


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """`field: saved -> new` for every field whose value differs between a saved run config
  (as read from its JSON) and `config`, bookkeeping fields aside."""
  old = _flatten(saved)
  new = _flatten(json.loads(config.to_json_best_effort()))
  changes = []
  for field in sorted(set(old) | set(new)):
    if field in _BOOKKEEPING_FIELDS or field.split(".")[0] in _BOOKKEEPING_FIELDS:
      continue
    before, after = old.get(field, _ABSENT), new.get(field, _ABSENT)
    if field in _SAME_AS_ABSENT:
      before, after = (_ABSENT if v == _SAME_AS_ABSENT[field] else v for v in (before, after))
    if before != after:
      changes.append(f"{field}: {before} -> {after}")
  return changes


def check_same_run(workdir: str, config: ml_collections.ConfigDict,
                   catalog: catalog_lib.Catalog) -> None:
  """Refuses to resume or reuse the run in `workdir` for another config or catalog.

  A resumed run with another config would mix two trainings in one checkpoint, and a finished
  run reused for another config would be reported as that config's model.

  Raises:
    errors.UserError: naming what differs, when `workdir` holds a run config that does.
  """
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    return
  saved = _read_run_file(workdir)
  changes = config_changes(saved["config"], config)
  fingerprint = catalog_fingerprint(catalog)
  if (saved["dim"], saved["num_domains"]) != (catalog.dim, catalog.num_domains):
    changes.append(f"catalog shape: d {saved['dim']}, {saved['num_domains']} domains -> "
                   f"d {catalog.dim}, {catalog.num_domains} domains")
  # Runs written before the fingerprint was recorded are compared by their config alone.
  elif saved.get("catalog") and saved["catalog"] != fingerprint:
    changes.append(f"catalog: manifest {saved['catalog']} -> {fingerprint}")
  if changes:
    shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5
                                       else "")
    raise errors.UserError(
        f"{workdir} holds a run trained with another config or catalog ({shown}): resuming "
        "or reusing it would report one training as another. Give a new workdir, or remove "
        "that run to train it again")


def latest_step(workdir: str) -> int:
  """The workdir's newest checkpoint step (0: none)."""
  if not os.path.isdir(os.path.join(workdir, engine.CHECKPOINT_SUBDIR)):
    return 0
  checkpointer = engine.Checkpointer(workdir)
  try:
    return checkpointer.latest_step() or 0
  finally:
    checkpointer.close()


def _read_run_file(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise errors.UserError(f"{workdir} is not a training workdir (no {CONFIG_FILE})")
  with open(path) as f:
    return json.load(f)


def _config(saved: dict[str, Any]) -> tuple[ml_collections.ConfigDict, int, int]:
  return ml_collections.ConfigDict(saved["config"]), saved["dim"], saved["num_domains"]


def read_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, int, int]:
  """(config, dim, num_domains) of a training workdir."""
  return _config(_read_run_file(workdir))


def _facts(saved: dict[str, Any]) -> ModelFacts:
  # A run written before the facts were recorded gets them from its config, by the rule that
  # wrote them since.
  if "facts" in saved:
    return ModelFacts(**saved["facts"])
  return ModelFacts.of_legacy_run(_config(saved)[0])


def read_facts(workdir: str) -> ModelFacts:
  """The `ModelFacts` recorded in a training workdir (from its config if older)."""
  return _facts(_read_run_file(workdir))


def run_dataset(workdir: str) -> str:
  """The absolute catalog path a training workdir was trained on ("" if not recorded)."""
  return _read_run_file(workdir).get("dataset", "")


def save_npz_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Process 0 writes; readers never see a partial file (processes may share a cache)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  partial = f"{path}.partial"
  catalog_lib.save_npz(partial, **arrays)
  os.replace(partial, path)


def saved_predictor(workdir: str) -> metric_predictor.MetricPredictor:
  """The metric predictor saved with a stage 2-4 run (`DIAGNOSTICS_FILE`)."""
  path = os.path.join(workdir, DIAGNOSTICS_FILE)
  if os.path.isfile(path):
    with np.load(path) as saved:
      if metric_predictor.has_saved(saved.files):
        return metric_predictor.MetricPredictor.from_arrays(
            {name: saved[name] for name in saved.files})
  raise errors.UserError(
      f"the model in {workdir} has learned positions and orders its seeds by the metric "
      f"predictor, but {path} holds no saved predictor: retrain the run with this version")


@dataclasses.dataclass
class Run:
  """A trained model loaded from its run directory."""
  config: ml_collections.ConfigDict
  dim: int
  num_domains: int
  facts: ModelFacts
  model: dit.DiT
  params: Any  # the EMA parameters of the latest checkpoint


def load(workdir: str) -> Run:
  """The model of a training workdir with the EMA parameters of its latest checkpoint."""
  saved = _read_run_file(workdir)  # once: config and facts
  config, dim, num_domains = _config(saved)
  return Run(config, dim, num_domains, _facts(saved),
             models.make_model(config.model, dim, num_domains),
             engine.restore_params(workdir, use_ema=True))
