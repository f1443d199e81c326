"""Non-generative baselines (DESIGN.md sections 1 and 6).

Every baseline answers a split's queries with query embeddings searched in the full-catalog
index (seeds excluded), except `rerank`, which re-orders a retrieved pool. A baseline with a
knob (shift size, pool size) picks it per domain on **validation queries only** (the
validation slice of the train queries, `modit_jax.query_split`), scored by the
online metric oracle over train items (`modit_jax.oracle`), never on evaluation queries.

  seed_centroid          normalise(mean of the seed embeddings)
  global_attribute       normalise(mean of the observed positives of domain m)
  centroid_global_shift  normalise(c + a_m * g_m), g_m = normalise(mean observed positives of m
                         - mean observed-labelled items of m): the best single shift shared by
                         every pattern
  rerank                 top-N around c in the index, re-ranked by the metric predictor's
                         probability for m (N chosen per domain)
  local_shift            normalise(c + a_m * (mean of the observed positives of m among the
                         N_m train items nearest c - mean of the observed items of m there)):
                         relevance feedback from the labels near the seeds (a_m, N_m chosen
                         per domain); what a user would try first
  neighbourhood_offset   normalise(c + a_m * g_m + b_m * (mean of the k_m catalog items nearest
                         c - the seeds' mean)): the global shift plus a step from the seeds
                         toward the rest of their catalog neighbourhood, unlabelled (seeds
                         without the attribute sit on one side of their pattern, so the rest
                         of it lies toward the attribute); (k_m, a_m, b_m) chosen per domain
  local_shift_train_oracle  the same with every train item's true label of m, as the online
                         oracle knows them: a BOUND on what the labels HPPO's training may read
                         allow, labelled like an oracle and never a competitor
  oracle_shift           normalise(c + a_m * w(m, p)) with the TRUE direction of the query's
                         pattern: reads hidden truth, an upper yardstick, labelled as an oracle
"""

import dataclasses
from typing import Any, Callable, Sequence

from absl import logging
import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import clusters
from modit_jax import errors
from modit_jax import evidence
from modit_jax import metric_predictor
from modit_jax import oracle as oracle_lib
from modit_jax import query_split
from modit_jax import retrieval
from modit_jax import stats

# What a method reads besides the seeds and the catalog's embeddings (DESIGN.md section 2).
# A competitor reads at most the observed labels and tunes its knobs with the train oracle; a
# method that reads the train oracle's labels directly is a bound, and one that reads hidden
# truth an oracle: both are reported as yardsticks, never chosen as the strongest competitor.
OBSERVED_LABELS = "observed labels"
ORACLE_KNOBS = "train oracle, for its knobs on validation queries"
ORACLE_LABELS = "train oracle's labels"
HIDDEN_TRUTH = "hidden truth"
_YARDSTICK_READS = frozenset({ORACLE_LABELS, HIDDEN_TRUTH})


# One definition each, shared with the model's neighbour evidence (modit_jax/evidence.py).
normalize = evidence.normalize
observed_positive_means = evidence.observed_positive_means


@dataclasses.dataclass
class Fitted:
  """A baseline ready to answer queries; `knob` holds the per-domain value it chose."""
  name: str
  retrieve: Callable[[catalog_lib.Queries, retrieval.Index, int], np.ndarray]
  knob: dict[str, float] | None = None


def last_queries_memo(compute: Callable[[catalog_lib.Queries], Any]
                      ) -> Callable[[catalog_lib.Queries], Any]:
  """`compute(queries)`, kept for the last queries object it was asked about: a knob's tuning
  asks the same validation queries once per grid value, and a gated and an ungated method
  answer a split from one draw."""
  last: list[tuple[catalog_lib.Queries, Any]] = []

  def get(queries: catalog_lib.Queries) -> Any:
    if not last or last[0][0] is not queries:
      last[:] = [(queries, compute(queries))]
    return last[0][1]

  return get


