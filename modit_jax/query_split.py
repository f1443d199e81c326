"""Train queries split into those that may train a model and those that only choose knobs.

A knob chosen on the queries a model was trained on is chosen in-sample: the guidance scale
used to be tuned on train queries of which a quarter had also built HPPO's pools. Here every
train query has one role:

  fit         may train a model (HPPO's candidate pools);
  validation  only scores knobs (guidance scales, shift sizes, pool and neighbourhood sizes)
              and picks the per-cell strongest competitor.

The split is by latent group, not by query: queries whose seed sets lie in the same region
(the same pattern, in a world with patterns) must not sit on both sides, or a knob would be
scored on a pattern the model trained on. The groups are k-means clusters of the queries' seed
centroids (no hidden truth is read, not even the number of patterns), and whole groups are
drawn, seeded, until `VALIDATION_FRACTION` of the queries are validation queries. Everything is
a deterministic function of the embeddings, the queries and the seed.
"""

import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import clusters
from modit_jax import errors

# Share of train queries kept for validation.
VALIDATION_FRACTION = 0.25
# Queries per latent group on average. Coarse on purpose: a pattern's queries should share a
# group, and a coarse group keeps neighbouring patterns together too (about 10 queries per
# pattern on the default world, 5 on the real catalog).
QUERIES_PER_GROUP = 20
# The split's own seed stream: it does not move when a training seed changes, so every run and
# the evaluation see the same split.
_SEED = 20261130


def validation_mask(catalog: catalog_lib.Catalog,
                    fraction: float = VALIDATION_FRACTION) -> np.ndarray:
  """bool [number of train queries]: True for validation queries, False for fit queries."""
  queries = catalog.queries["train"]
  n = len(queries)
  if not 0.0 < fraction < 1.0:
    raise errors.UserError(f"the validation fraction must be in (0, 1), got {fraction}")
  if n < 2:
    raise errors.UserError(f"splitting train queries into fit and validation needs at least 2, "
                           f"queries_train.npz has {n}")
  centroids = np.asarray(catalog.embeddings[queries.seeds], np.float32).mean(axis=1)
  # At least 4 groups (when there are 4 queries), so that a small query set can still be split
  # near the fraction: the first group drawn always goes to validation.
  num_groups = int(np.clip(round(n / QUERIES_PER_GROUP), min(4, n), n))
  _, group = clusters.kmeans(centroids, num_groups, seed=_SEED)
  sizes = np.bincount(group, minlength=num_groups)
  order = np.random.default_rng(_SEED).permutation(num_groups)
  order = order[sizes[order] > 0]
  if len(order) < 2:
    raise errors.UserError("the train queries' seed sets are all alike: they cannot be split "
                           "into fit and validation groups")
  # Whole groups until the fraction is reached; at least one group on each side.
  before = np.cumsum(sizes[order]) - sizes[order]
  taken = before < fraction * n
  taken[-1] = False
  return np.isin(group, order[taken])


def fit_queries(catalog: catalog_lib.Catalog) -> catalog_lib.Queries:
  """The train queries that may train a model."""
  return catalog.queries["train"].take(np.flatnonzero(~validation_mask(catalog)))


def validation_queries(catalog: catalog_lib.Catalog) -> catalog_lib.Queries:
  """The train queries that only choose knobs."""
  return catalog.queries["train"].take(np.flatnonzero(validation_mask(catalog)))
