"""The train queries' fit / validation split, and that knobs read only validation queries."""

import dataclasses

import ml_collections
import numpy as np
import pytest

from configs import evaluate as evaluate_config
from modit_jax import baselines
from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import evidence
from modit_jax import memo
from modit_jax import oracle as oracle_lib
from modit_jax import query_split


@pytest.fixture(scope="module")
def cat(tiny_world):
  return catalog_lib.load_catalog(tiny_world)


def test_fit_and_validation_are_disjoint_with_both_regimes(cat):
  mask = query_split.validation_mask(cat)
  train = cat.queries["train"]
  assert mask.shape == (len(train),) and mask.dtype == bool
  fraction = mask.mean()
  assert 0.1 < fraction < 0.45, fraction
  fit, validation = query_split.fit_queries(cat), query_split.validation_queries(cat)
  assert len(fit) + len(validation) == len(train)
  fit_rows = {tuple(s) for s in fit.seeds}
  assert not fit_rows & {tuple(s) for s in validation.seeds}  # no query in both
  # Deterministic: the same split for every run and for the evaluation.
  np.testing.assert_array_equal(query_split.validation_mask(cat), mask)
  # Both regimes of the evaluation (true patterns read here by the test only): validation
  # queries whose pattern no fit query has (whole groups), and single queries of patterns the
  # fit queries cover.
  fit_patterns = set(train.pattern[~mask])
  seen = np.isin(train.pattern[mask], list(fit_patterns))
  assert 0.25 < seen.mean() < 0.75, seen.mean()


def test_a_split_is_computed_once_per_input(cat, monkeypatch):
  """The k-means behind a split runs once per (seed centroids, fraction); a caller can't
  change the kept split through the mask it got, and other embeddings are split anew."""
  expected = query_split._split(
      np.asarray(cat.embeddings[cat.queries["train"].seeds], np.float32).mean(axis=1),
      query_split.VALIDATION_FRACTION)
  calls = []
  kmeans = query_split.clusters.kmeans
  monkeypatch.setattr(query_split.clusters, "kmeans",
                      lambda *a, **k: calls.append(1) or kmeans(*a, **k))
  monkeypatch.setattr(query_split, "_SPLITS", memo.Memo("test", kept=8))
  first = query_split.validation_mask(cat)
  first[:] = False
  again = query_split.validation_mask(cat)
  assert len(calls) == 1
  np.testing.assert_array_equal(again, expected)
  query_split.validation_mask(cat, fraction=0.5)
  moved = dataclasses.replace(cat, embeddings=np.roll(cat.embeddings, 1, axis=0))
  query_split.validation_mask(moved)
  assert len(calls) == 3


def test_bad_fraction_is_a_user_error(cat):
  with pytest.raises(errors.UserError, match="validation fraction"):
    query_split.validation_mask(cat, fraction=1.0)


def test_with_every_domain_hand_made():
  queries = catalog_lib.Queries(seeds=np.array([[3, 1], [5, 6], [1, 3], [7, 8]], np.int32),
                                pattern=np.array([0, 1, 0, 2], np.int32),
                                domain=np.array([1, 0, 0, 2], np.int32))
  out = query_split.with_every_domain(queries, 3)
  np.testing.assert_array_equal(out.seeds, np.repeat([[3, 1], [5, 6], [7, 8]], 3, axis=0))
  np.testing.assert_array_equal(out.pattern, np.repeat([0, 1, 2], 3))
  np.testing.assert_array_equal(out.domain, np.tile([0, 1, 2], 3))


def test_knobs_are_scored_on_validation_queries_only(cat):
  oracle = oracle_lib.OnlineOracle(cat, k=20, index_kind="exact")
  seen = []

  def retrieve(q, value):
    seen.append(q.seeds)
    return oracle.search(evidence.seed_centroids(cat.embeddings, q.seeds), q.seeds, oracle.k)

  baselines.tune_per_domain(cat, oracle, [0.0, 1.0], retrieve, "test knob")
  validation = {tuple(s) for s in query_split.validation_queries(cat).seeds}
  for seeds in seen:
    assert {tuple(s) for s in seeds} == validation


def _config() -> ml_collections.ConfigDict:
  return evaluate_config.get_config("tiny")


@pytest.mark.parametrize("name", ["centroid_global_shift", "rerank", "local_shift",
                                  "neighbourhood_offset", "local_shift_train_oracle"])
def test_poisoned_evaluation_queries_change_no_knob(cat, name):
  """Knobs read validation queries only: scrambled held-out query files change none."""
  rng = np.random.default_rng(0)
  queries = dict(cat.queries)
  for split in ("item_holdout", "pattern_holdout"):
    q = queries[split]
    queries[split] = dataclasses.replace(q, domain=rng.permutation(q.domain),
                                         pattern=rng.permutation(q.pattern))
  poisoned = dataclasses.replace(cat, queries=queries)
  knobs = []
  for c in (cat, poisoned):
    oracle = oracle_lib.OnlineOracle(c, k=20, index_kind="exact")
    knobs.append(baselines.fit(name, c, oracle, _config()).knob)
  assert knobs[0] == knobs[1]


def test_local_shift_reads_only_observed_labels(cat):
  """Flipping every unobserved label in the catalog it reads leaves local_shift unchanged.

  The oracle that scores its knobs is the clean one in both runs: what is tested is what the
  method itself reads from the catalog.
  """
  poisoned = dataclasses.replace(
      cat, attributes=np.where(cat.observed, cat.attributes, ~cat.attributes))
  oracle = oracle_lib.OnlineOracle(cat, k=20, index_kind="exact")
  index = baselines.retrieval.build_index(np.asarray(cat.embeddings), "exact")
  out = []
  for c in (cat, poisoned):
    fitted = baselines.fit("local_shift", c, oracle, _config())
    out.append((fitted.knob, fitted.retrieve(c.queries["item_holdout"], index, 20)))
  assert out[0][0] == out[1][0]
  np.testing.assert_array_equal(out[0][1], out[1][1])
  # The same poisoning through the oracle moves the train-oracle bound: that is what it reads.
  bound = [baselines.fit("local_shift_train_oracle", c,
                         oracle_lib.OnlineOracle(c, k=20, index_kind="exact"), _config())
           for c in (cat, poisoned)]
  assert not np.array_equal(bound[0].retrieve(cat.queries["item_holdout"], index, 20),
                            bound[1].retrieve(cat.queries["item_holdout"], index, 20))


def test_local_shift_moves_toward_the_attribute(cat):
  """On the tiny world the local shift raises Attr@20 over the seed centroid it starts from."""
  from modit_jax import metrics  # pylint: disable=g-import-not-at-top
  oracle = oracle_lib.OnlineOracle(cat, k=20, index_kind="exact")
  index = baselines.retrieval.build_index(np.asarray(cat.embeddings), "exact")
  q = cat.queries["item_holdout"]
  scores = {}
  for name in ("seed_centroid", "local_shift"):
    ids = baselines.fit(name, cat, oracle, _config()).retrieve(q, index, 20)
    scores[name] = metrics.retrieval_metrics(ids, q.seeds, q.pattern, q.domain, cat.patterns,
                                             cat.attributes, ks=(20,))
  assert scores["local_shift"]["attr@20"].mean() > scores["seed_centroid"]["attr@20"].mean() + 0.05


def test_a_small_query_set_keeps_most_queries_for_fitting(cat):
  train = cat.queries["train"]
  small = dataclasses.replace(cat, queries=dict(cat.queries, train=train.take(np.arange(20))))
  mask = query_split.validation_mask(small)
  assert 0 < mask.sum() <= 10
