"""Train queries split into those that may train a model and those that only choose knobs.

A knob chosen on the queries a model was trained on is chosen in-sample: the guidance scale
used to be tuned on train queries of which a quarter had also built HPPO's pools. Here every
train query has one role:

  fit         may train a model (HPPO's candidate pools and regression targets);
  validation  only scores knobs (guidance scales, shift sizes, pool and neighbourhood sizes)
              and picks the per-cell strongest competitor.

Evaluation has two regimes in equal parts, a pattern the model trained on (item holdout) and
one it never saw (pattern holdout), and validation mirrors both:

  unseen      half the validation queries are whole latent groups: queries whose seed sets lie
              in the same region (the same pattern, in a world with patterns) are all
              validation, so no model trained on their pattern;
  seen        the other half are single queries of the remaining groups, whose pattern the
              model trained on through other queries.

With unseen groups alone (the rule until 2026-12-01), a knob's cost on seen patterns was
invisible: guidance scales that the unseen groups preferred by 0.01-0.03 cut HPPO's
item-holdout length from 0.67 to 0.25-0.34 on the development world (docs/statistics.md).
The groups are k-means clusters of the queries' seed centroids (no hidden truth is read, not
even the number of patterns). Everything is a deterministic function of the embeddings, the
queries and the seed.
"""

import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import clusters
from modit_jax import errors
from modit_jax import memo

# Share of train queries kept for validation.
VALIDATION_FRACTION = 0.25
# Of those, the share drawn as whole latent groups (the unseen-pattern regime); the rest are
# single queries of the other groups (the seen-pattern regime).
UNSEEN_SHARE = 0.5
# Queries per latent group on average. Coarse on purpose: a pattern's queries should share a
# group, and a coarse group keeps neighbouring patterns together too (about 10 queries per
# pattern on the default world, 5 on the real catalog).
QUERIES_PER_GROUP = 20
# The split's own seed stream: it does not move when a training seed changes, so every run and
# the evaluation see the same split.
_SEED = 20261130
# The last few splits, keyed by their inputs' bytes: the k-means behind a split takes about a
# second at 16k train queries, and one pipeline asks for the same split dozens of times (every
# knob, every HPPO run, every evaluated method).
_SPLITS: memo.Memo[np.ndarray] = memo.Memo("query_split", kept=8)


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
  # The split is a function of the seed centroids and the fraction alone.
  key = memo.digest(centroids, float(fraction))
  return _SPLITS.get(key, lambda: _split(centroids, fraction)).copy()


def _split(centroids: np.ndarray, fraction: float) -> np.ndarray:
  """`validation_mask` of the train queries whose seed centroids are `centroids` [n, d]."""
  n = len(centroids)
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
  # Whole groups until their share is reached; at least one group on each side.
  before = np.cumsum(sizes[order]) - sizes[order]
  taken = before < UNSEEN_SHARE * fraction * n
  taken[-1] = False
  mask = np.isin(group, order[taken])
  # Then single queries of the other groups up to the fraction, leaving at least one fit query.
  rest = np.flatnonzero(~mask)
  singles = int(np.clip(round(fraction * n) - mask.sum(), 0, len(rest) - 1))
  mask[np.random.default_rng([_SEED, 1]).choice(rest, singles, replace=False)] = True
  return mask


def fit_queries(catalog: catalog_lib.Catalog) -> catalog_lib.Queries:
  """The train queries that may train a model."""
  return catalog.queries["train"].take(np.flatnonzero(~validation_mask(catalog)))


def validation_queries(catalog: catalog_lib.Catalog) -> catalog_lib.Queries:
  """The train queries that only choose knobs."""
  return catalog.queries["train"].take(np.flatnonzero(validation_mask(catalog)))


def with_every_domain(queries: catalog_lib.Queries, num_domains: int) -> catalog_lib.Queries:
  """Each distinct seed set of `queries` once per domain, in the order the seed sets first occur.

  A train query asks about one domain, so a (pattern, domain) pair with no fit query has no
  training target at all: on the real development catalog 30 % of the item-holdout queries
  ask about such a pair. The seed set's other domains are answered by the same online oracle (the
  same train items, the same pattern); nothing held out is read. A seed set asked twice
  (its seeds in any order) yields its rows once.
  """
  if num_domains < 1:
    raise ValueError(f"num_domains must be >= 1, got {num_domains}")
  _, first = np.unique(np.sort(queries.seeds, axis=1), axis=0, return_index=True)
  rows = np.repeat(np.sort(first), num_domains)
  domains = np.tile(np.arange(num_domains, dtype=queries.domain.dtype), len(first))
  return catalog_lib.Queries(seeds=queries.seeds[rows], pattern=queries.pattern[rows],
                             domain=domains)