def _search(index: retrieval.Index, query_embeddings: np.ndarray, seeds: np.ndarray,
            k: int) -> np.ndarray:
  ids, _ = index.search(query_embeddings, k, exclude=seeds)
  return ids


def _embedding_method(name: str, embed: Callable[[catalog_lib.Queries], np.ndarray]) -> Fitted:
  return Fitted(name, lambda q, index, k: _search(index, embed(q), q.seeds, k))


# Knob choice on validation queries: the first grid value within this many paired standard
# errors of the best mean Joint (the one-standard-error rule). On the development world the
# guidance curves of length were flat within noise (0.15-0.17 over the grid) and the argmax
# moved between 1 and 12 from run to run, which cost item holdout up to 0.35 (docs/hppo.md).
KNOB_TOLERANCE_SE = 1.0
# Grid values whose validation scores a tuning log line shows (all of a shorter grid).
_LOGGED_VALUES = 8


def tune_per_domain(catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
                     grid: Sequence[float],
                     retrieve_train: Callable[[catalog_lib.Queries, Any], np.ndarray],
                     what: str, max_queries: int = 0, seed: int = 0,
                     purity_tolerance: float = -1.0,
                     tolerance_se: float = KNOB_TOLERANCE_SE, simple_values: int = 0,
                     beyond_simple_alpha: float = 1.0) -> np.ndarray:
  """For each domain, the grid value with the best mean oracle Joint@k on validation queries.

  A grid value is a number or a tuple of knobs tried together; the result is float64 [M] or
  [M, knobs].

  Knobs are scored on the validation slice of the train queries only (`query_split`): never on
  queries that trained a model, never on evaluation queries. `max_queries` > 0 tunes on a
  seeded subset of that many validation queries (for knobs whose every
  trial is costly, such as a generative model's guidance scale). `purity_tolerance` >= 0 only
  admits values whose mean validation Purity@k is within it of the grid's best Purity@k (a
  pattern-preserving choice); < 0 ignores purity. Of the values whose mean Joint is within
  `tolerance_se` paired standard errors of the best mean, the first in grid order is chosen
  (grids run from the simplest value: no shift, guidance 1, the smallest pool).

  `simple_values` > 0 with `beyond_simple_alpha` < 1: the grid's first `simple_values` values
  are a simpler family (the offset's values without a step). A value after them is admitted in
  a domain only where the best of them beats the family's best admitted value with a max-t
  family-wise p <= `beyond_simple_alpha` (`stats.max_t_gain`): a large grid's best value beats
  a small one's by chance, and the one-standard-error rule alone does not correct for the
  number of values tried (docs/novelty.md, "A step must beat chance").
  """
  if len(catalog.queries["train"]) == 0:
    raise errors.UserError(f"tuning the {what} needs train queries; queries_train.npz is empty")
  train = query_split.validation_queries(catalog)
  if 0 < max_queries < len(train):
    train = train.take(
        np.sort(np.random.default_rng(seed).choice(len(train), max_queries, replace=False)))
  scores = [oracle.score_ids(retrieve_train(train, value), train) for value in grid]
  joint = np.stack([s[f"joint@{oracle.k}"] for s in scores])  # [G, Q]
  purity = np.stack([s[f"purity@{oracle.k}"] for s in scores])
  best = [grid[0]] * catalog.num_domains
  for m in range(catalog.num_domains):
    rows = train.domain == m
    if rows.any():
      means = joint[:, rows].mean(axis=1)
      if purity_tolerance >= 0:
        pure = purity[:, rows].mean(axis=1)
        means = np.where(pure >= pure.max() - purity_tolerance, means, -np.inf)
      means = _admit_beyond_simple(joint[:, rows], means, simple_values, beyond_simple_alpha,
                                   seed, f"{what} for domain {catalog.domains[m]}")
      chosen = _first_within_se(joint[:, rows], means, tolerance_se)
      best[m] = grid[chosen]
      shown = np.arange(len(grid))
      if len(grid) > _LOGGED_VALUES:  # a long grid: the chosen value and the top few
        shown = np.union1d(np.argsort(-joint[:, rows].mean(1))[:_LOGGED_VALUES - 1], [chosen])
      logging.info("%s for domain %s: %s (validation Joint@%d %s, Purity@%d %s)", what,
                   catalog.domains[m], best[m], oracle.k,
                   {grid[i]: round(float(joint[i, rows].mean()), 3) for i in shown}, oracle.k,
                   {grid[i]: round(float(purity[i, rows].mean()), 3) for i in shown})
  # [M] for scalar grid values, [M, n] for tuples of n knobs.
  return np.asarray(best, np.float64)


