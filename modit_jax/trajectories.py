"""Training batches of stages 2 (CPT) and 3 (SFT): metric-ordered trajectories in latent clusters.

DESIGN.md section 5. Train items are grouped into latent clusters (`clusters.latent_clusters`,
k-means over embeddings; ground-truth patterns are never read) and scored per domain by the
metric predictor (trained on observed labels of train items only). Within a cluster, sorting by
predicted attribute density for domain m gives a path from the cluster's low-attribute region
(where query seeds live) to its high-attribute tail (where the answers live):

- stage 2, `MetricOrderedTrajectories`: the model continues a trajectory that climbs density for
  m inside one cluster (context = a prefix, target = the next item); the order ablation uses
  random or reversed order instead;
- stage 3, `TailCentroidTargets`: context = a seed-like set from the low-density part of a
  cluster, target = the (normalised) centroid of its high-density tail for m.

Batches follow `data.py`: a dict of context [B, L, d] float32 (zero-padded), context_mask [B, L]
bool, domain [B] int32 (a real domain, never the null one: condition dropout happens in the loss),
target [B, d] float32. A batch is a pure function of (seed, step); every process draws the global
batch's item ids (cheap) and gathers embeddings for its own rows only. `ids(step, batch_size)`
returns the item ids behind a global batch (for tests and debugging).

Only train items ever enter a batch: every id comes from the `train_items` a source is built
from, and `build_source` hands the metric predictor and k-means train rows only.
"""

import math
from typing import Any

import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import clusters
from modit_jax import data
from modit_jax import errors
from modit_jax import metric_predictor

ORDERS = ("metric", "random", "reversed")
CONTEXT_ORDERS = ("random", "metric")
# Separate random streams per batch kind, so that a stage-2 and a stage-3 batch of the same
# (seed, step) are unrelated, and unrelated to stage 1's `default_rng([seed, step])`.
_CPT_STREAM = 2
_SFT_STREAM = 3
_HIDE_STREAM = 1  # under _SFT_STREAM: which examples hide their cluster from the evidence
# Tolerance when turning a fraction of a cluster into a count: 0.1 * 30 is 3.0000000000000004
# in floating point and must count 3 items, not 4.
_COUNT_EPS = 1e-9


