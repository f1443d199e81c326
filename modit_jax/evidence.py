"""Neighbour evidence: what the observed labels of train items near a seed set say (issue 19).

A conditioned model can read, besides its seeds and domain m, a few evidence vectors computed
from train items and their observed labels only (what DESIGN section 2 lets training read):

  token 0            g_m, the global direction of m: normalise(mean of the observed positives
                     of m - mean of the observed items of m), the `centroid_global_shift` one;
  per size n, two    the local label contrast: mean of the observed positives of m among the n
                     train items nearest the seed centroid - mean of the observed items of m
                     there (0 with no observed positive nearby), the `local_shift` one; and the
                     neighbourhood offset: mean of those n items - the seeds' mean.

Every vector is a displacement from the seeds' mean, in the model's target units (times the
target scale), so the model reads them as candidate answers it could generate. The offset
tells it how far the neighbourhood is: near for a seed set of a pattern that has train items
(item holdout), farther for an unseen pattern, where the local contrast belongs to other
patterns and the model should trust it less. Training shows it both cases by hiding, for some
examples, the latent cluster the seeds come from (`exclude_group`); latent clusters are k-means
over train items, so no hidden truth enters. Seeds given as catalog ids are never their own
neighbours, and held-out items are never neighbours (only train rows are searched).

With `catalog_sizes` (`model.catalog_offsets`) the model also reads, per size n, the
unlabelled neighbourhood offset over the whole catalog: the mean of the n catalog items
nearest the seeds (held-out items included: their embeddings, never their labels, as DESIGN
section 2 lets training read all embeddings) minus the seeds' mean, the vector the
`neighbourhood_offset` baseline steps along. An unseen pattern's own items are in the catalog,
so this offset points at the rest of the seeds' pattern whether or not it had train items;
hiding a cluster (`exclude_group`) hides it from the labelled neighbourhood only.

Labelled neighbours are found by exact search over the train embeddings. The catalog offsets
are one function, `catalog_offsets`, over one index, `offset_index`: the catalog's default
index (`retrieval.build_index`, ScaNN above 2,000 items), which training, evaluation and
serving build alike (its build is seeded) or share, so the model reads in serving the
neighbourhoods it was trained on, and the `neighbourhood_offset` baseline and the novelty
gate's fallback read the same ones. An exact search of the whole catalog per seed set cost
5x more (docs/evidence.md, "Approximate catalog neighbourhoods").
"""

from typing import Sequence

import numpy as np
import scipy.sparse

from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import retrieval

# Rows per block of the exact search: a [rows, train items] float32 block of at most ~64 MiB.
_SEARCH_CELLS = 1 << 24


def normalize(x: np.ndarray) -> np.ndarray:
  """L2-normalises the rows of x (float32)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def seed_centroids(embeddings: np.ndarray, seeds: np.ndarray) -> np.ndarray:
  """float32 [Q, d]: the normalised mean embedding of each query's seeds."""
  return normalize(np.asarray(embeddings[np.asarray(seeds)], np.float32).mean(axis=1))


def observed_positive_means(catalog: catalog_lib.Catalog) -> tuple[np.ndarray, np.ndarray]:
  """Means over observed labels, per domain: (observed positives [M, d], observed items [M, d])."""
  observed = np.asarray(catalog.observed, bool)
  positive = observed & np.asarray(catalog.attributes, bool)  # read only where observed
  emb = np.asarray(catalog.embeddings, np.float32)
  pos, all_ = [], []
  for m in range(catalog.num_domains):
    if not positive[:, m].any():
      raise errors.UserError(
          f"domain {catalog.domains[m]!r} has no observed positive label; the attribute "
          f"baselines need at least one")
    pos.append(emb[positive[:, m]].mean(axis=0))
    all_.append(emb[observed[:, m]].mean(axis=0))
  return np.stack(pos), np.stack(all_)


def global_directions(catalog: catalog_lib.Catalog) -> np.ndarray:
  """float32 [M, d]: g_m = normalise(mean observed positives - mean observed items) per domain."""
  positives, labelled = observed_positive_means(catalog)
  return normalize(positives - labelled)


def offset_index(embeddings: np.ndarray,
                 reuse: retrieval.Index | None = None) -> retrieval.Index:
  """The index `catalog_offsets` searches for a model's evidence: the catalog's default index.

  `reuse`: an index the caller already holds over the same `embeddings`; it is taken when it
  is the default index (same kind and parameters, hence the same neighbourhoods, as the
  build is seeded), and a default one is built otherwise.
  """
  embeddings = np.asarray(embeddings, np.float32)
  if (reuse is not None and reuse.kind == "scann" and reuse.num_items == len(embeddings)
      and reuse.params == retrieval.scann_params(len(embeddings))):
    return reuse
  return retrieval.build_index(embeddings)


