"""The novelty gate: which seed sets it calls novel, what it answers them with, how it is saved."""

import dataclasses

import numpy as np
import pytest

from configs import evaluate as evaluate_config

from modit_jax import baselines
from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import evidence
from modit_jax import novelty
from modit_jax import oracle as oracle_lib
from modit_jax import results_markdown
from modit_jax import retrieval


@pytest.fixture(scope="module")
def cat(tiny_world):
  return catalog_lib.load_catalog(tiny_world)


@pytest.fixture(scope="module")
def index(cat):
  return retrieval.build_index(np.asarray(cat.embeddings), "exact")


def _gate(cat, index, shift=0.5, **kwargs):
  return novelty.Gate.for_catalog(cat, dict.fromkeys(cat.domains, shift), index, **kwargs)


def _novel(gate, index, cat, split):
  q = cat.queries[split]
  return gate.novel(index, evidence.seed_centroids(cat.embeddings, q.seeds), q.seeds)


def test_unseen_patterns_are_novel_and_seen_ones_are_not(cat, index):
  gate = _gate(cat, index)
  # A pattern-holdout pattern has no train item; an item-holdout one keeps most of its items in
  # training. The tiny world separates them as the default world does (docs/novelty.md).
  assert _novel(gate, index, cat, "pattern_holdout").mean() > 0.9
  assert _novel(gate, index, cat, "item_holdout").mean() < 0.1
  assert _novel(gate, index, cat, "train").mean() < 0.1


def test_the_decision_reads_which_items_trained_and_nothing_else(cat, index):
  gate = _gate(cat, index)
  q = cat.queries["item_holdout"]
  centroids = evidence.seed_centroids(cat.embeddings, q.seeds)
  share = gate.train_share(index, centroids, q.seeds)
  # Recomputed by hand: the train share of each centroid's 20 nearest non-seed items.
  scores = centroids @ np.asarray(cat.embeddings).T
  np.put_along_axis(scores, q.seeds, -np.inf, axis=1)
  nearest = np.argsort(-scores, axis=1)[:, :novelty.NEIGHBOURS]
  want = (np.asarray(cat.item_split)[nearest] == catalog_lib.SPLIT_CODES["train"]).mean(1)
  np.testing.assert_allclose(share, want)
  # Labels do not enter the decision: a gate whose directions came from other labels agrees.
  other = novelty.Gate(gate.train, -gate.directions, gate.shifts, gate.threshold)
  np.testing.assert_array_equal(other.novel(index, centroids, q.seeds),
                                gate.novel(index, centroids, q.seeds))


def test_apply_replaces_exactly_the_novel_rows_with_the_global_shift(cat, index):
  gate = _gate(cat, index, shift=0.3)
  q = catalog_lib.Queries(
      *(np.concatenate([getattr(cat.queries[s], f)[:6] for s in ("item_holdout",
                                                                   "pattern_holdout")])
        for f in ("seeds", "pattern", "domain")))
  centroids = evidence.seed_centroids(cat.embeddings, q.seeds)
  samples = np.random.default_rng(0).normal(size=(len(q), 2, cat.dim)).astype(np.float32)
  gated, novel = gate.apply(index, centroids, q.domain, q.seeds, samples)
  assert novel.any() and not novel.all()
  np.testing.assert_array_equal(gated[~novel], samples[~novel])
  want = evidence.normalize(centroids + 0.3 * evidence.global_directions(cat)[q.domain])
  np.testing.assert_allclose(gated[novel], np.repeat(want[novel, None], 2, axis=1), atol=1e-6)
  # The caller's samples are not written to.
  assert not np.array_equal(gated, samples)
  # A zero shift is the seed average.
  zero, _ = _gate(cat, index, shift=0.0).apply(index, centroids, q.domain, q.seeds, samples)
  np.testing.assert_allclose(zero[novel, 0], centroids[novel], atol=1e-6)


def test_threshold_is_the_train_queries_quantile(cat, index):
  """The rule: novel below the `train_quantile` quantile of the train queries' shares."""
  train = cat.queries["train"]
  gate = _gate(cat, index, train_quantile=0.1)
  share = gate.train_share(index, evidence.seed_centroids(cat.embeddings, train.seeds),
                           train.seeds)
  assert gate.threshold == pytest.approx(np.quantile(share, 0.1))
  # About that share of the train queries are novel (ties at the threshold are not).
  assert _novel(gate, index, cat, "train").mean() <= 0.1
  assert _gate(cat, index, train_quantile=0.5).threshold >= gate.threshold
  # Only which items trained and the train queries' seeds enter: shuffled patterns and labels
  # of the held-out items leave it unchanged.
  held = np.asarray(cat.item_split) != catalog_lib.SPLIT_CODES["train"]
  rng = np.random.default_rng(0)
  poisoned = dataclasses.replace(
      cat, patterns=rng.permutation(np.asarray(cat.patterns)),
      attributes=np.where(held[:, None], ~np.asarray(cat.attributes), cat.attributes))
  assert _gate(poisoned, index, train_quantile=0.1).threshold == gate.threshold
  # Not vacuous: fewer train items lower it.
  fewer = np.where(np.asarray(cat.item_split) == 0,
                   (rng.random(cat.num_items) < 0.5).astype(np.int8), cat.item_split)
  assert _gate(dataclasses.replace(cat, item_split=fewer), index,
               train_quantile=0.1).threshold < gate.threshold


