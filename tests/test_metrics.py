"""Tests for modit_jax.metrics."""

import numpy as np
import pytest

from modit_jax import metrics

# A 12-item, 3-pattern, 2-domain catalog small enough to score by hand.
#              item:  0  1  2  3  4  5  6  7  8  9 10 11
_PATTERNS = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2], np.int32)
_ATTRIBUTES = np.array([
    [1, 0], [1, 1], [0, 1], [1, 0], [0, 0], [1, 1],  # pattern 0: d0 {0,1,3,5}, d1 {1,2,5}
    [1, 0], [0, 0], [1, 1], [0, 1],                  # pattern 1: d0 {6,8},     d1 {8,9}
    [1, 1], [0, 0],                                  # pattern 2: d0 {10},      d1 {10}
], bool)

# Query A: seeds not positive; Bound@2 clipped at 1 (4 reachable positives).
# Query B: both seeds positive for its domain: 3 - 2 = 1 reachable positive.
# Query C: every positive of the pattern is a seed: Bound 0.
# Query D: a seed repeated: removed once, 4 - 1 = 3 reachable positives.
_RETRIEVED = np.array([[0, 6, 3, 10], [2, 4, 9, 0], [7, 9, 11, 4], [5, 3, 0, 11]])
_SEEDS = np.array([[4, 2], [1, 5], [6, 8], [1, 1]])
_QUERY_PATTERN = np.array([0, 0, 1, 0])
_QUERY_DOMAIN = np.array([0, 1, 0, 0])
_EXPECTED = {
    "joint@2": [1 / 2, 1 / 2, 0, 1],
    "purity@2": [1 / 2, 1, 1, 1],
    "attr@2": [1, 1 / 2, 0, 1],
    "bound@2": [1, 1 / 2, 0, 1],
    "joint@4": [2 / 4, 1 / 4, 0, 3 / 4],
    "purity@4": [2 / 4, 3 / 4, 2 / 4, 3 / 4],
    "attr@4": [4 / 4, 2 / 4, 0, 3 / 4],
    "bound@4": [4 / 4, 1 / 4, 0, 3 / 4],
}


def _hand_metrics(**kwargs):
  return metrics.retrieval_metrics(_RETRIEVED, _SEEDS, _QUERY_PATTERN, _QUERY_DOMAIN,
                                   kwargs.pop("patterns", _PATTERNS),
                                   kwargs.pop("attributes", _ATTRIBUTES), ks=(2, 4), **kwargs)


def test_hand_computed_example():
  out = _hand_metrics()
  assert set(out) == set(_EXPECTED)
  for key, expected in _EXPECTED.items():
    assert out[key].dtype == np.float64
    np.testing.assert_allclose(out[key], expected, err_msg=key)


def test_pattern_attribute_counts_streams_in_chunks():
  expected = np.array([[4, 3], [2, 2], [1, 1]])
  np.testing.assert_array_equal(metrics.pattern_attribute_counts(_PATTERNS, _ATTRIBUTES),
                                expected)
  # Chunks that split patterns, and a last chunk whose patterns have no positives.
  for chunk_rows in (1, 5, 7):
    np.testing.assert_array_equal(
        metrics.pattern_attribute_counts(_PATTERNS, _ATTRIBUTES, chunk_rows=chunk_rows),
        expected)


def test_memmap_catalog_and_precomputed_counts(tmp_path):
  np.save(tmp_path / "patterns.npy", _PATTERNS)
  np.save(tmp_path / "attributes.npy", _ATTRIBUTES)
  patterns = np.load(tmp_path / "patterns.npy", mmap_mode="r")
  attributes = np.load(tmp_path / "attributes.npy", mmap_mode="r")
  counts = metrics.pattern_attribute_counts(patterns, attributes)
  for out in (_hand_metrics(patterns=patterns, attributes=attributes),
              _hand_metrics(counts=counts)):
    for key, expected in _EXPECTED.items():
      np.testing.assert_allclose(out[key], expected, err_msg=key)


