"""Latent pattern clusters: k-means over train item embeddings (DESIGN.md section 5, stage 2).

Stages 2 and 3 group items into clusters without reading the ground-truth `patterns`: plain
Euclidean k-means over the (unit-norm) embeddings of train items only. The implementation scales
to millions of points: k-means++ seeding runs on a bounded random subsample, and every Lloyd pass
walks the points in fixed-size jitted blocks, so no [N, k] distance matrix is ever held at once.
Everything is a deterministic function of the inputs and the seed (on one platform).

`agreement` compares clusters with the true patterns; it is an evaluation-only diagnostic.
"""

import functools
import math
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import metric_predictor
from modit_jax import sizing

# k-means++ seeding looks at this many points at most (more only when k is larger): seeding is
# k sequential passes over the sample, so it must not grow with N.
_INIT_SAMPLE = 20000
# A block's [rows, k] float32 distance matrix stays under 2**26 entries (256 MB), whatever k.
_MAX_BLOCK_ENTRIES = 1 << 26
# Above this many point-centroid pairs (N k) `kmeans` runs in two levels. A flat Lloyd pass
# costs N k d multiply-adds: at the 6.8M train items and 85,000 latent clusters of the 10M-item
# world that is 3.7e13, by arithmetic most of an hour per pass on a 2-core CPU. The default
# world (68k x 850) and the real development catalog are far below and keep the flat algorithm.
_TWO_LEVEL_MIN_PAIRS = 1 << 33
# Points per coarse cluster that two-level k-means fits its coarse centroids on (faiss trains
# inverted-file quantisers on 39-256 per list): at 10M items, 75k points instead of 6.8M, and
# the coarse level took 463 of the 953 s of k-means at full size.
_COARSE_SAMPLE_PER_CLUSTER = 256