def test_saved_gate_reads_back_and_refuses_another_catalog(cat, index):
  gate = _gate(cat, index, neighbours=7)
  back = novelty.Gate.from_json(gate.to_json(), cat, "guidance.json")
  np.testing.assert_array_equal(back.train, gate.train)
  np.testing.assert_allclose(back.directions, gate.directions)
  np.testing.assert_allclose(back.shifts, gate.shifts)
  assert (back.neighbours, back.threshold) == (7, gate.threshold)
  # A gate saved before the threshold was read from the train queries keeps its old rule.
  old = {k: v for k, v in gate.to_json().items() if k != "threshold"}
  old["share_ratio"] = 0.5
  assert novelty.Gate.from_json(old, cat, "guidance.json").threshold == pytest.approx(
      0.5 * np.mean(np.asarray(cat.item_split) == catalog_lib.SPLIT_CODES["train"]))
  saved = gate.to_json()
  saved["shifts"] = saved["shifts"][:-1]
  with pytest.raises(errors.UserError, match="guidance.json: novelty_gate holds directions"):
    novelty.Gate.from_json(saved, cat, "guidance.json")
  with pytest.raises(errors.UserError, match="not a saved novelty gate"):
    novelty.Gate.from_json({"shifts": []}, cat, "guidance.json")


def test_bad_settings_are_user_errors(cat, index):
  with pytest.raises(errors.UserError, match="neighbours >= 1"):
    _gate(cat, index, neighbours=0)
  with pytest.raises(errors.UserError, match="train_quantile must be in"):
    _gate(cat, index, train_quantile=1.5)
  with pytest.raises(errors.UserError, match="no fallback setting for domain"):
    novelty.Gate.for_catalog(cat, {cat.domains[0]: 1.0}, index)
  no_train = dataclasses.replace(cat, queries={**cat.queries,
                                               "train": cat.queries["train"].take(np.arange(0))})
  with pytest.raises(errors.UserError, match="queries_train.npz is empty"):
    _gate(no_train, index)


@pytest.mark.parametrize("pattern_share, warned", [(0.67, True), (0.89, True), (0.9, False),
                                                   (1.0, False), (None, False)])
def test_a_gate_that_misses_unseen_patterns_is_reported(pattern_share, warned):
  shares = {"item_holdout": 0.01}
  if pattern_share is not None:
    shares[novelty.UNSEEN_SPLIT] = pattern_share
  results = {novelty.JSON_KEY: {"methods": ["modit_hppo"], "novel_share": shares,
                                "gate": {"neighbours": 20, "threshold": 0.5}}}
  text = results_markdown.gate_text(results)
  assert text.startswith("Novelty gate")
  assert ("**Warning**" in text) == warned
  assert bool(novelty.miss_warning(shares, "modit_hppo")) == warned
  if warned:
    assert f"caught only {pattern_share:.0%} of the pattern_holdout seed sets" in text
    assert "compare `modit_hppo_no_gate` with `centroid_global_shift`" in text


def test_an_offset_fallback_answers_as_the_neighbourhood_offset_baseline(cat, index):
  config = evaluate_config.get_config("tiny")
  oracle = oracle_lib.OnlineOracle(cat, k=20, index_kind="exact")
  baseline = baselines.fit("neighbourhood_offset", cat, oracle, config, index)
  knob = baseline.knob
  gate = novelty.Gate.for_catalog(
      cat, {d: v["shift"] for d, v in knob.items()}, index,
      offsets={d: (v["neighbours"], v["step"]) for d, v in knob.items()})
  q = cat.queries["pattern_holdout"]
  seed_means = np.asarray(cat.embeddings[q.seeds], np.float32).mean(axis=1)
  want = baseline.retrieve(q, index, 20)
  got, _ = index.search(gate.fallback(index, seed_means, q.domain, q.seeds), 20,
                        exclude=q.seeds)
  np.testing.assert_array_equal(got, want)
  # The saved gate keeps its offsets; one saved without them is the global shift alone.
  back = novelty.Gate.from_json(gate.to_json(), cat, "guidance.json")
  np.testing.assert_array_equal(back.offset_sizes, gate.offset_sizes)
  np.testing.assert_allclose(back.offset_steps, gate.offset_steps)
  np.testing.assert_allclose(back.fallback(index, seed_means, q.domain, q.seeds),
                             gate.fallback(index, seed_means, q.domain, q.seeds), atol=1e-6)
  plain = {k: v for k, v in gate.to_json().items() if not k.startswith("offset_")}
  shifted = evidence.normalize(evidence.normalize(seed_means)
                               + gate.shifts[q.domain, None] * gate.directions[q.domain])
  np.testing.assert_allclose(novelty.Gate.from_json(plain, cat, "guidance.json").fallback(
      index, seed_means, q.domain, q.seeds), shifted, atol=1e-6)
  # Not vacuous: on the tiny world the validation tuning takes a step in some domain.
  assert np.any(gate.offset_steps != 0)
  with pytest.raises(errors.UserError, match="sizes must be >= 1"):
    dataclasses.replace(gate, offset_sizes=np.zeros_like(gate.offset_sizes))


def test_neighbourhood_offset_refuses_empty_or_bad_grids(cat, index):
  oracle = oracle_lib.OnlineOracle(cat, k=20, index_kind="exact")
  for sizes, steps in (((), (1.0,)), ((0, 20), (1.0,)), ((20,), ())):
    with pytest.raises(errors.UserError, match="offset_neighbourhood_grid"):
      baselines.fit_neighbourhood_offset(cat, oracle, index, sizes, (0.0,), steps)
