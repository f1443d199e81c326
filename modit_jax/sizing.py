"""The sizes the pipeline takes from the catalog it is given (docs/sizing.md).

Every size that depends on the catalog follows from what training may read (DESIGN §2): the
embedding dimension, the number of train items and the train queries' seed-set size. Nothing here
reads the ground-truth patterns, their count, or held-out items. `choose` returns the sizes with
the rule behind each, so the pipeline can print and record them; a size set explicitly in the
pipeline config wins over its rule.
"""

import dataclasses
import math

import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import errors

# Train items per latent cluster, in seed sets. A cluster is the region that SFT's seed-like
# context and tail-centroid target are drawn from, so it should be about as wide as the region
# a seed set stands for: 10 seed sets' worth of items, whose tail (sft.tail_fraction 0.2) holds
# 2 seed sets' worth. Clusters twice that size put the tail centroid outside the seeds' pattern
# on the real catalog (docs/sizing.md has the measurement).
SEED_SETS_PER_CLUSTER = 10
# Model width per embedding dimension: d / 3, in multiples of 32, between 64 and 512. The
# default world (d = 64) keeps its width of 64; a 384-d text-encoder catalog gets 128, a
# 768-d one 256. Wider models cost the pipeline's time budget (docs/sizing.md has the numbers).
WIDTH_PER_DIM = 1 / 3
WIDTH_MULTIPLE = 32
MIN_WIDTH, MAX_WIDTH = 64, 512
# The DiT's context table: at least 16 (the stage configs' default), and always room for a seed
# set plus the longest trajectory prefix (both are the seed-set size).
MIN_CONTEXT = 16


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Catalog-dependent sizes of every training run, each with the rule that chose it."""
  seed_size: int
  num_clusters: int
  width: int
  max_context: int
  target_scale: float
  rules: dict[str, str]
  # Whether SFT and HPPO read the catalog offsets (the pipeline's validation rule, not a size:
  # `workflow.catalog_offsets_rule`, docs/sizing.md); True until the pipeline decides.
  catalog_offsets: bool = True

  def as_dict(self) -> dict[str, object]:
    """The sizes and their rules, for `OUT/sizes.json`."""
    return dataclasses.asdict(self)

  def lines(self) -> list[str]:
    """One printable line per size: `name = value (rule)`."""
    values = dataclasses.asdict(self)
    return [f"{name} = {values[name]:g} ({rule})" if isinstance(values[name], float) else
            f"{name} = {values[name]} ({rule})" for name, rule in self.rules.items()]


def model_width(dim: int) -> int:
  """The DiT width for embeddings of `dim`: dim / 3 in multiples of 32, clipped to [64, 512]."""
  raw = dim * WIDTH_PER_DIM
  width = WIDTH_MULTIPLE * max(1, round(raw / WIDTH_MULTIPLE))
  return int(min(MAX_WIDTH, max(MIN_WIDTH, width)))


def num_latent_clusters(num_train_items: int, seed_size: int) -> int:
  """k of the latent clusters: one per `SEED_SETS_PER_CLUSTER` seed sets of train items, >= 2."""
  return int(max(2, round(num_train_items / (SEED_SETS_PER_CLUSTER * seed_size))))


# The metric predictor's regions (metric_predictor.RelativeFeatures) are coarser than the latent
# clusters: about a pattern's worth of train items each. On the development world 2x coarser
# than the latent clusters gave the best held-out AUC of 1x, 2x and 4x (docs/evidence.md).
SEED_SETS_PER_PREDICTOR_REGION = 2 * SEED_SETS_PER_CLUSTER


def num_predictor_regions(num_train_items: int, seed_size: int) -> int:
  """Regions of the predictor's relative features: one per 20 seed sets of train items, >= 2."""
  return int(max(2, round(num_train_items / (SEED_SETS_PER_PREDICTOR_REGION * seed_size))))


def seed_set_spread(catalog: catalog_lib.Catalog) -> float:
  """RMS distance of a train query's seed from its seed set's mean (unbiased for the set size).

  The size of the region a seed set stands for, and so of the displacements an anchored model
  generates from a seed set's mean.
  """
  seeds = catalog.queries["train"].seeds
  size = seeds.shape[1]
  if size < 2:
    raise errors.UserError("the target scale rule needs seed sets of 2 or more items")
  emb = np.asarray(catalog.embeddings[seeds.reshape(-1)], np.float64).reshape(
      seeds.shape + (catalog.dim,))
  spread = ((emb - emb.mean(axis=1, keepdims=True)) ** 2).sum(axis=-1).mean()
  return float(np.sqrt(spread * size / (size - 1)))


def anchored_target_scale(catalog: catalog_lib.Catalog) -> float:
  """sqrt(d) / the seed-set spread: an anchored model's displacements at unit coordinate scale."""
  return math.sqrt(catalog.dim) / seed_set_spread(catalog)


def train_seed_size(catalog: catalog_lib.Catalog) -> int:
  """The seed-set size of the catalog's train queries (what training may read of queries)."""
  return int(catalog.queries["train"].seeds.shape[1])


def choose(catalog: catalog_lib.Catalog, seed_size: int = 0, num_clusters: int = 0,
           width: int = 0) -> Sizes:
  """The sizes for `catalog`; a non-zero argument is used as given instead of its rule."""
  num_train = len(catalog.train_items())
  rules = {}
  if seed_size:
    rules["seed_size"] = "set in the config"
  else:
    seed_size = train_seed_size(catalog)
    rules["seed_size"] = "the train queries' seed-set size"
  if seed_size < 1:
    raise errors.UserError(f"seed_size must be positive, got {seed_size}")
  if num_train < 4 * seed_size:
    raise errors.UserError(
        f"the catalog has {num_train} train items; the latent clusters need at least "
        f"{4 * seed_size} (4 seed sets of {seed_size})")
  if num_clusters:
    rules["num_clusters"] = "set in the config"
  else:
    num_clusters = num_latent_clusters(num_train, seed_size)
    rules["num_clusters"] = (f"{num_train} train items / ({SEED_SETS_PER_CLUSTER} x seed_size "
                             f"{seed_size})")
  if width:
    rules["width"] = "set in the config"
  else:
    width = model_width(catalog.dim)
    rules["width"] = (f"d {catalog.dim} / 3 in multiples of {WIDTH_MULTIPLE}, in "
                      f"[{MIN_WIDTH}, {MAX_WIDTH}]")
  max_context = max(MIN_CONTEXT, seed_size + 1)
  rules["max_context"] = f"max({MIN_CONTEXT}, seed_size + 1)"
  spread = seed_set_spread(catalog)
  target_scale = anchored_target_scale(catalog)
  rules["target_scale"] = (f"sqrt(d) / seed-set spread: d = {catalog.dim}, spread "
                           f"{spread:.3f}")
  return Sizes(seed_size=seed_size, num_clusters=num_clusters, width=width,
               max_context=max_context, target_scale=target_scale,
               rules=rules)
