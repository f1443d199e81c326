"""Stage training on top of the shared engine: model, loss and batches per stage.

Every stage trains the same DiT with the same denoising objective through `engine.train_loop`;
a stage only decides what the context, the domain and the target of an example are (its batch
function) and which earlier checkpoint it starts from (`config.init_from`). The workdir gets a
`config.json` so that evaluation can rebuild the model that a checkpoint belongs to.
"""

import json
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import data
from modit_jax import diffusion
from modit_jax import dit
from modit_jax import engine
from modit_jax import errors

STAGES = ("pretrain",)
CONFIG_FILE = "config.json"


def make_model(model_config: ml_collections.ConfigDict, dim: int, num_domains: int) -> dit.DiT:
  """The DiT of `model_config` for embeddings of `dim` and `num_domains` domains."""
  return dit.DiT(dim=dim, num_domains=num_domains, width=model_config.width,
                 depth=model_config.depth, num_heads=model_config.num_heads,
                 mlp_ratio=model_config.mlp_ratio, max_context=model_config.max_context,
                 learned_positions=model_config.learned_positions)


def apply_fn(model: dit.DiT) -> Callable[..., jnp.ndarray]:
  """`(params, x_t, t, context, context_mask, domain) -> x0 prediction` for `model`."""
  return lambda params, *args: model.apply({"params": params}, *args)


def denoising_loss_fn(model: dit.DiT, config: ml_collections.ConfigDict):
  """The engine's `loss_fn(params, batch, rng)`: the denoising loss on batch targets.

  Targets are unit embeddings scaled by `config.diffusion.target_scale` (sqrt(d) gives unit
  per-coordinate variance, the scale the noise schedule assumes); samples are re-normalised.
  """
  scale = float(config.diffusion.target_scale)
  null_domain = model.num_domains
  drop = float(config.diffusion.cond_drop_prob)

  def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    cond = diffusion.Condition(batch["context"], batch["context_mask"], batch["domain"])
    loss, _ = diffusion.training_loss(apply_fn(model), params, batch["target"] * scale, cond,
                                      rng, null_domain, drop)
    return loss, {}

  return loss_fn


def write_run_config(workdir: str, config: ml_collections.ConfigDict, dim: int,
                     num_domains: int) -> None:
  """Records what a checkpoint in `workdir` is: the config and the catalog's shape."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    json.dump({"config": json.loads(config.to_json_best_effort()), "dim": dim,
               "num_domains": num_domains}, f, indent=1)
    f.write("\n")


def read_run_config(workdir: str) -> tuple[ml_collections.ConfigDict, int, int]:
  """(config, dim, num_domains) of a training workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise errors.UserError(f"{workdir} is not a training workdir (no {CONFIG_FILE})")
  with open(path) as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(saved["config"]), saved["dim"], saved["num_domains"]


def _batch_fn(config: ml_collections.ConfigDict, catalog: catalog_lib.Catalog,
              null_domain: int) -> Callable[[int, int, int], dict[str, np.ndarray]]:
  if config.stage == "pretrain":
    prefixes = data.SequencePrefixes(catalog.sequences, np.asarray(catalog.embeddings),
                                     config.model.max_context, null_domain, config.seed)
    return lambda step, pi, pc: prefixes(step, config.batch_size, pi, pc)
  raise errors.UserError(f"unknown stage {config.stage!r}; known: {', '.join(STAGES)}")


def train(config: ml_collections.ConfigDict, dataset: str, workdir: str) -> engine.TrainState:
  """Trains the stage `config.stage` on the catalog at `dataset` into `workdir` (resumable)."""
  catalog = catalog_lib.load_catalog(dataset)
  model = make_model(config.model, catalog.dim, catalog.num_domains)
  batch_fn = _batch_fn(config, catalog, model.num_domains)
  if config.init_from:
    logging.info("Initialising from %s", config.init_from)
    init_params = engine.restore_params(config.init_from, use_ema=True)
  else:
    init_params = jax.device_get(dit.init_params(model, jax.random.PRNGKey(config.seed)))
  write_run_config(workdir, config, catalog.dim, catalog.num_domains)
  return engine.train_loop(config, workdir, init_params=init_params,
                           loss_fn=denoising_loss_fn(model, config), batch_fn=batch_fn)