def _admit_beyond_simple(joint: np.ndarray, means: np.ndarray, simple_values: int,
                         alpha: float, seed: int, what: str) -> np.ndarray:
  """`means` with the values after the first `simple_values` set to -inf unless their best
  beats the simple family's best admitted value at family-wise level `alpha` (max-t over all
  of them; joint: [G, Q] per-query scores)."""
  if not 0 < simple_values < len(means) or alpha >= 1:
    return means
  simple = np.isfinite(means[:simple_values])
  beyond = np.flatnonzero(np.isfinite(means[simple_values:])) + simple_values
  if not simple.any() or not len(beyond) or joint.shape[1] < 2:
    return means
  reference = int(np.argmax(means[:simple_values]))
  t, p = stats.max_t_gain(joint[beyond] - joint[reference], seed=seed)
  if p <= alpha:
    return means
  logging.info("%s: no value beyond the simplest %d admitted (best max-t %.2f, family-wise "
               "p %.3f > %g)", what, simple_values, t, p, alpha)
  return np.concatenate([means[:simple_values], np.full(len(means) - simple_values, -np.inf)])


def _first_within_se(joint: np.ndarray, means: np.ndarray, tolerance_se: float) -> int:
  """The first grid row whose mean is within `tolerance_se` paired SEs of the best one's.

  joint: [G, Q] per-query scores of each grid value; means: [G] their means, -inf where a value
  is not admitted. A tie of means within noise then goes to the simpler value instead of to
  whichever the noise favoured.
  """
  top = int(np.argmax(means))
  if tolerance_se <= 0 or joint.shape[1] < 2:
    return top
  diff = joint[top] - joint                                    # [G, Q], paired with the best
  se = diff.std(axis=1, ddof=1) / np.sqrt(joint.shape[1])
  within = np.isfinite(means) & (means >= means[top] - tolerance_se * se)
  return int(np.flatnonzero(within)[0])


def _shift_method(name: str, catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
                  grid: Sequence[float],
                  direction: Callable[[catalog_lib.Queries], np.ndarray],
                  purity_tolerance: float = -1.0) -> Fitted:
  """centroid + a_m * direction(query), a_m tuned per domain on validation queries (only
  among shifts whose validation Purity@k is within `purity_tolerance` of the grid's purest,
  when that is >= 0)."""
  emb = catalog.embeddings

  def embed(q: catalog_lib.Queries, alpha: np.ndarray) -> np.ndarray:
    return normalize(evidence.seed_centroids(emb, q.seeds) + alpha[:, None] * direction(q))

  best = tune_per_domain(
      catalog, oracle, grid,
      lambda q, a: oracle.search(embed(q, np.full(len(q), a)), q.seeds, oracle.k),
      f"{name} shift", purity_tolerance=purity_tolerance)
  return Fitted(name, lambda q, index, k: _search(index, embed(q, best[q.domain]), q.seeds, k),
                knob=dict(zip(catalog.domains, best.tolist())))