def catalog_offsets(embeddings: np.ndarray, index: retrieval.Index, seed_means: np.ndarray,
                    exclude: np.ndarray | None, sizes: Sequence[int]) -> dict[int, np.ndarray]:
  """Per size n: float32 [Q, d], the mean of the n catalog items nearest each seed mean minus it.

  The neighbourhood offset over the whole catalog, unlabelled: `index` searches every catalog
  item (held-out ones too: their embeddings, never their labels), `exclude` int [Q, E] (-1:
  none; None: nothing) keeps the seeds out, and `seed_means` float [Q, d] are the seeds' mean
  embeddings, unnormalised (a search ranks the same for any positive scale of its query). A
  catalog with fewer than n items besides the seeds gives the mean over all of them. Seeds
  that sit on one side of their pattern, as seeds without the attribute do, get an offset
  toward the rest of it (the `neighbourhood_offset` baseline, the novelty gate's fallback and
  the model's catalog-offset evidence, docs/novelty.md and above).
  """
  sizes = sorted({int(n) for n in sizes})
  seed_means = np.asarray(seed_means, np.float32)
  excluded = 0 if exclude is None else np.asarray(exclude).shape[1]
  near, _ = index.search(seed_means, min(sizes[-1], index.num_items - excluded),
                         exclude=exclude)
  out = {n: np.empty(seed_means.shape, np.float32) for n in sizes}
  for start in range(0, len(near), 4096):  # bounded memory for the sparse matrices
    rows = slice(start, start + 4096)
    block = near[rows]
    total, done = np.zeros(seed_means[rows].shape, np.float32), 0
    for n in sizes:
      # Sums over consecutive slices of the ranking (each neighbour read once), as a sparse
      # 0/1 matrix times the embeddings: 3-4x faster than gathering [Q, n, d] and summing.
      upto = min(n, block.shape[1])
      width = upto - done
      if width:
        picks = scipy.sparse.csr_matrix(
            (np.ones(len(block) * width, np.float32), block[:, done:upto].ravel(),
             np.arange(0, len(block) * width + 1, width)),
            shape=(len(block), len(embeddings)))
        total += picks @ embeddings
      done = upto
      out[n][rows] = total / upto - seed_means[rows]
  return out


def rows_by_size(by_size: dict[int, np.ndarray], row_sizes: np.ndarray) -> np.ndarray:
  """float32 [Q, d]: row q of `by_size[row_sizes[q]]`, zeros where that size is not a key.

  `by_size` maps a neighbourhood size to per-query vectors [Q, d] (`catalog_offsets`,
  `label_contrast`); each query then takes the size its own knob chose.
  """
  row_sizes = np.asarray(row_sizes)
  first = next(iter(by_size.values()))
  out = np.zeros(first.shape, np.float32)
  for n, vectors in by_size.items():
    rows = row_sizes == n
    out[rows] = vectors[rows]
  return out


def label_contrast(embeddings: np.ndarray, near: np.ndarray, known: np.ndarray,
                   positive: np.ndarray, sizes: Sequence[int]) -> dict[int, np.ndarray]:
  """Per size n: float32 [Q, d], labelled-positive mean minus labelled mean over near[:, :n].

  `near` int [Q, n_max] are item ids (rows of `embeddings`) nearest first; `known` and
  `positive` bool [Q, n_max] their labels. A row with no labelled positive among its first n
  gets a zero vector: no evidence of a direction.
  """
  out = {}
  for n in sorted(int(s) for s in sizes):
    rows = []
    for start in range(0, len(near), 256):  # [256, n, d] at a time: bounded memory
      block = np.asarray(embeddings[near[start:start + 256, :n]], np.float32)
      k, p = known[start:start + 256, :n], positive[start:start + 256, :n]
      mean_known = np.einsum("qn,qnd->qd", k, block) / np.maximum(k.sum(1), 1)[:, None]
      mean_pos = np.einsum("qn,qnd->qd", p, block) / np.maximum(p.sum(1), 1)[:, None]
      rows.append(np.where(p.any(1)[:, None], mean_pos - mean_known, 0.0))
    out[n] = (np.concatenate(rows) if rows else np.zeros((0, embeddings.shape[1]))
              ).astype(np.float32)
  return out