class TrajectorySource:
  """Train items grouped by latent cluster and, per domain, sorted by predicted density.

  Attributes:
    train_items: int64 [n] item ids (rows of `embeddings`) that batches may use.
    assign: int32 [n] latent cluster of each train item.
    density: float32 [n, M] predicted attribute probability (any score: higher = more positive).
    embeddings: float32 [N, d] item embeddings, indexed by item id (only train rows are read).
    sizes: int64 [k] items per cluster; `eligible` clusters have at least 2.
  """

  def __init__(self, train_items: np.ndarray, assign: np.ndarray, density: np.ndarray,
               embeddings: np.ndarray):
    train_items = np.asarray(train_items)
    assign = np.asarray(assign)
    density = np.asarray(density)
    if train_items.ndim != 1 or not len(train_items):
      raise errors.UserError(f"train_items must be a non-empty 1-D id array; got shape "
                             f"{train_items.shape}")
    n = len(train_items)
    if not np.issubdtype(train_items.dtype, np.integer):
      raise errors.UserError(f"train_items must be integer ids; got dtype {train_items.dtype}")
    if assign.shape != (n,) or not np.issubdtype(assign.dtype, np.integer):
      raise errors.UserError(f"assign must be integer [{n}] (one cluster per train item); got "
                             f"{assign.dtype} {assign.shape}")
    if density.ndim != 2 or density.shape[0] != n or density.shape[1] < 1:
      raise errors.UserError(f"density must be [{n}, num_domains] (one row per train item); "
                             f"got {density.shape}")
    if not np.isfinite(density).all():
      raise errors.UserError("density has NaN or inf entries")
    if embeddings.ndim != 2:
      raise errors.UserError(f"embeddings must be [N, d]; got {embeddings.shape}")
    if train_items.min() < 0 or train_items.max() >= embeddings.shape[0]:
      raise errors.UserError(f"train_items out of range [0, {embeddings.shape[0]})")
    if len(np.unique(train_items)) != n:
      raise errors.UserError("train_items has duplicate ids")
    if assign.min() < 0:
      raise errors.UserError("assign has negative cluster ids")

    self.train_items = train_items.astype(np.int64)
    self.assign = assign.astype(np.int32)
    self.density = density.astype(np.float32)
    self.embeddings = embeddings
    self.num_domains = int(density.shape[1])
    self.num_clusters = int(assign.max()) + 1
    self.sizes = np.bincount(self.assign, minlength=self.num_clusters).astype(np.int64)
    self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
    self.eligible = np.flatnonzero(self.sizes >= 2)
    if not len(self.eligible):
      raise errors.UserError("no latent cluster has 2 or more train items; use fewer clusters")
    # _order[m]: train rows grouped by cluster (ascending id), each cluster's rows by ascending
    # density for m; ties by item id, so the order never depends on how rows were passed in.
    index = np.int32 if n < 2**31 else np.int64
    self._order = np.stack([
        np.lexsort((self.train_items, self.density[:, m], self.assign)).astype(index)
        for m in range(self.num_domains)])

  def sorted_items(self, cluster: int, domain: int) -> np.ndarray:
    """Item ids of `cluster`, ascending by predicted density for `domain`."""
    return self.train_items[self.rows_in_order(cluster, domain, 0, int(self.sizes[cluster]))]

  def rows_in_order(self, cluster: int, domain: int, first: int, count: int) -> np.ndarray:
    """Rows `first` .. `first + count - 1` of `cluster`, ascending by density for `domain`."""
    start = self.starts[cluster] + first
    return self._order[domain, start:start + count]

  def items_at(self, domain: np.ndarray, cluster: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Item ids at positions `pos` [B, P] of each row's density-sorted cluster; -1 if pos < 0."""
    rows = self._order[domain[:, None], self.starts[cluster][:, None] + np.maximum(pos, 0)]
    return np.where(pos >= 0, self.train_items[rows], -1)

  def draw_clusters(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
    """Clusters with >= 2 items, weighted by size (so every train item weighs the same)."""
    sizes = self.sizes[self.eligible]
    return rng.choice(self.eligible, size=batch_size, p=sizes / sizes.sum())


def build_source(catalog: catalog_lib.Catalog, num_clusters: int, cluster_seed: int,
                 predictor_config: ml_collections.ConfigDict | None = None
                 ) -> tuple[TrajectorySource, metric_predictor.MetricPredictor]:
  """The whole training-side data path: predictor -> density -> latent clusters -> source.

  Reads only train rows: their embeddings, and their labels where observed (the predictor never
  receives an unobserved entry). `patterns` and held-out items are never touched.

  Args:
    catalog: the dataset.
    num_clusters: k of the latent clusters (k-means over train item embeddings).
    cluster_seed: the k-means seed.
    predictor_config: `metric_predictor.default_config()` fields (None: the defaults).

  Returns:
    (the source, the trained metric predictor with its held-out validation to report).
  """
  train = catalog.train_items()
  clusters.check_num_clusters(num_clusters, len(train))  # before the predictor trains
  emb = np.asarray(catalog.embeddings[train], np.float32)
  observed = np.asarray(catalog.observed[train], bool)
  labels = np.where(observed, np.asarray(catalog.attributes[train], bool), False)
  if predictor_config is None:
    predictor_config = metric_predictor.default_config()
  # One copy of the train rows serves the predictor, its density and both k-means runs (1.7 GB
  # each at 10M items; docs/benchmarks.md, "Memory and time of the 10M training data path").
  predictor = metric_predictor.train(
      emb, labels, observed, predictor_config,
      clusters.relative_features(catalog, predictor_config, emb))
  density = predictor.predict(emb)
  train_items, assign, _ = clusters.latent_clusters(catalog, num_clusters, cluster_seed, emb)
  # latent_clusters and this function both use train_items() order; density rows follow it.
  assert np.array_equal(train_items, train)
  return TrajectorySource(train_items, assign, density, catalog.embeddings), predictor


def tail_count(size: int | np.ndarray, fraction: float) -> np.ndarray:
  """Items in the top `fraction` of a cluster of `size`: ceil(fraction * size), at least 1."""
  size = np.asarray(size, np.int64)
  count = np.ceil(fraction * size - _COUNT_EPS).astype(np.int64)
  return np.clip(count, 1, np.maximum(size, 1))


def low_count(size: int | np.ndarray, low_fraction: float,
              tail_fraction: float) -> np.ndarray:
  """Items in the bottom `low_fraction` of a cluster, kept clear of its tail where possible."""
  size = np.asarray(size, np.int64)
  n_tail = tail_count(size, tail_fraction)
  count = np.clip(np.ceil(low_fraction * size - _COUNT_EPS).astype(np.int64), 1,
                  np.maximum(size, 1))
  # Cut the low part short of the tail whenever the cluster has items outside the tail.
  return np.where(size > n_tail, np.minimum(count, size - n_tail), count)


def tail_items(source: TrajectorySource, cluster: int, domain: int,
               tail_fraction: float) -> np.ndarray:
  """Item ids of the cluster's high-density tail for `domain` (top `tail_fraction`, >= 1 item)."""
  _check_fraction("tail_fraction", tail_fraction)
  size = int(source.sizes[cluster])
  n = int(tail_count(size, tail_fraction))
  return source.train_items[source.rows_in_order(cluster, domain, size - n, n)]


def low_items(source: TrajectorySource, cluster: int, domain: int, low_fraction: float,
              tail_fraction: float) -> np.ndarray:
  """Item ids of the cluster's low-density part for `domain` (the SFT context pool)."""
  _check_fraction("low_fraction", low_fraction)
  _check_fraction("tail_fraction", tail_fraction)
  n = int(low_count(int(source.sizes[cluster]), low_fraction, tail_fraction))
  return source.train_items[source.rows_in_order(cluster, domain, 0, n)]


class MetricOrderedTrajectories:
  """Stage 2 (CPT): continue a density-ordered trajectory inside one latent cluster.

  Each example draws a domain m (uniform), a cluster (by size, >= 2 items) and a random subset
  of `length` + 1 of its items (all of them when it is smaller), ordered by predicted density
  for m: ascending ("metric"), shuffled ("random") or descending ("reversed"). The context is
  the trajectory's first j items, j uniform in [1, len - 1] (as stage 1's prefixes); the target
  is item j + 1. For a given (seed, step) the three orders draw the same domains, clusters,
  subsets and prefix lengths, so the ablation changes the order and nothing else.
  """

  def __init__(self, source: TrajectorySource, length: int, order: str, null_domain: int,
               seed: int):
    if not isinstance(length, (int, np.integer)) or length < 2:
      raise errors.UserError(f"trajectory length must be an integer >= 2 (context items); got "
                             f"{length!r}")
    if order not in ORDERS:
      raise errors.UserError(f"unknown trajectory order {order!r}; known: {', '.join(ORDERS)}")
    _check_null_domain(null_domain, source)
    self._source = source
    self._length = int(length)
    self._order = order
    self._seed = int(seed)

  @property
  def context_size(self) -> int:
    """L of the batches: the longest context, `length` items."""
    return self._length

  def ids(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
    """The item ids behind the global batch of `step`.

    Returns:
      trajectory int64 [B, length + 1] (in trajectory order, -1 padded), num_context int64 [B],
      context_ids int64 [B, length] (-1 padded), target_id int64 [B], domain int32 [B],
      cluster int64 [B].
    """
    src = self._source
    rng = np.random.default_rng([self._seed, _CPT_STREAM, step])
    domain = rng.integers(0, src.num_domains, size=batch_size).astype(np.int32)
    cluster = src.draw_clusters(rng, batch_size)
    width = self._length + 1
    lengths = np.minimum(src.sizes[cluster], width)
    # Positions in the cluster's ascending-density list; sorted, they are the "metric" order.
    pos = np.full((batch_size, width), -1, np.int64)
    for b in range(batch_size):
      pos[b, :lengths[b]] = np.sort(rng.choice(src.sizes[cluster[b]], lengths[b], replace=False))
    num_context = 1 + (rng.random(batch_size) * (lengths - 1)).astype(np.int64)
    if self._order == "reversed":
      for b in range(batch_size):
        pos[b, :lengths[b]] = pos[b, :lengths[b]][::-1]
    elif self._order == "random":
      # Its own stream: the draws above stay those of the other orders.
      shuffle = np.random.default_rng([self._seed, _CPT_STREAM, step, 1])
      for b in range(batch_size):
        pos[b, :lengths[b]] = shuffle.permutation(pos[b, :lengths[b]])
    trajectory = src.items_at(domain, cluster, pos)
    cols = np.arange(self._length)
    context_ids = np.where(cols[None, :] < num_context[:, None], trajectory[:, :-1], -1)
    target_id = trajectory[np.arange(batch_size), num_context]
    return {"trajectory": trajectory, "num_context": num_context, "context_ids": context_ids,
            "target_id": target_id, "domain": domain, "cluster": cluster}

  def __call__(self, step: int, batch_size: int, process_index: int = 0,
               process_count: int = 1) -> dict[str, np.ndarray]:
    part = data.process_slice(batch_size, process_index, process_count)
    ids = self.ids(step, batch_size)
    target = self._source.embeddings[ids["target_id"][part]]
    return data.gather(self._source.embeddings, ids["context_ids"][part], target,
                       ids["domain"][part])


class TailCentroidTargets:
  """Stage 3 (SFT): from a low-density seed-like set of a cluster to its high-density tail.

  Each example draws a domain m (uniform) and a cluster (by size, >= 2 items). The context is
  `context_size` items of the cluster's low part for m (lowest `low_fraction` by density, cut
  short of the tail when the cluster is small): drawn without replacement when the low part is
  large enough, otherwise every low item once and the rest drawn with replacement. The target is
  the tail centroid: the mean embedding of the top `tail_fraction` of the cluster by density for
  m (at least one item), L2-normalised. Normalised because the model generates query embeddings
  and queries are unit vectors like the items (the stage-1 and stage-2 targets are item
  embeddings, hence unit); an unnormalised mean is shorter by an amount that depends on the
  tail's spread, which would be a nuisance target the sampler throws away anyway.

  `context_order` is "random" (seed sets carry no order) or "metric" (ascending density for m,
  the shape of a stage-2 trajectory prefix; a model trained so must sort its seeds likewise).
  """

  def __init__(self, source: TrajectorySource, context_size: int, tail_fraction: float,
               low_fraction: float, null_domain: int, seed: int,
               context_order: str = "random", evidence: Any = None,
               hide_cluster_prob: float = 0.0):
    if not isinstance(context_size, (int, np.integer)) or context_size < 1:
      raise errors.UserError(f"context_size must be an integer >= 1; got {context_size!r}")
    _check_fraction("tail_fraction", tail_fraction)
    _check_fraction("low_fraction", low_fraction)
    if context_order not in CONTEXT_ORDERS:
      raise errors.UserError(f"unknown context order {context_order!r}; known: "
                             f"{', '.join(CONTEXT_ORDERS)}")
    _check_null_domain(null_domain, source)
    self._source = source
    self._context_size = int(context_size)
    self._tail_fraction = float(tail_fraction)
    self._low_fraction = float(low_fraction)
    self._seed = int(seed)
    self._context_order = context_order
    # `evidence` (an evidence.NeighbourEvidence grouped by this source's clusters) adds each
    # example's evidence vectors; with probability `hide_cluster_prob` its own cluster is
    # hidden from the neighbourhood, as an unseen pattern's would be absent.
    self._evidence = evidence
    if not 0 <= float(hide_cluster_prob) <= 1:
      raise errors.UserError(
          f"sft.hide_cluster_prob must be in [0, 1]; got {hide_cluster_prob!r}")
    self._hide_cluster_prob = float(hide_cluster_prob)
    self._num_low = low_count(source.sizes, self._low_fraction, self._tail_fraction)
    self._centroids = self._tail_centroids()

  @property
  def context_size(self) -> int:
    return self._context_size

  def tail_centroid(self, cluster: int, domain: int) -> np.ndarray:
    """float32 [d]: the normalised tail centroid of `cluster` for `domain`."""
    return self._centroids[domain, cluster]

  def _tail_centroids(self) -> np.ndarray:
    """float32 [M, k, d]; zeros for empty clusters (never drawn)."""
    src = self._source
    out = np.zeros((src.num_domains, src.num_clusters, src.embeddings.shape[1]), np.float32)
    for m in range(src.num_domains):
      for c in np.flatnonzero(src.sizes > 0):
        items = tail_items(src, int(c), m, self._tail_fraction)
        # Sorted ids: the float sum, hence the target's bits, do not depend on density ties.
        mean = np.asarray(src.embeddings[np.sort(items)], np.float64).mean(axis=0)
        out[m, c] = mean / max(np.linalg.norm(mean), 1e-12)
    return out

  def ids(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
    """The ids behind the global batch of `step`: context_ids int64 [B, C], domain, cluster."""
    src = self._source
    rng = np.random.default_rng([self._seed, _SFT_STREAM, step])
    domain = rng.integers(0, src.num_domains, size=batch_size).astype(np.int32)
    cluster = src.draw_clusters(rng, batch_size)
    size = self._context_size
    pos = np.empty((batch_size, size), np.int64)
    for b in range(batch_size):
      n = int(self._num_low[cluster[b]])
      if n >= size:
        pos[b] = rng.choice(n, size, replace=False)
      else:
        pos[b] = rng.permutation(np.concatenate([np.arange(n), rng.integers(0, n, size - n)]))
    if self._context_order == "metric":
      pos = np.sort(pos, axis=1)
    context_ids = src.items_at(domain, cluster, pos)
    return {"context_ids": context_ids, "domain": domain, "cluster": cluster}

  def __call__(self, step: int, batch_size: int, process_index: int = 0,
               process_count: int = 1) -> dict[str, np.ndarray]:
    part = data.process_slice(batch_size, process_index, process_count)
    ids = self.ids(step, batch_size)
    domain, cluster = ids["domain"][part], ids["cluster"][part]
    batch = data.gather(self._source.embeddings, ids["context_ids"][part],
                        self._centroids[domain, cluster], domain)
    if self._evidence is not None:
      # Its own stream: the context, domain and target draws are those of a model without it.
      rng = np.random.default_rng([self._seed, _SFT_STREAM, step, _HIDE_STREAM])
      hide = rng.random(batch_size)[part] < self._hide_cluster_prob
      batch["evidence"] = self._evidence(batch["context"], batch["context_mask"], domain,
                                         exclude_items=ids["context_ids"][part],
                                         exclude_group=np.where(hide, cluster, -1))
    return batch


def _check_fraction(name: str, value: float) -> None:
  if not isinstance(value, (int, float, np.floating)) or not 0 < float(value) <= 1 or (
      math.isnan(float(value))):
    raise errors.UserError(f"{name} must be in (0, 1]; got {value!r}")


def _check_null_domain(null_domain: int, source: TrajectorySource) -> None:
  """The model's null domain id is its number of domains; a mismatch means a wrong model."""
  if null_domain != source.num_domains:
    raise errors.UserError(
        f"null_domain {null_domain} does not match the {source.num_domains} domains of the "
        f"density (the null domain id is the number of domains)")
