"""The model factory: a run config's `model` and `diffusion` fields made into a DiT and its
sampling space.

Training builds its model here, and inference (`generator.Generator`) rebuilds the model of a
saved run here, from the run's recorded config (`run_dir`); neither needs the other's code.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import diffusion
from modit_jax import dit
from modit_jax import errors
from modit_jax import evidence as evidence_lib
from modit_jax import retrieval

# `model.dtype` names; a config saved before the field existed means float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, field: str = "model.dtype", may_be_empty: bool = False) -> Any:
  """The dtype that `COMPUTE_DTYPES` names `name`; any other name is a UserError naming `field`.

  `may_be_empty` only words the error for a field where "" means the default.
  """
  if name not in COMPUTE_DTYPES:
    raise errors.UserError(f"{field} must be {'empty or ' if may_be_empty else ''}one of "
                           f"{', '.join(COMPUTE_DTYPES)}; got {name!r}")
  return COMPUTE_DTYPES[name]


def make_model(model_config: ml_collections.ConfigDict, dim: int, num_domains: int) -> dit.DiT:
  """The DiT of `model_config` for embeddings of `dim` and `num_domains` domains.

  A model config that cannot build a DiT is a UserError naming the field.
  """
  for field in ("width", "depth", "num_heads", "mlp_ratio", "max_context"):
    value = model_config[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise errors.UserError(f"model.{field} must be a positive integer, got {value!r}")
  if model_config.width % model_config.num_heads:
    raise errors.UserError(f"model.width {model_config.width} must be divisible by "
                           f"model.num_heads {model_config.num_heads}")
  sizes, catalog_sizes = evidence_sizes(model_config)
  return dit.DiT(dim=dim, num_domains=num_domains, width=model_config.width,
                 depth=model_config.depth, num_heads=model_config.num_heads,
                 mlp_ratio=model_config.mlp_ratio, max_context=model_config.max_context,
                 learned_positions=model_config.learned_positions,
                 num_evidence=evidence_lib.num_tokens(sizes, catalog_sizes),
                 dtype=compute_dtype(model_config.get("dtype", "float32")))


def apply_fn(model: dit.DiT) -> Callable[..., jnp.ndarray]:
  """`(params, x_t, t, context, context_mask, domain[, evidence]) -> x0 prediction`."""
  return lambda params, *args: model.apply({"params": params}, *args)


def sample_temperature(config: ml_collections.ConfigDict) -> float:
  """The sampler's temperature; a run config saved before the field existed means 1."""
  value = float(config.diffusion.get("sample_temperature", 1.0))
  if value < 0:
    raise errors.UserError(f"diffusion.sample_temperature must be >= 0; got {value}")
  return value


def target_space(config: ml_collections.ConfigDict, dim: int) -> diffusion.TargetSpace:
  """How unit targets map to the diffusion's x0 (`diffusion.TargetSpace`).

  The scale is `diffusion.target_scale`, or sqrt(dim) when it is 0: unit per-coordinate variance
  for unit targets, the scale the noise schedule (and the sampler's N(0, I) start) assume,
  whatever the catalog's dimension. A run config saved before `diffusion.anchored` existed
  means unanchored.
  """
  scale = float(config.diffusion.target_scale)
  if scale < 0:
    raise errors.UserError(f"diffusion.target_scale must be >= 0 (0: sqrt(d)); got {scale}")
  anchored = bool(config.diffusion.get("anchored", False))
  step = float(config.diffusion.get("anchor_offset_step", 0.0))
  token = -1
  if step:
    sizes, catalog_sizes = evidence_sizes(config.model)
    if not anchored or not catalog_sizes or step < 0:
      raise errors.UserError(
          "diffusion.anchor_offset_step > 0 needs diffusion.anchored and model.catalog_offsets "
          f"(its anchor steps along the first catalog offset); got step {step}, anchored "
          f"{anchored}, catalog_offsets {catalog_sizes}")
    token = evidence_lib.num_tokens(sizes, catalog_sizes) - len(catalog_sizes)
  return diffusion.TargetSpace(scale or math.sqrt(dim), anchored, token, step)


def neighbour_evidence(config: ml_collections.ConfigDict, catalog: catalog_lib.Catalog,
                       groups: np.ndarray | None = None,
                       catalog_index: retrieval.Index | None = None
                       ) -> evidence_lib.NeighbourEvidence | None:
  """The evidence a model of `config` reads on `catalog` (None: it reads none).

  `groups` (the latent cluster of each train item) lets training hide a seed set's own
  cluster; `catalog_index`, an index the caller holds over `catalog.embeddings`, is reused for
  the catalog offsets when it is the default one (`evidence.offset_index`).
  """
  sizes, catalog_sizes = evidence_sizes(config.model)
  if not sizes and not catalog_sizes:
    return None
  scale = target_space(config, catalog.dim).scale
  return evidence_lib.NeighbourEvidence(catalog, sizes, scale, groups, catalog_sizes,
                                         catalog_index)


def evidence_sizes(model_config: ml_collections.ConfigDict
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(labelled sizes, catalog sizes) of a model's evidence; a run config saved before
  `model.catalog_offsets` existed reads none of the latter."""
  return (evidence_lib.check_sizes(tuple(model_config.get("neighbour_evidence", ()))),
          evidence_lib.check_sizes(tuple(model_config.get("catalog_offsets", ())),
                                   "model.catalog_offsets"))


def denoising_loss_fn(model: dit.DiT, config: ml_collections.ConfigDict):
  """The engine's `loss_fn(params, batch, rng)`: the denoising loss on batch targets.

  Targets are unit embeddings mapped to x0 by `target_space` (scaled, and anchored at the
  context's mean when `diffusion.anchored`); samples are mapped back and re-normalised.
  """
  space = target_space(config, model.dim)
  null_domain = model.num_domains
  drop = float(config.diffusion.cond_drop_prob)

  def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
    cond = diffusion.Condition(batch["context"], batch["context_mask"], batch["domain"],
                               batch.get("evidence"))
    x0 = space.encode(batch["target"], cond)
    loss, _ = diffusion.training_loss(apply_fn(model), params, x0, cond, rng,
                                      null_domain, drop)
    return loss, {}

  return loss_fn