def num_tokens(sizes: Sequence[int], catalog_sizes: Sequence[int] = ()) -> int:
  """Evidence vectors per query: g_m, then a contrast and an offset per labelled size in
  `sizes`, then a catalog offset per size in `catalog_sizes` (0 when both are empty: the model
  reads no evidence)."""
  if not len(sizes) and not len(catalog_sizes):
    return 0
  return 1 + 2 * len(sizes) + len(catalog_sizes)


def check_sizes(sizes: Sequence[int], field: str = "model.neighbour_evidence") -> tuple[int, ...]:
  """The sizes as sorted ints; a UserError naming `field` unless each is an integer >= 1."""
  out = []
  for s in sizes:
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
      raise errors.UserError(f"{field} must hold neighbourhood sizes >= 1; got {tuple(sizes)}")
    out.append(int(s))
  if len(set(out)) != len(out):
    raise errors.UserError(f"{field} has a repeated size: {tuple(sizes)}")
  return tuple(sorted(out))


class NeighbourEvidence:
  """Computes the evidence vectors of seed sets from a catalog's train items."""

  def __init__(self, catalog: catalog_lib.Catalog, sizes: Sequence[int], scale: float,
               groups: np.ndarray | None = None, catalog_sizes: Sequence[int] = (),
               catalog_index: retrieval.Index | None = None):
    """Reads the train rows of `catalog` (embeddings and observed labels) and, with
    `catalog_sizes`, every row's embedding.

    Args:
      catalog: the catalog (only train items' observed labels are read).
      sizes: labelled neighbourhood sizes n (`model.neighbour_evidence`).
      scale: the model's target scale; every vector is multiplied by it.
      groups: int [train items] a group id per train item in `catalog.train_items()` order
        (the latent clusters), for `exclude_group`; None: no group can be excluded.
      catalog_sizes: unlabelled neighbourhood sizes over the whole catalog
        (`model.catalog_offsets`); at least one of the two size lists is non-empty.
      catalog_index: an index over `catalog.embeddings` the caller holds, reused for the
        catalog offsets when it is the default one (`offset_index`).
    """
    self.sizes = check_sizes(sizes)
    self.catalog_sizes = check_sizes(catalog_sizes, "model.catalog_offsets")
    if not self.sizes and not self.catalog_sizes:
      raise errors.UserError("neighbour evidence needs at least one neighbourhood size")
    self.scale = float(scale)
    self._catalog_embeddings = None
    self.catalog_index = None  # what the catalog offsets search (`offset_index`)
    if self.catalog_sizes:
      self._catalog_embeddings = np.asarray(catalog.embeddings, np.float32)
      self.catalog_index = offset_index(self._catalog_embeddings, catalog_index)
    self.num_domains = catalog.num_domains
    train = catalog.train_items()
    if len(train) < 2:
      raise errors.UserError("neighbour evidence needs at least 2 train items")
    self._train = train
    self._embeddings = np.ascontiguousarray(catalog.embeddings[train], dtype=np.float32)
    observed = np.asarray(catalog.observed[train], bool)
    self._known = observed
    self._positive = observed & np.asarray(catalog.attributes[train], bool)
    self._global = global_directions(catalog)
    self._row_of = np.full(catalog.num_items, -1, np.int64)
    self._row_of[train] = np.arange(len(train))
    if groups is not None:
      groups = np.asarray(groups, np.int64)
      if groups.shape != (len(train),):
        raise ValueError(f"groups must have shape ({len(train)},), got {groups.shape}")
    self._groups = groups

  @property
  def num_tokens(self) -> int:
    return num_tokens(self.sizes, self.catalog_sizes)

  def neighbours(self, centroids: np.ndarray, exclude_items: np.ndarray | None = None,
                 exclude_group: np.ndarray | None = None) -> np.ndarray:
    """Train rows int64 [Q, n_max] nearest each unit centroid [Q, d], nearest first.

    `exclude_items` int [Q, s] catalog ids (-1: none) and the train items of `exclude_group`
    int [Q] or [Q, g] (groups per query, -1: none) are never returned. Ties go to the lower
    row, so the result does not depend on blocking.
    """
    if exclude_group is not None and self._groups is None:
      raise ValueError("exclude_group needs the groups given at construction")
    rows = None
    if exclude_items is not None:
      items = np.asarray(exclude_items)
      rows = np.where(items >= 0, self._row_of[np.maximum(items, 0)], -1)
    groups = (None if exclude_group is None
              else np.asarray(exclude_group).reshape(len(centroids), -1))
    return _nearest(self._embeddings, centroids, self.sizes[-1], rows, groups, self._groups)

  def __call__(self, context: np.ndarray, context_mask: np.ndarray, domain: np.ndarray,
               exclude_items: np.ndarray | None = None,
               exclude_group: np.ndarray | None = None) -> np.ndarray:
    """float32 [Q, num_tokens, d] for contexts [Q, L, d] (mask [Q, L]) and domains [Q].

    A row whose domain is not a real one (the null domain) gets zeros: the model masks it.
    """
    context = np.asarray(context, np.float32)
    mask = np.asarray(context_mask, bool)
    domain = np.asarray(domain, np.int64)
    out = np.zeros((len(context), self.num_tokens, context.shape[-1]), np.float32)
    for start in range(0, len(context), 256):  # [256, n_max, d] gathers at a time
      rows = slice(start, start + 256)
      pick = lambda a: None if a is None else np.asarray(a)[rows]
      out[rows] = self._block(context[rows], mask[rows], domain[rows], pick(exclude_items),
                              pick(exclude_group))
    return out

  def _block(self, context: np.ndarray, mask: np.ndarray, domain: np.ndarray,
             exclude_items: np.ndarray | None, exclude_group: np.ndarray | None) -> np.ndarray:
    real = (domain >= 0) & (domain < self.num_domains)
    m = np.where(real, domain, 0)
    anchor = (context * mask[..., None]).sum(1) / np.maximum(mask.sum(1), 1)[:, None]
    tokens = [self._global[m]]
    if self.sizes:
      near = self.neighbours(normalize(anchor), exclude_items, exclude_group)
      known = self._known[near, m[:, None]]
      positive = self._positive[near, m[:, None]]
      contrast = label_contrast(self._embeddings, near, known, positive, self.sizes)
      for n in self.sizes:
        tokens.append(contrast[n])
        tokens.append(self._embeddings[near[:, :n]].mean(axis=1) - anchor)
    if self.catalog_sizes:
      # The hidden cluster stays: an unseen pattern's items are in the catalog, unlabelled.
      offsets = catalog_offsets(self._catalog_embeddings, self.catalog_index, anchor,
                                exclude_items, self.catalog_sizes)
      tokens.extend(offsets[n] for n in self.catalog_sizes)
    out = np.stack(tokens, axis=1) * self.scale
    return np.where(real[:, None, None], out, 0.0).astype(np.float32)