def kmeans(x: np.ndarray, k: int, *, seed: int, num_iters: int = 50,
           batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
  """Euclidean k-means with greedy k-means++ seeding and Lloyd iterations.

  Args:
    x: float [N, d] points (numpy; may be a memmap, read block by block).
    k: number of clusters, 1 <= k <= N.
    seed: seeds the subsample and the k-means++ draws; equal seeds give equal results.
    num_iters: at most this many Lloyd updates; stops early once assignments stop changing.
    batch_size: points per jitted assignment block (fewer when k is so large that a block's
      distance matrix would pass 2**26 entries). Results do not depend on it beyond float
      rounding of the centroid sums.

  Returns:
    (centroids float32 [k, d], assign int32 [N]); `assign` is each point's nearest centroid.
    A cluster ends empty only when x has fewer than k distinct points. When N k passes
    `_TWO_LEVEL_MIN_PAIRS` the clusters are found in two levels (`_two_level_kmeans`) and a
    point's cluster is its nearest centroid within its coarse cluster.

  Raises:
    errors.UserError: bad shapes, non-finite points, or k / num_iters / batch_size out of range.
  """
  x = _check_points(x)
  n = x.shape[0]
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
    raise errors.UserError(f"k-means needs 1 <= k <= number of points ({n}); got k = {k!r}")
  if num_iters < 1:
    raise errors.UserError(f"k-means needs num_iters >= 1; got {num_iters}")
  if batch_size < 1:
    raise errors.UserError(f"k-means needs batch_size >= 1; got {batch_size}")
  k = int(k)
  if n * k > _TWO_LEVEL_MIN_PAIRS:
    return _two_level_kmeans(x, k, seed, num_iters, batch_size)
  return _flat_kmeans(x, k, seed, num_iters, batch_size)


def _flat_kmeans(x: np.ndarray, k: int, seed: int, num_iters: int, batch_size: int,
                 padded: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """k-means++ seeding and Lloyd passes over all N x k pairs (`kmeans`, arguments checked).

  `padded`: the jitted passes see N and k rounded up by `_bucket`, so that the many small runs
  of `_two_level_kmeans` share a few compiled shapes (one compile per run took most of its time
  and kept ~300 executables at 10M items). The padding is masked out, so the clusters are
  those of the exact shapes up to float rounding; a single run keeps its exact shapes.
  """
  centroids = _init_centroids(x, k, seed, padded)
  previous = None
  for _ in range(num_iters):
    assign, sqdist, sums, counts = _lloyd_pass(x, centroids, batch_size, padded)
    if previous is not None and np.array_equal(assign, previous):
      return centroids, assign  # converged: the centroids are the means of this assignment
    centroids = _update_centroids(sums, counts, sqdist, x, centroids)
    previous = assign
  assign, _, _, _ = _lloyd_pass(x, centroids, batch_size, padded)
  return centroids, assign


def _two_level_kmeans(x: np.ndarray, k: int, seed: int, num_iters: int,
                      batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """k-means in two levels, for N k beyond `_TWO_LEVEL_MIN_PAIRS`.

  Flat k-means finds about sqrt(k) coarse clusters; each coarse cluster's points are then split
  by flat k-means into a share of the k clusters proportional to its size (`_apportion`). A
  pass then costs about 2 N sqrt(k) d instead of N k d. The price: a point near the border of
  two coarse clusters only chooses among the centroids of its own.
  """
  n = x.shape[0]
  num_coarse = min(k, max(2, round(math.sqrt(k))))
  start = time.perf_counter()
  logging.info("k-means of %d points into %d clusters, in two levels: %d coarse clusters first",
               n, k, num_coarse)
  # The coarse level only partitions the points for the splits: its centroids are fitted on a
  # seeded sample (as inverted-file quantisers are trained), then every point is assigned once.
  size = min(n, _COARSE_SAMPLE_PER_CLUSTER * num_coarse)
  sample = np.sort(np.random.default_rng([int(seed), 2]).choice(n, size, replace=False))
  coarse_centroids, _ = _flat_kmeans(np.asarray(x[sample], np.float32), num_coarse, seed,
                                     num_iters, batch_size)
  coarse, _ = assign_points(x, coarse_centroids, batch_size)
  logging.info("k-means: %d coarse clusters in %.0f s; splitting each", num_coarse,
               time.perf_counter() - start)
  sizes = np.bincount(coarse, minlength=num_coarse)
  shares = _apportion(k, sizes)
  members = np.argsort(coarse, kind="stable")  # each coarse cluster's rows, ascending
  starts = np.concatenate([[0], np.cumsum(sizes)])
  centroids = np.empty((k, x.shape[1]), np.float32)
  assign = np.empty(n, np.int32)
  first = 0
  for c in np.flatnonzero(shares):
    rows = members[starts[c]:starts[c + 1]]
    share = int(shares[c])
    # Each coarse cluster its own seed: its split does not depend on the others'.
    sub_seed = int(np.random.default_rng([int(seed), 1, int(c)]).integers(1 << 31))
    sub_centroids, sub_assign = _flat_kmeans(np.asarray(x[rows], np.float32), share, sub_seed,
                                             num_iters, batch_size, padded=True)
    centroids[first:first + share] = sub_centroids
    assign[rows] = first + sub_assign
    first += share
    if (c + 1) % max(1, num_coarse // 10) == 0:
      logging.info("k-means: %d of %d coarse clusters split (%.0f s)", c + 1, num_coarse,
                   time.perf_counter() - start)
  return centroids, assign


def _apportion(k: int, sizes: np.ndarray) -> np.ndarray:
  """k clusters shared over groups of `sizes` points: proportional, each non-empty group at
  least 1 and at most its size (largest remainders; ties to the lower index). Needs
  1 <= k <= sizes.sum() and at most k non-empty groups."""
  sizes = np.asarray(sizes, np.int64)
  exact = k * sizes / sizes.sum()
  shares = np.clip(np.floor(exact).astype(np.int64), np.minimum(sizes, 1), sizes)
  remainder = exact - shares
  while shares.sum() < k:  # hand out the rest where the remainder is largest
    open_groups = np.flatnonzero(shares < sizes)
    best = open_groups[np.lexsort((open_groups, -remainder[open_groups]))]
    take = best[:k - shares.sum()]
    shares[take] += 1
    remainder[take] -= 1
  while shares.sum() > k:  # the lifts to 1 overshot: take back where the remainder is lowest
    open_groups = np.flatnonzero(shares > 1)
    worst = open_groups[np.lexsort((open_groups, remainder[open_groups]))]
    take = worst[:shares.sum() - k]
    shares[take] -= 1
    remainder[take] += 1
  return shares


def assign_points(x: np.ndarray, centroids: np.ndarray,
                  batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
  """Nearest centroid of each point, in blocks: (assign int32 [N], squared distance float32 [N])."""
  x = _check_points(x)
  assign, sqdist, _, _ = _lloyd_pass(x, np.asarray(centroids, np.float32), batch_size)
  return assign, sqdist


def latent_clusters(catalog: catalog_lib.Catalog, k: int, seed: int,
                    train_embeddings: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """k-means over the embeddings of train items only (held-out items never enter).

  `train_embeddings`: float32 [n, d], the rows of `catalog.train_items()` when the caller holds
  them already (at 10M items each copy is 1.7 GB); None: gathered here.

  Returns:
    (train_items int64 [n] ascending, assign int32 [n] cluster of each, centroids float32 [k, d]).
  """
  train_items = catalog.train_items().astype(np.int64)
  check_num_clusters(k, len(train_items))
  x = _train_points(catalog, train_items, train_embeddings)
  centroids, assign = kmeans(x, int(k), seed=seed)
  return train_items, assign, centroids


def _train_points(catalog: catalog_lib.Catalog, train_items: np.ndarray,
                  train_embeddings: np.ndarray | None) -> np.ndarray:
  """float32 [n, d] embeddings of `train_items`: the caller's copy if given, else gathered."""
  if train_embeddings is None:
    return np.asarray(catalog.embeddings[train_items], np.float32)
  if train_embeddings.shape != (len(train_items), catalog.dim):
    raise ValueError(f"train_embeddings must be [{len(train_items)}, {catalog.dim}] (the "
                     f"catalog's train items); got {train_embeddings.shape}")
  return np.asarray(train_embeddings, np.float32)


def check_num_clusters(k: int, num_train_items: int) -> None:
  """Refuses a number of latent clusters outside [1, number of train items]."""
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= num_train_items:
    raise errors.UserError(f"the number of latent clusters must be in [1, {num_train_items}] "
                           f"(the number of train items); got {k!r}")


def agreement(assign: np.ndarray, true_labels: np.ndarray) -> dict[str, float]:
  """How well clusters match true labels: NMI (arithmetic-mean normalisation) and purity.

  Evaluation-only diagnostic: training never calls this (it reads ground-truth patterns).
  Purity is the share of items whose cluster's majority true label equals their own.
  """
  assign, true_labels = np.asarray(assign).ravel(), np.asarray(true_labels).ravel()
  if assign.shape != true_labels.shape or not assign.size:
    raise errors.UserError(f"agreement needs two equal-length non-empty label arrays; got "
                           f"{assign.shape} and {true_labels.shape}")
  _, a = np.unique(assign, return_inverse=True)
  _, b = np.unique(true_labels, return_inverse=True)
  ka, kb = int(a.max()) + 1, int(b.max()) + 1
  table = np.bincount(a * kb + b, minlength=ka * kb).reshape(ka, kb).astype(np.float64)
  n = table.sum()
  purity = float(table.max(axis=1).sum() / n)
  pa, pb, pab = table.sum(axis=1) / n, table.sum(axis=0) / n, table / n
  nz = pab > 0
  mi = float(np.sum(pab[nz] * np.log(pab[nz] / np.outer(pa, pb)[nz])))
  ha, hb = float(-np.sum(pa * np.log(pa))), float(-np.sum(pb * np.log(pb)))
  if ha == 0.0 and hb == 0.0:
    nmi = 1.0  # one cluster and one label: identical partitions
  else:
    nmi = max(0.0, mi) / ((ha + hb) / 2)
  return {"nmi": float(nmi), "purity": purity}


# ---------------------------------------------------------------------------------------------
# Internals.


def _check_points(x: np.ndarray) -> np.ndarray:
  if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    shape = getattr(x, "shape", type(x).__name__)
    raise errors.UserError(f"k-means needs a non-empty 2-D array of points; got {shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise errors.UserError(f"k-means needs float points; got dtype {x.dtype}")
  return x


def _bucket(n: int) -> int:
  """n rounded up to a multiple of a quarter of its power of two (at most 1/4 more than n)."""
  if n <= 8:
    return max(1, n)
  step = 1 << max(0, n.bit_length() - 3)
  return -(-n // step) * step


def _block_rows(n: int, k: int, batch_size: int, padded: bool = False) -> int:
  return max(1, min(int(batch_size), _bucket(n) if padded else n, _MAX_BLOCK_ENTRIES // k))


@jax.jit
def _assign_block(x: jax.Array, valid: jax.Array, centroids: jax.Array, real: jax.Array):
  """One block: nearest centroid, squared distance, per-cluster sums and counts of valid rows.

  Centroid rows at or past `real` (an int32 scalar) are padding and are never chosen.
  """
  k = centroids.shape[0]
  # HIGHEST: accelerators otherwise run float32 matmuls at reduced precision (bf16 / TF32),
  # which would change assignments between platforms.
  dots = jnp.matmul(x, centroids.T, precision=jax.lax.Precision.HIGHEST)
  scores = jnp.sum(centroids * centroids, axis=1)[None, :] - 2.0 * dots
  scores = jnp.where(jnp.arange(k)[None, :] < real, scores, jnp.inf)
  assign = jnp.argmin(scores, axis=1).astype(jnp.int32)
  sqdist = jnp.maximum(jnp.sum(x * x, axis=1) + jnp.min(scores, axis=1), 0.0)
  w = valid.astype(jnp.float32)
  sums = jax.ops.segment_sum(x * w[:, None], assign, num_segments=k)
  counts = jax.ops.segment_sum(w, assign, num_segments=k)
  return assign, sqdist, sums, counts


def _lloyd_pass(x: np.ndarray, centroids: np.ndarray, batch_size: int, padded: bool = False):
  """Assigns every point in blocks; returns (assign, sqdist, sums float64 [k, d], counts [k]).

  `padded` as in `_flat_kmeans`.
  """
  n, d = x.shape
  k = centroids.shape[0]
  padded_k = _bucket(k) if padded else k
  rows = _block_rows(n, padded_k, batch_size, padded)
  c = jnp.asarray(np.concatenate([np.asarray(centroids, np.float32),
                                  np.zeros((padded_k - k, d), np.float32)]))
  real = jnp.int32(k)
  assign = np.empty(n, np.int32)
  sqdist = np.empty(n, np.float32)
  sums = np.zeros((k, d), np.float64)
  counts = np.zeros(k, np.float64)
  for start in range(0, n, rows):
    block = np.asarray(x[start:start + rows], np.float32)
    if not np.isfinite(block).all():  # checked block by block: x may be a 10M-row memmap
      bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
      raise errors.UserError(f"k-means needs finite points; row {bad} has NaN or inf")
    m = len(block)
    # The last block is zero-padded to the same shape, so the jitted function compiles once.
    if m < rows:
      block = np.concatenate([block, np.zeros((rows - m, d), np.float32)])
    valid = np.arange(rows) < m
    a, s, blk_sums, blk_counts = _assign_block(jnp.asarray(block), jnp.asarray(valid), c, real)
    assign[start:start + m] = np.asarray(a)[:m]
    sqdist[start:start + m] = np.asarray(s)[:m]
    # Blocks add up in float64 on the host: millions of float32 additions would drift.
    sums += np.asarray(blk_sums, np.float64)[:k]
    counts += np.asarray(blk_counts, np.float64)[:k]
  return assign, sqdist, sums, counts


def _update_centroids(sums: np.ndarray, counts: np.ndarray, sqdist: np.ndarray, x: np.ndarray,
                      centroids: np.ndarray) -> np.ndarray:
  """Lloyd update; an empty cluster moves to one of the points farthest from their centroid."""
  new = np.asarray(centroids, np.float64).copy()
  full = counts > 0
  new[full] = sums[full] / counts[full, None]
  empty = np.flatnonzero(~full)
  if len(empty):
    # The len(empty) largest distances, ties broken by point index: deterministic.
    n = len(sqdist)
    e = min(len(empty), n)
    threshold = np.partition(sqdist, n - e)[n - e]
    candidates = np.flatnonzero(sqdist >= threshold)
    farthest = candidates[np.lexsort((candidates, -sqdist[candidates]))][:e]
    new[empty[:e]] = np.asarray(x[farthest], np.float64)
  return new.astype(np.float32)


def _init_centroids(x: np.ndarray, k: int, seed: int, padded: bool = False) -> np.ndarray:
  """Greedy k-means++ on a seeded random subsample of at most max(20k, k) points.

  `padded` as in `_flat_kmeans`: the sample and k enter the jitted seeding rounded up by
  `_bucket`, the padding masked out.
  """
  n = x.shape[0]
  size = min(n, max(_INIT_SAMPLE, k))
  rng = np.random.default_rng([int(seed), 0])
  rows = np.arange(n) if size == n else np.sort(rng.choice(n, size=size, replace=False))
  sample = np.asarray(x[rows], np.float32)
  # sklearn's choice of candidates per step: markedly better seeds than plain k-means++.
  trials = 2 + int(math.log(k))
  slots = _bucket(k) if padded else k
  if padded:
    sample = np.concatenate([sample, np.zeros((_bucket(size) - size, sample.shape[1]),
                                              np.float32)])
  idx = _kmeanspp(jnp.asarray(sample), jax.random.PRNGKey(int(seed) % (1 << 31)),
                  jnp.int32(size), jnp.int32(k), slots, trials)
  return sample[np.asarray(idx)[:k]]


@functools.partial(jax.jit, static_argnums=(4, 5))
def _kmeanspp(sample: jax.Array, key: jax.Array, size: jax.Array, k: jax.Array, slots: int,
              trials: int) -> jax.Array:
  """Indices of k seeds among the first `size` rows of `sample` (the rest is padding), each
  of `trials` D^2-drawn candidates the best; int32 [slots], the first k filled."""
  real = jnp.arange(sample.shape[0]) < size
  sq = jnp.sum(sample * sample, axis=1)

  def dist_to(points):  # [c, d] -> [c, s] squared distances to every sample point
    dots = jnp.matmul(points, sample.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(jnp.sum(points * points, axis=1)[:, None] + sq[None, :] - 2.0 * dots,
                       0.0)

  key, sub = jax.random.split(key)
  first = jax.random.randint(sub, (), 0, size)
  idx = jnp.zeros(slots, jnp.int32).at[0].set(first)
  # Padding rows at distance 0 are never drawn, and the min below keeps them there.
  d2 = jnp.where(real, dist_to(sample[first][None])[0], 0.0)

  def body(i, carry):
    idx, d2, key = carry
    key, draw, fallback = jax.random.split(key, 3)
    cdf = jnp.cumsum(d2)
    total = cdf[-1]
    u = jax.random.uniform(draw, (trials,)) * total
    # compare_all: [trials, s] comparisons; compiles faster than the default scan.
    cand = jnp.minimum(jnp.searchsorted(cdf, u, side="right", method="compare_all"), size - 1)
    # All remaining distances zero (fewer distinct points than k): any point will do.
    cand = jnp.where(total > 0, cand, jax.random.randint(fallback, (trials,), 0, size))
    cand_d2 = jnp.minimum(d2[None, :], dist_to(sample[cand]))
    best = jnp.argmin(jnp.sum(cand_d2, axis=1))
    return idx.at[i].set(cand[best].astype(jnp.int32)), cand_d2[best], key

  idx, _, _ = jax.lax.fori_loop(1, k, body, (idx, d2, key))
  return idx


def relative_features(catalog: catalog_lib.Catalog, config: ml_collections.ConfigDict,
                      train_embeddings: np.ndarray | None = None
                      ) -> metric_predictor.RelativeFeatures | None:
  """The metric predictor's relative features that `config` (its config) asks for on `catalog`.

  None: the bare embedding. The regions are k-means over the catalog's train items only
  (`sizing.num_predictor_regions` of them); the offsets enter at unit mean norm.
  `train_embeddings` as in `latent_clusters`.
  """
  if not config.get("relative_features", False):
    return None
  train_items = catalog.train_items()
  count = sizing.num_predictor_regions(len(train_items), sizing.train_seed_size(catalog))
  x = _train_points(catalog, train_items, train_embeddings)
  centres, assign = kmeans(x, min(count, len(train_items)), seed=int(config.seed))
  centres = np.asarray(centres, np.float32)
  scale = float(np.linalg.norm(x - centres[np.asarray(assign)], axis=1).mean())
  return metric_predictor.RelativeFeatures(centres, max(scale, 1e-6))
