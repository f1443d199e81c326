"""Per-query retrieval metrics: Joint@K, Purity@K, Attr@K and Bound@K (DESIGN.md section 1).

For a query with seed set S, pattern p and attribute domain m, over its top-K retrieved items:
  * Joint@K  = share of the top-K in pattern p AND positive for m (the headline metric);
  * Purity@K = share of the top-K in pattern p;
  * Attr@K   = share of the top-K positive for m;
  * Bound@K  = min(1, #{non-seed items of the catalog in p positive for m} / K), the best
    Joint@K that any answer to the query could reach (seeds are excluded from retrieval).

Everything is vectorised over queries. The catalog arrays (`patterns`, `attributes`) may be
`np.memmap`s of a 10M-item catalog: the metrics only gather the rows of the retrieved and seed
items, and the one full pass (the [P, M] count table behind Bound@K) streams the catalog in
chunks, so the catalog is never held in memory whole. That table depends on the catalog only:
compute it once with `pattern_attribute_counts` and pass it as `counts` when scoring many
methods against the same catalog.
"""

from typing import Sequence

import numpy as np

KS = (10, 20, 50)

# Rows per chunk when streaming the catalog: 1M rows of int32 patterns + bool[M] attributes
# stay in the tens of MB whatever N is.
_CHUNK_ROWS = 1 << 20


def pattern_attribute_counts(patterns: np.ndarray, attributes: np.ndarray,
                             chunk_rows: int = _CHUNK_ROWS) -> np.ndarray:
  """Counts the attribute-positive items of every pattern.

  Args:
    patterns: int [N] pattern id of every item (ids >= 0); may be a memmap.
    attributes: bool [N, M] attribute labels; may be a memmap.
    chunk_rows: how many catalog rows to read at a time.

  Returns:
    int64 [P, M], P = max pattern id + 1: entry [p, m] is the number of items of pattern p
    positive for domain m.
  """
  patterns, attributes = _check_catalog(patterns, attributes)
  num_items, num_domains = attributes.shape
  counts = np.zeros((0, num_domains), np.int64)
  for start in range(0, num_items, chunk_rows):
    # np.asarray on a memmap slice reads just this chunk; nothing else of the catalog is copied.
    pat = np.asarray(patterns[start:start + chunk_rows])
    att = np.asarray(attributes[start:start + chunk_rows], dtype=bool)
    if pat.size and pat.min() < 0:
      raise ValueError(f"patterns holds a negative pattern id ({pat.min()}).")
    rows, cols = np.nonzero(att)
    flat = pat[rows].astype(np.int64) * num_domains + cols
    # The table grows with the largest pattern id seen so far, which saves a separate pass
    # over the catalog to find the number of patterns.
    num_patterns = int(pat.max()) + 1 if pat.size else 0
    chunk_counts = np.bincount(flat, minlength=num_patterns * num_domains).reshape(
        num_patterns, num_domains)
    if chunk_counts.shape[0] > counts.shape[0]:
      counts = np.pad(counts, ((0, chunk_counts.shape[0] - counts.shape[0]), (0, 0)))
    counts[:chunk_counts.shape[0]] += chunk_counts
  return counts


