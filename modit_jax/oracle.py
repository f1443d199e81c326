"""The online metric oracle: the one door through which training may see hidden labels.

DESIGN.md section 2: training never reads `patterns` or unobserved attribute labels, except
through this oracle, which stands for live-traffic feedback. Given training queries and
candidate query embeddings, it searches an index of **train items only** and returns Joint@K
and Purity@K. It copies the truth of train items at construction and nothing else, and it
refuses queries whose seeds are not train items, so held-out items and patterns cannot reach
training through it. Baselines tune their one knob with it too (on train queries).
"""

from typing import Sequence

import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import evidence
from modit_jax import metrics
from modit_jax import retrieval


class OnlineOracle:
  """Scores candidate query embeddings of training queries, over train items only."""

  def __init__(self, catalog: catalog_lib.Catalog, k: int = 20, index_kind: str = "scann",
               search_share: float = 0.0):
    """`search_share` > 0: its ScaNN index searches at least that share of its leaves
    (`retrieval.searching_leaf_share`)."""
    self.k = int(k)
    self.train_items = catalog.train_items()
    if len(self.train_items) <= k + catalog.seed_size:
      raise errors.UserError(
          f"the online oracle needs more than {k + catalog.seed_size} train items, "
          f"the catalog has {len(self.train_items)}")
    # Local (train-only) views of the truth: the only hidden labels training can reach.
    self._patterns = np.asarray(catalog.patterns[self.train_items])
    self._attributes = np.asarray(catalog.attributes[self.train_items])
    self._counts = metrics.pattern_attribute_counts(self._patterns, self._attributes)
    self._local = np.full(catalog.num_items, -1, np.int64)
    self._local[self.train_items] = np.arange(len(self.train_items))
    self._index = retrieval.searching_leaf_share(retrieval.build_index(
        np.asarray(catalog.embeddings[self.train_items]), index_kind), search_share)

  def _local_seeds(self, seeds: np.ndarray) -> np.ndarray:
    local = self._local[np.asarray(seeds)]
    if np.any(local < 0):
      bad = int(np.asarray(seeds)[local < 0][0])
      raise errors.UserError(
          f"the online oracle refuses item {bad}: it is not a train item (held-out items "
          f"never reach training)")
    return local

  def _local_items(self, retrieved: np.ndarray) -> np.ndarray:
    """Local rows of retrieved global ids; a held-out id is refused."""
    local = self._local[np.asarray(retrieved)]
    if np.any(local < 0):
      raise errors.UserError("the online oracle scores train items only; got a held-out id")
    return local

  def search(self, query_embeddings: np.ndarray, seeds: np.ndarray, k: int) -> np.ndarray:
    """Global ids int64 [Q, k] of the k best train items per query, seeds excluded."""
    local, _ = self._index.search(query_embeddings, k, exclude=self._local_seeds(seeds))
    return self.train_items[local]

  def score_ids(self, retrieved: np.ndarray, queries: catalog_lib.Queries,
                ks: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Joint@K and Purity@K (float64 [Q]) of global train-item ids retrieved per query."""
    ks = (self.k,) if ks is None else tuple(ks)
    local = self._local_items(retrieved)
    scores = metrics.retrieval_metrics(
        local, self._local_seeds(queries.seeds), queries.pattern, queries.domain,
        self._patterns, self._attributes, ks=ks, counts=self._counts)
    return {key: value for key, value in scores.items()
            if key.startswith(("joint@", "purity@"))}

  def item_hits(self, retrieved: np.ndarray, queries: catalog_lib.Queries) -> np.ndarray:
    """bool [Q, n]: whether each retrieved train item is in the query's pattern and positive.

    Per-position feedback on a ranked list, as live traffic gives it (a click per shown item):
    no more than Joint@1..n of the list reveal, and only for train items.
    """
    local = self._local_items(retrieved)
    self._local_seeds(queries.seeds)
    same = self._patterns[local] == np.asarray(queries.pattern)[:, None]
    return same & self.labels(retrieved, queries.domain)

  def neighbours(self, query_embeddings: np.ndarray, seeds: np.ndarray, k: int) -> np.ndarray:
    """Global ids int64 [Q, k] of the k train items nearest each query embedding.

    Reads embeddings only (no label), so any method may call it, for any query: seeds that are
    train items are excluded, held-out seeds (never in this index) need no exclusion.
    """
    local = self._local[np.asarray(seeds)]
    ids, _ = self._index.search(query_embeddings, k, exclude=local)  # -1: nothing to exclude
    return self.train_items[ids]

  def labels(self, items: np.ndarray, domains: np.ndarray) -> np.ndarray:
    """bool [Q, n]: the true attribute of each train item for its row's domain.

    The online oracle's labels of train items, which HPPO's training may read through pool
    scores; a method that reads them directly is a bound, not a competitor.
    """
    local = self._local_items(items)
    return np.take_along_axis(self._attributes[local],
                              np.asarray(domains)[:, None, None], 2)[..., 0]

  def score(self, query_embeddings: np.ndarray,
            queries: catalog_lib.Queries) -> dict[str, np.ndarray]:
    """Joint@k and Purity@k (float64 [Q]) of one candidate query embedding per query."""
    return self.score_ids(self.search(query_embeddings, queries.seeds, self.k), queries)


def local_directions(catalog: catalog_lib.Catalog, oracle: OnlineOracle,
                     q: catalog_lib.Queries, sizes: Sequence[int],
                     oracle_labels: bool = False,
                     hidden: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> dict[int, np.ndarray]:
  """Per neighbourhood size n: float32 [Q, d], labelled-positive mean minus labelled mean.

  Over the n train items nearest each query's seed centroid (`oracle.neighbours`: embeddings
  only). Labels are the observed labels of the query's domain or, with `oracle_labels`, the
  oracle's label of every one of those train items (what a bound and HPPO's pools may read).
  A query with no labelled positive nearby gets a zero direction.

  `hidden` = (group_of int [num_items], the group of each train item and -1 elsewhere; hide
  int [Q] or [Q, g], groups per query, -1: none): a query's neighbourhood then leaves out every
  train item of its hidden groups, as if they were an unseen pattern.
  """
  emb = catalog.embeddings
  sizes = sorted(int(n) for n in sizes)
  centroid = evidence.seed_centroids(emb, q.seeds)
  extra = 0
  if hidden is not None and np.any(hidden[1] >= 0):
    group_of = np.asarray(hidden[0])
    hide = np.asarray(hidden[1]).reshape(len(q.seeds), -1)
    # Search past every row's hidden items, so that n items are left once they are dropped.
    group_size = np.bincount(group_of[group_of >= 0], minlength=int(hide.max()) + 1)
    hidden_items = np.where(hide >= 0, group_size[np.maximum(hide, 0)], 0)
    extra = int(hidden_items.sum(axis=1).max())  # a repeated group only widens the search
  want = min(sizes[-1] + extra, len(oracle.train_items) - q.seeds.shape[1])
  near = oracle.neighbours(centroid, q.seeds, want)
  if extra:
    keep = ~np.any(group_of[near][:, :, None] == hide[:, None, :], axis=2)
    # Stable: the kept items first, nearest first.
    near = np.take_along_axis(near, np.argsort(~keep, axis=1, kind="stable"), 1)
    near = near[:, :min(sizes[-1], want)]
  if oracle_labels:
    known, positive = np.ones(near.shape, bool), oracle.labels(near, q.domain)
  else:
    domain = np.asarray(q.domain)[:, None]
    known = np.asarray(catalog.observed, bool)[near, domain]   # train items' observed labels
    positive = known & np.asarray(catalog.attributes, bool)[near, domain]  # only where observed
  return evidence.label_contrast(emb, near, known, positive, sizes)