def _rerank(catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
            config: ml_collections.ConfigDict,
            index: retrieval.Index | None = None) -> Fitted:
  del index  # the pool is searched in the index `retrieve` is given
  predictor = metric_predictor.train(
      catalog.embeddings, catalog.attributes, catalog.observed, config.metric_predictor,
      clusters.relative_features(catalog, config.metric_predictor))
  for name, v in zip(catalog.domains, predictor.validation):
    logging.info("metric predictor %s: held-out AUC %.3f, ECE %.3f (n=%d)", name, v["auc"],
                 v["ece"], v["n_heldout"])
  probs = predictor.predict(np.asarray(catalog.embeddings, np.float32))  # [N, M]
  emb = catalog.embeddings

  def reorder(pool: np.ndarray, pool_sizes: np.ndarray, domains: np.ndarray,
              k: int) -> np.ndarray:
    # Each query ranks only the first pool_sizes[q] items of its pool (a domain's own pool
    # size); the stable sort keeps the index's order among equal probabilities.
    in_pool = np.arange(pool.shape[1])[None, :] < pool_sizes[:, None]
    scores = np.where(in_pool, probs[pool, domains[:, None]], -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(pool, order, axis=1)[:, :k]

  grid = [int(n) for n in config.rerank_pool_grid]
  best = tune_per_domain(
      catalog, oracle, grid,
      lambda q, n: reorder(oracle.search(evidence.seed_centroids(emb, q.seeds), q.seeds, n),
                           np.full(len(q), n), q.domain, oracle.k),
      "rerank pool size").astype(int)

  def retrieve(q: catalog_lib.Queries, index: retrieval.Index, k: int) -> np.ndarray:
    pools = np.maximum(best[q.domain], k)
    pool = _search(index, evidence.seed_centroids(emb, q.seeds), q.seeds, int(pools.max()))
    return reorder(pool, pools, q.domain, k)

  knob = dict(zip(catalog.domains, best.tolist()))
  knob.update({f"auc_{n}": v["auc"] for n, v in zip(catalog.domains, predictor.validation)})
  return Fitted("rerank", retrieve, knob=knob)


def _local_shift(name: str, catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
                 config: ml_collections.ConfigDict, true_labels: bool) -> Fitted:
  """c + a_m * (positives - labelled) among the N_m nearest train items; (N_m, a_m) tuned."""
  emb = catalog.embeddings
  sizes = sorted(int(n) for n in config.local_neighbourhood_grid)
  steps = [float(a) for a in config.local_shift_grid]
  if not sizes or not steps or sizes[0] < 1:
    raise errors.UserError("local_shift needs non-empty local_neighbourhood_grid (sizes >= 1) "
                           "and local_shift_grid")

  directions = last_queries_memo(lambda q: oracle_lib.local_directions(
      catalog, oracle, q, sizes, oracle_labels=true_labels))

  def embed(q: catalog_lib.Queries, knobs: np.ndarray) -> np.ndarray:
    """Query embeddings for per-query knobs [Q, 2] = (neighbourhood size, step)."""
    shift = evidence.rows_by_size(directions(q), knobs[:, 0])
    return normalize(evidence.seed_centroids(emb, q.seeds) + knobs[:, 1:2] * shift)

  grid = [(float(n), a) for n in sizes for a in steps]
  best = tune_per_domain(
      catalog, oracle, grid,
      lambda q, knob: oracle.search(embed(q, np.tile(knob, (len(q), 1))), q.seeds, oracle.k),
      f"{name} (neighbourhood, step)")

  def retrieve(q: catalog_lib.Queries, index: retrieval.Index, k: int) -> np.ndarray:
    return _search(index, embed(q, best[q.domain]), q.seeds, k)

  knob = {d: {"neighbours": int(n), "step": a} for d, (n, a) in zip(catalog.domains,
                                                                     best.tolist())}
  return Fitted(name, retrieve, knob=knob)


def _seed_centroid(catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
                   config: ml_collections.ConfigDict,
                   index: retrieval.Index | None = None) -> Fitted:
  del oracle, config, index
  return _embedding_method("seed_centroid",
                           lambda q: evidence.seed_centroids(catalog.embeddings, q.seeds))


def _global_attribute(catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
                      config: ml_collections.ConfigDict,
                      index: retrieval.Index | None = None) -> Fitted:
  del oracle, config, index
  positives = normalize(observed_positive_means(catalog)[0])
  return _embedding_method("global_attribute", lambda q: positives[q.domain])


def fit_global_shift(catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
                     grid: Sequence[float], purity_tolerance: float = -1.0) -> Fitted:
  """`centroid_global_shift` with its shifts from `grid`; `purity_tolerance` >= 0 admits only
  shifts whose validation Purity@k is within it of the grid's purest (the novelty gate's
  pattern-preserving fallback, docs/novelty.md)."""
  shift = evidence.global_directions(catalog)
  return _shift_method("centroid_global_shift", catalog, oracle, grid,
                       lambda q: shift[q.domain], purity_tolerance)


def fit_neighbourhood_offset(catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
                             index: retrieval.Index, sizes: Sequence[int],
                             shifts: Sequence[float], steps: Sequence[float],
                             purity_tolerance: float = -1.0, step_alpha: float = 1.0) -> Fitted:
  """`neighbourhood_offset` with (neighbours, shift, step) from the grids, tuned per domain.

  `index` searches the whole catalog: the neighbourhoods of validation and evaluation queries
  alike come from it, whatever index the answers are then searched in. `purity_tolerance` as
  in `fit_global_shift`. `step_alpha` < 1: a domain takes a step only where the best step
  beats the best value without one at that family-wise level (`tune_per_domain`'s
  `beyond_simple_alpha`; the evaluation's `offset_step_alpha`); 1: as the knobs' other grids.
  """
  sizes = sorted({int(n) for n in sizes})
  shifts, steps = [float(a) for a in shifts], [float(b) for b in steps]
  if not sizes or not shifts or not steps or sizes[0] < 1:
    raise errors.UserError("neighbourhood_offset needs non-empty offset_neighbourhood_grid "
                           "(sizes >= 1), shift_grid and offset_step_grid")
  emb = catalog.embeddings
  directions = evidence.global_directions(catalog)
  offsets = last_queries_memo(lambda q: evidence.catalog_offsets(
      emb, index, np.asarray(emb[q.seeds], np.float32).mean(axis=1), q.seeds, sizes))

  def embed(q: catalog_lib.Queries, knobs: np.ndarray) -> np.ndarray:
    """Query embeddings for per-query knobs [Q, 3] = (neighbours, shift, step)."""
    offset = evidence.rows_by_size(offsets(q), knobs[:, 0])
    return normalize(evidence.seed_centroids(emb, q.seeds) + knobs[:, 1:2] * directions[q.domain]
                     + knobs[:, 2:3] * offset)

  # Simplest first (no step, then no shift, then the smallest neighbourhood), so that a tie
  # within noise goes to the plain global shift or the seed average.
  grid = [(float(n), a, b) for b in [0.0] + [b for b in steps if b]
          for a in shifts for n in (sizes if b else sizes[:1])]
  best = tune_per_domain(
      catalog, oracle, grid,
      lambda q, knob: oracle.search(embed(q, np.tile(knob, (len(q), 1))), q.seeds, oracle.k),
      "neighbourhood_offset (neighbours, shift, step)", purity_tolerance=purity_tolerance,
      simple_values=len(shifts), beyond_simple_alpha=step_alpha)

  def retrieve(q: catalog_lib.Queries, search_index: retrieval.Index, k: int) -> np.ndarray:
    return _search(search_index, embed(q, best[q.domain]), q.seeds, k)

  knob = {d: {"neighbours": int(n), "shift": a, "step": b}
          for d, (n, a, b) in zip(catalog.domains, best.tolist())}
  return Fitted("neighbourhood_offset", retrieve, knob=knob)


def _neighbourhood_offset(catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
                          config: ml_collections.ConfigDict,
                          index: retrieval.Index | None = None) -> Fitted:
  if index is None:
    index = retrieval.build_index(np.asarray(catalog.embeddings, np.float32), "exact")
  return fit_neighbourhood_offset(catalog, oracle, index, config.offset_neighbourhood_grid,
                                  config.shift_grid, config.offset_step_grid,
                                  step_alpha=config.offset_step_alpha)


def _centroid_global_shift(catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
                           config: ml_collections.ConfigDict,
                           index: retrieval.Index | None = None) -> Fitted:
  del index
  return fit_global_shift(catalog, oracle, config.shift_grid)


def _oracle_shift(catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
                  config: ml_collections.ConfigDict,
                  index: retrieval.Index | None = None) -> Fitted:
  del index
  truth = catalog.attribute_directions
  if truth is None:
    raise errors.UserError(
        "oracle_shift needs the true attribute directions (attribute_directions.npy, named "
        "in the manifest's truth); this catalog has none, drop oracle_shift from methods")
  return _shift_method("oracle_shift", catalog, oracle, config.shift_grid,
                       lambda q: np.asarray(truth[q.domain, q.pattern], np.float32))


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A non-generative method: what it reads, and how it is fitted to a catalog."""
  name: str
  reads: frozenset[str]  # of OBSERVED_LABELS, ORACLE_KNOBS, ORACLE_LABELS, HIDDEN_TRUTH
  # (catalog, the train oracle, the evaluation config, the catalog's index or None) -> the
  # fitted method. The config has `shift_grid`, `rerank_pool_grid`, `metric_predictor`,
  # `local_neighbourhood_grid`, `local_shift_grid` and the `offset_*` grids.
  fit: Callable[[catalog_lib.Catalog, oracle_lib.OnlineOracle, ml_collections.ConfigDict,
                 retrieval.Index | None], Fitted]

  @property
  def yardstick(self) -> bool:
    """It reads more than a competitor may: reported as an oracle or bound row."""
    return bool(self.reads & _YARDSTICK_READS)

  @property
  def needs_truth(self) -> bool:
    """It reads hidden truth, which a catalog may lack (any real one does)."""
    return HIDDEN_TRUTH in self.reads


# Every baseline, in report order (the module docstring says what each does). Adding one is a
# function above and a row here; evaluation, the report and the significance references take
# their names from this table.
REGISTRY = {b.name: b for b in (
    Baseline("seed_centroid", frozenset(), _seed_centroid),
    Baseline("global_attribute", frozenset({OBSERVED_LABELS}), _global_attribute),
    Baseline("centroid_global_shift", frozenset({OBSERVED_LABELS, ORACLE_KNOBS}),
             _centroid_global_shift),
    Baseline("rerank", frozenset({OBSERVED_LABELS, ORACLE_KNOBS}), _rerank),
    Baseline("local_shift", frozenset({OBSERVED_LABELS, ORACLE_KNOBS}),
             lambda catalog, oracle, config, index: _local_shift(
                 "local_shift", catalog, oracle, config, true_labels=False)),
    Baseline("neighbourhood_offset", frozenset({OBSERVED_LABELS, ORACLE_KNOBS}),
             _neighbourhood_offset),
    Baseline("local_shift_train_oracle", frozenset({ORACLE_LABELS, ORACLE_KNOBS}),
             lambda catalog, oracle, config, index: _local_shift(
                 "local_shift_train_oracle", catalog, oracle, config, true_labels=True)),
    Baseline("oracle_shift", frozenset({HIDDEN_TRUTH, ORACLE_KNOBS}), _oracle_shift),
)}


def fit(name: str, catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
        config: ml_collections.ConfigDict, index: retrieval.Index | None = None) -> Fitted:
  """Builds baseline `name` (see `Baseline.fit` for `config`).

  `index`: the whole catalog's index, where a method that reads the seeds' catalog
  neighbourhood searches it; None builds an exact one when such a method needs it.
  """
  if name not in REGISTRY:
    raise errors.UserError(f"unknown baseline {name!r}; known: {', '.join(REGISTRY)}")
  return REGISTRY[name].fit(catalog, oracle, config, index)