def retrieval_metrics(retrieved: np.ndarray, seeds: np.ndarray, query_pattern: np.ndarray,
                      query_domain: np.ndarray, patterns: np.ndarray, attributes: np.ndarray,
                      ks: Sequence[int] = KS,
                      counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Computes Joint@K, Purity@K, Attr@K and Bound@K for every query.

  Args:
    retrieved: int [Q, Kmax] retrieved item ids, best first; Kmax >= max(ks).
    seeds: int [Q, s] seed item ids of every query.
    query_pattern: int [Q] the pattern p of every query.
    query_domain: int [Q] the attribute domain m of every query.
    patterns: int [N] pattern id of every catalog item; may be a memmap.
    attributes: bool [N, M] attribute labels of every catalog item; may be a memmap.
    ks: the cut-offs K to report.
    counts: optional precomputed `pattern_attribute_counts(patterns, attributes)`, to skip
      the pass over the catalog when scoring several methods against it.

  Returns:
    Per-query float64 [Q] arrays under `joint@K`, `purity@K`, `attr@K` and `bound@K` for
    every K in `ks`.

  Raises:
    ValueError: on inconsistent shapes, out-of-range ids or K values.
  """
  patterns, attributes = _check_catalog(patterns, attributes)
  num_items, num_domains = attributes.shape
  retrieved = _int_array(retrieved, "retrieved", ndim=2)
  seeds = _int_array(seeds, "seeds", ndim=2)
  query_pattern = _int_array(query_pattern, "query_pattern", ndim=1)
  query_domain = _int_array(query_domain, "query_domain", ndim=1)
  num_queries, k_max = retrieved.shape
  for name, arr in (("seeds", seeds), ("query_pattern", query_pattern),
                    ("query_domain", query_domain)):
    if arr.shape[0] != num_queries:
      raise ValueError(f"{name} has {arr.shape[0]} queries but retrieved has {num_queries}.")
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1:
    raise ValueError(f"ks must be a non-empty list of positive cut-offs, got {ks}.")
  if k_max < max(ks):
    raise ValueError(f"retrieved has {k_max} columns, fewer than the largest K ({max(ks)}).")
  _check_range(retrieved, "retrieved", num_items)
  _check_range(seeds, "seeds", num_items)
  _check_range(query_domain, "query_domain", num_domains)
  if num_queries and query_pattern.min() < 0:
    raise ValueError(f"query_pattern holds a negative pattern id ({query_pattern.min()}).")

  # Only the top max(ks) columns matter; gather their labels (a memmap reads just those rows).
  top = retrieved[:, :max(ks)]
  in_pattern = np.asarray(patterns[top]) == query_pattern[:, None]
  positive = np.asarray(attributes[top, query_domain[:, None]], dtype=bool)
  # Cumulative hit counts give every K from one pass over the columns.
  cum_joint = np.cumsum(in_pattern & positive, axis=1)
  cum_purity = np.cumsum(in_pattern, axis=1)
  cum_attr = np.cumsum(positive, axis=1)

  num_reachable = _reachable_positives(seeds, query_pattern, query_domain, patterns,
                                       attributes, counts)
  out = {}
  for k in ks:
    out[f"joint@{k}"] = cum_joint[:, k - 1] / k
    out[f"purity@{k}"] = cum_purity[:, k - 1] / k
    out[f"attr@{k}"] = cum_attr[:, k - 1] / k
    out[f"bound@{k}"] = np.minimum(1.0, num_reachable / k)
  return {key: np.asarray(value, np.float64) for key, value in out.items()}


def _reachable_positives(seeds: np.ndarray, query_pattern: np.ndarray,
                         query_domain: np.ndarray, patterns: np.ndarray,
                         attributes: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
  """#{non-seed items in the query's pattern positive for its domain}, int64 [Q]."""
  num_domains = attributes.shape[1]
  if counts is None:
    counts = pattern_attribute_counts(patterns, attributes)
  counts = np.asarray(counts)
  if counts.ndim != 2 or counts.shape[1] != num_domains:
    raise ValueError(f"counts must have shape [P, {num_domains}], got {counts.shape}.")
  # A query pattern beyond the table has no items at all, hence no positives.
  known = query_pattern < counts.shape[0]
  total = np.zeros(query_pattern.shape, np.int64)
  total[known] = counts[query_pattern[known], query_domain[known]]

  # Seeds are never retrievable: remove those that count towards the total. A seed id repeated
  # within a query must be removed once only, so mask repeats after sorting each row.
  sorted_seeds = np.sort(seeds, axis=1)
  first = np.ones(sorted_seeds.shape, bool)
  first[:, 1:] = sorted_seeds[:, 1:] != sorted_seeds[:, :-1]
  seed_hit = ((np.asarray(patterns[sorted_seeds]) == query_pattern[:, None])
              & np.asarray(attributes[sorted_seeds, query_domain[:, None]], dtype=bool)
              & first)
  return total - seed_hit.sum(axis=1)


def _check_catalog(patterns: np.ndarray,
                   attributes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Checks catalog shapes without reading the arrays (memmaps stay memmaps)."""
  if not isinstance(patterns, np.ndarray):
    patterns = np.asarray(patterns)
  if not isinstance(attributes, np.ndarray):
    attributes = np.asarray(attributes)
  if patterns.ndim != 1 or not np.issubdtype(patterns.dtype, np.integer):
    raise ValueError(f"patterns must be a 1-D integer array, got {patterns.dtype} "
                     f"{patterns.shape}.")
  if attributes.ndim != 2 or attributes.shape[0] != patterns.shape[0]:
    raise ValueError(f"attributes must have shape [{patterns.shape[0]}, M], got "
                     f"{attributes.shape}.")
  return patterns, attributes


def _int_array(value: np.ndarray, name: str, ndim: int) -> np.ndarray:
  arr = np.asarray(value)
  if arr.ndim != ndim or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
    raise ValueError(f"{name} must be a {ndim}-D integer array, got {arr.dtype} {arr.shape}.")
  return arr.astype(np.int64, copy=False)


def _check_range(arr: np.ndarray, name: str, limit: int) -> None:
  if arr.size and (arr.min() < 0 or arr.max() >= limit):
    raise ValueError(f"{name} holds ids outside [0, {limit}): min {arr.min()}, "
                     f"max {arr.max()}.")