def _nearest(embeddings: np.ndarray, centroids: np.ndarray, size: int,
             exclude_rows: np.ndarray | None, exclude_groups: np.ndarray | None,
             groups: np.ndarray | None) -> np.ndarray:
  """Rows int64 [Q, min(size, N - 1)] of `embeddings` [N, d] nearest each centroid, nearest
  first, by exact inner product.

  `exclude_rows` int [Q, s] (-1: none) are never returned, nor rows whose `groups` [N] entry
  is one of the query's `exclude_groups` int [Q, g] (-1: none). Ties go to the lower row, so
  the result does not depend on blocking.
  """
  num, count = len(centroids), len(embeddings)
  want = min(size, count - 1)
  out = np.empty((num, want), np.int64)
  block = max(1, _SEARCH_CELLS // count)
  for start in range(0, num, block):
    stop = min(num, start + block)
    sims = np.asarray(centroids[start:stop], np.float32) @ embeddings.T
    if exclude_rows is not None:
      rows = exclude_rows[start:stop]
      q, col = np.nonzero(rows >= 0)
      sims[q, rows[q, col]] = -np.inf
    if exclude_groups is not None:
      for column in exclude_groups[start:stop].T:  # one group per query: [rows, N] masks
        hide = column[:, None] == groups[None, :]
        sims[hide & (column[:, None] >= 0)] = -np.inf
    top = np.argpartition(-sims, want - 1, axis=1)[:, :want]
    top_sims = np.take_along_axis(sims, top, 1)
    if np.isneginf(top_sims).any():
      # Fewer items than `want` are left after the exclusions: never hand back an excluded one.
      raise errors.UserError(
          f"neighbour evidence of size {want} needs more of the {count} train items than are "
          "left after excluding the seeds and the hidden cluster: use smaller neighbourhood "
          "sizes")
    order = np.lexsort((top, -top_sims), axis=1)
    out[start:stop] = np.take_along_axis(top, order, 1)
  return out