def test_query_pattern_without_items_has_bound_zero():
  out = metrics.retrieval_metrics(_RETRIEVED[:1], _SEEDS[:1], np.array([7]), np.array([0]),
                                  _PATTERNS, _ATTRIBUTES, ks=(2,))
  np.testing.assert_array_equal(out["bound@2"], [0.0])
  np.testing.assert_array_equal(out["purity@2"], [0.0])


def _naive_metrics(retrieved, seeds, query_pattern, query_domain, patterns, attributes, ks):
  """Direct transcription of the definitions, one query at a time."""
  out = {f"{name}@{k}": [] for k in ks for name in ("joint", "purity", "attr", "bound")}
  for q in range(len(retrieved)):
    p, m = query_pattern[q], query_domain[q]
    seed_set = set(seeds[q].tolist())
    reachable = sum(1 for i in range(len(patterns))
                    if patterns[i] == p and attributes[i, m] and i not in seed_set)
    for k in ks:
      top = retrieved[q, :k]
      out[f"joint@{k}"].append(sum(patterns[i] == p and attributes[i, m] for i in top) / k)
      out[f"purity@{k}"].append(sum(patterns[i] == p for i in top) / k)
      out[f"attr@{k}"].append(sum(bool(attributes[i, m]) for i in top) / k)
      out[f"bound@{k}"].append(min(1.0, reachable / k))
  return {key: np.array(value) for key, value in out.items()}


def test_matches_naive_loop_on_random_data():
  rng = np.random.default_rng(0)
  num_items, num_patterns, num_domains, num_queries = 400, 12, 3, 60
  patterns = rng.integers(0, num_patterns, num_items).astype(np.int32)
  attributes = rng.random((num_items, num_domains)) < 0.3
  query_pattern = rng.integers(0, num_patterns, num_queries)
  query_domain = rng.integers(0, num_domains, num_queries)
  # Seeds from the query's pattern (possibly positive), retrieved ids anywhere.
  seeds = np.stack([rng.choice(np.flatnonzero(patterns == p), 4, replace=False)
                    for p in query_pattern])
  retrieved = np.stack([rng.choice(num_items, 25, replace=False) for _ in range(num_queries)])
  ks = (5, 10, 20)
  out = metrics.retrieval_metrics(retrieved, seeds, query_pattern, query_domain, patterns,
                                  attributes, ks=ks)
  expected = _naive_metrics(retrieved, seeds, query_pattern, query_domain, patterns,
                            attributes, ks)
  assert set(out) == set(expected)
  for key in expected:
    np.testing.assert_allclose(out[key], expected[key], err_msg=key)
    assert out[key].shape == (num_queries,)


def test_default_ks():
  rng = np.random.default_rng(1)
  retrieved = rng.integers(0, 12, (4, 50))
  out = metrics.retrieval_metrics(retrieved, _SEEDS, _QUERY_PATTERN, _QUERY_DOMAIN, _PATTERNS,
                                  _ATTRIBUTES)
  assert set(out) == {f"{n}@{k}" for n in ("joint", "purity", "attr", "bound")
                      for k in metrics.KS}


@pytest.mark.parametrize("kwargs, message", [
    (dict(ks=(2, 5)), "fewer than the largest K"),
    (dict(ks=(0,)), "positive"),
    (dict(retrieved=np.array([[0, 1, 2, 12]] * 4)), "retrieved holds ids"),
    (dict(seeds=np.array([[-1, 0]] * 4)), "seeds holds ids"),
    (dict(query_domain=np.array([0, 0, 2, 0])), "query_domain holds ids"),
    (dict(query_pattern=np.array([0, 0])), "query_pattern has 2 queries"),
    (dict(attributes=_ATTRIBUTES[:5]), "attributes must have shape"),
])
def test_rejects_bad_input(kwargs, message):
  args = dict(retrieved=_RETRIEVED, seeds=_SEEDS, query_pattern=_QUERY_PATTERN,
              query_domain=_QUERY_DOMAIN, patterns=_PATTERNS, attributes=_ATTRIBUTES,
              ks=(2, 4))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    metrics.retrieval_metrics(**args)
