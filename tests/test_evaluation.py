"""Evaluation end to end on the tiny world, the baselines, the oracle and the predictor."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import evaluate as evaluate_config
from modit_jax import baselines
from modit_jax import catalog as catalog_lib
from modit_jax import clusters
from modit_jax import errors
from modit_jax import evidence
from modit_jax import evaluation
from modit_jax import memo
from modit_jax import metric_predictor
from modit_jax import metrics
from modit_jax import novelty
from modit_jax import oracle as oracle_lib
from modit_jax import query_split
from modit_jax import results_markdown
from modit_jax import retrieval

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tiny_world):
  return tiny_world


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eval")
  proc = subprocess.run(
      [sys.executable, "-m", "modit_jax.cli.evaluate", "--config=configs/evaluate.py:tiny",
       f"--dataset={tiny}", f"--workdir={workdir}"],
      cwd=_REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_results_json_has_one_record_per_method_split_domain(evaluated):
  results = json.loads((evaluated / "results.json").read_text())
  records = results["records"]
  cells = {(r["method"], r["split"], r["domain"]) for r in records}
  assert len(cells) == len(records) == len(baselines.REGISTRY) * 2 * 4
  for r in records:
    for key in ("n", "joint@10", "joint@20", "joint@50", "purity@20", "attr@20", "bound@20"):
      assert key in r
    assert r["joint@20"] <= r["bound@20"] + 1e-12
    assert r["joint@20"] <= min(r["purity@20"], r["attr@20"]) + 1e-12
    low, high = r["joint@20_ci"]
    assert low <= r["joint@20"] <= high
    for ref, test in r["vs"].items():
      assert ref != r["method"]
      assert set(test) >= {"diff", "ci_low", "ci_high", "p_gain", "p_loss", "p_gain_holm",
                           "p_loss_holm", "significant_gain", "significant_loss", "against"}
      assert test["p_gain_holm"] >= test["p_gain"] and test["p_loss_holm"] >= test["p_loss"]
      assert not (test["significant_gain"] and test["significant_loss"])
  # The strongest competitor is chosen per domain on validation queries, among non-oracles.
  strongest = results["strongest_baseline"]
  assert set(strongest) == set(results["validation"]["seed_centroid"])
  for domain, name in strongest.items():
    assert name in baselines.REGISTRY and not baselines.REGISTRY[name].yardstick
    competitors = [m for m in results["validation"] if not baselines.REGISTRY[m].yardstick]
    assert results["validation"][name][domain] == max(
        results["validation"][m][domain] for m in competitors)
  for r in records:
    if r["method"] != strongest[r["domain"]]:
      assert r["vs"]["strongest_baseline"]["against"] == strongest[r["domain"]]
  report = (evaluated / "report.md").read_text()
  assert "oracle_shift (oracle)" in report
  # The binary rendered report.md from the results in memory; results.json alone gives it back.
  assert results_markdown.evaluation_report(results) == report


def test_joint_recomputed_from_retrieved_ids_matches_results(tiny, evaluated):
  """Independent recomputation: only numpy, the dataset files and retrieved/*.npz."""
  results = json.loads((evaluated / "results.json").read_text())
  patterns = np.load(tiny / "patterns.npy")
  attributes = np.load(tiny / "attributes.npy")
  domains = json.loads((tiny / "manifest.json").read_text())["domains"]
  for r in results["records"]:
    q = np.load(tiny / f"queries_{r['split']}.npz")
    ids = np.load(evaluated / "retrieved" / f"{r['method']}_{r['split']}.npz")["ids"]
    assert ids.dtype == np.int32 and ids.shape == (len(q["domain"]), 50)
    rows = q["domain"] == domains.index(r["domain"])
    top = ids[rows, :20]
    # Seeds are never retrieved.
    assert not (top[:, :, None] == q["seeds"][rows][:, None, :]).any()
    hit = (patterns[top] == q["pattern"][rows, None]) & attributes[top, q["domain"][rows, None]]
    assert hit.mean(axis=1).mean() == r["joint@20"]


def test_baselines_behave_as_designed(evaluated):
  """The tiny world keeps the tension: centroid is pure, global attribute drifts."""
  records = json.loads((evaluated / "results.json").read_text())["records"]

  def mean(method, key):
    return np.mean([r[key] for r in records if r["method"] == method])

  assert mean("seed_centroid", "purity@20") > 0.9
  assert mean("global_attribute", "purity@20") < 0.2
  assert mean("centroid_global_shift", "joint@20") > mean("seed_centroid", "joint@20") + 0.1
  assert mean("oracle_shift", "joint@20") > mean("centroid_global_shift", "joint@20")


def test_unknown_method_is_a_clear_error(tiny, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "modit_jax.cli.evaluate", "--config=configs/evaluate.py:tiny",
       "--config.methods=seed_centroid,magic", f"--dataset={tiny}", f"--workdir={tmp_path}"],
      cwd=_REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "error: unknown method magic" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_config_name_lists_refuse_empty_unless_allowed():
  assert evaluation.split_names(" a, b ,,", "methods") == ["a", "b"]
  with pytest.raises(errors.UserError, match="config.methods is empty"):
    evaluation.split_names(" , ", "methods")
  # An empty novelty_gate.methods means no gate, not a mistake.
  assert evaluation.split_names("", "novelty_gate.methods", allow_empty=True) == []


def test_missing_dataset_is_a_clear_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "modit_jax.cli.evaluate", "--config=configs/evaluate.py:tiny",
       f"--dataset={tmp_path / 'nope'}", f"--workdir={tmp_path}"],
      cwd=_REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "no such catalog directory" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_oracle_refuses_held_out_items(tiny):
  cat = catalog_lib.load_catalog(tiny)
  oracle = oracle_lib.OnlineOracle(cat, k=20, index_kind="exact")
  held = cat.queries["item_holdout"]
  emb = evidence.seed_centroids(cat.embeddings, held.seeds)
  with pytest.raises(errors.UserError, match="not a train item"):
    oracle.score(emb, held)
  train = cat.queries["train"]
  ids = oracle.search(evidence.seed_centroids(cat.embeddings, train.seeds), train.seeds, 20)
  assert np.all(cat.item_split[ids] == 0)
  # Its scores equal the evaluation metrics computed on the same train-only ids.
  scores = oracle.score_ids(ids, train)
  full = metrics.retrieval_metrics(ids, train.seeds, train.pattern, train.domain, cat.patterns,
                                   cat.attributes, ks=(20,))
  np.testing.assert_array_equal(scores["joint@20"], full["joint@20"])
  # Per-item hits are exactly what Joint@k of the list reveals: their running means are it.
  hits = oracle.item_hits(ids, train)
  for k in (1, 5, 20):
    np.testing.assert_allclose(hits[:, :k].mean(axis=1),
                               oracle.score_ids(ids, train, ks=(k,))[f"joint@{k}"])
  with pytest.raises(errors.UserError, match="not a train item"):
    oracle.item_hits(ids, held.take(np.arange(len(ids)) % len(held)))
  held_ids = np.flatnonzero(cat.item_split != 0)[:20][None]
  with pytest.raises(errors.UserError, match="train items only"):
    oracle.item_hits(held_ids, train.take(np.arange(1)))


def test_metric_predictor_never_reads_unobserved_labels_nor_heldout_items(tiny):
  cat = catalog_lib.load_catalog(tiny)
  config = evaluate_config.get_config("tiny").metric_predictor
  config.relative_features = True  # the regions are under test too
  # Every hidden label flipped, and the held-out items moved (the regions are k-means over
  # train items only).
  emb = np.array(cat.embeddings)
  heldout = cat.item_split != 0
  emb[heldout] = emb[heldout][::-1]
  poisoned = dataclasses.replace(
      cat, attributes=np.where(cat.observed, cat.attributes, ~cat.attributes), embeddings=emb)
  a, b = (metric_predictor.train(c.embeddings, c.attributes, c.observed, config,
                                 clusters.relative_features(c, config))
          for c in (cat, poisoned))
  np.testing.assert_array_equal(a.predict(cat.embeddings[:100]), b.predict(cat.embeddings[:100]))
  assert a.validation == b.validation


def test_metric_predictor_learns_the_easy_domain(tiny):
  cat = catalog_lib.load_catalog(tiny)
  config = evaluate_config.get_config("tiny").metric_predictor
  config.relative_features = True  # saved and loaded with its regions
  predictor = metric_predictor.train(cat.embeddings, cat.attributes, cat.observed, config,
                                     clusters.relative_features(cat, config))
  # Domain 0 leans mostly along a shared axis (a_m = 0.8): clearly learnable.
  assert predictor.validation[0]["auc"] > 0.75
  # Saved and loaded (as a learned-positions model's run does), it predicts the same.
  arrays = predictor.to_arrays()
  assert metric_predictor.has_saved(arrays) and not metric_predictor.has_saved({"auc": 0})
  loaded = metric_predictor.MetricPredictor.from_arrays(arrays)
  assert (loaded.num_domains, loaded.hidden) == (predictor.num_domains, predictor.hidden)
  np.testing.assert_array_equal(loaded.predict(cat.embeddings[:100]),
                                predictor.predict(cat.embeddings[:100]))


def test_metric_predictor_drawn_with_replacement_on_large_catalogs(tiny, monkeypatch):
  """Above `_SAMPLE_WITHOUT_REPLACEMENT_MAX` labelled items batches are drawn with replacement
  (cheap at millions of items); the predictor learns as well, and differs (the path is taken)."""
  cat = catalog_lib.load_catalog(tiny)
  config = evaluate_config.get_config("tiny").metric_predictor
  exact = metric_predictor.train(cat.embeddings, cat.attributes, cat.observed, config)
  monkeypatch.setattr(metric_predictor, "_SAMPLE_WITHOUT_REPLACEMENT_MAX", 0)
  drawn = metric_predictor.train(cat.embeddings, cat.attributes, cat.observed, config)
  assert not np.array_equal(drawn.predict(cat.embeddings[:100]),
                            exact.predict(cat.embeddings[:100]))
  assert drawn.validation[0]["auc"] > 0.75
  assert abs(drawn.validation[0]["auc"] - exact.validation[0]["auc"]) < 0.05


def test_the_data_paths_predictor_is_reranks(tiny, monkeypatch):
  """The predictor the training data path fits on train rows and the one `rerank` fits on the
  whole catalog read the same labelled rows: one fit serves both, and it is what a fit of its
  own gives. Other labels are fitted anew."""
  cat = catalog_lib.load_catalog(tiny)
  config = evaluate_config.get_config("tiny").metric_predictor
  fits = []
  fit = metric_predictor._train  # pylint: disable=protected-access
  monkeypatch.setattr(metric_predictor, "_train", lambda *a: fits.append(1) or fit(*a))
  train = cat.train_items()
  on_train_rows = metric_predictor.train(np.asarray(cat.embeddings[train]),
                                         cat.attributes[train], cat.observed[train], config)
  on_catalog = metric_predictor.train(cat.embeddings, cat.attributes, cat.observed, config)
  assert on_catalog is on_train_rows and len(fits) == 1
  memo.clear_all()
  alone = metric_predictor.train(cat.embeddings, cat.attributes, cat.observed, config)
  np.testing.assert_array_equal(alone.predict(cat.embeddings[:100]),
                                on_catalog.predict(cat.embeddings[:100]))
  assert alone.validation == on_catalog.validation and len(fits) == 2
  flipped = np.where(cat.observed, ~cat.attributes, cat.attributes)
  metric_predictor.train(cat.embeddings, flipped, cat.observed, config)
  assert len(fits) == 3


def test_relative_features_help_where_the_direction_is_pattern_local(tiny):
  """Domain 3 leans mostly along pattern-local axes (a_m = 0.1): the offset within a region
  is what tells its positives apart, and the held-out AUC shows it."""
  cat = catalog_lib.load_catalog(tiny)
  config = evaluate_config.get_config("tiny").metric_predictor
  assert not config.relative_features
  plain = metric_predictor.train(cat.embeddings, cat.attributes, cat.observed, config,
                                 clusters.relative_features(cat, config))
  config.relative_features = True
  relative = metric_predictor.train(cat.embeddings, cat.attributes, cat.observed, config,
                                    clusters.relative_features(cat, config))
  assert plain.features is None and relative.features is not None
  gain = relative.validation[3]["auc"] - plain.validation[3]["auc"]
  assert gain > 0.03, (relative.validation[3], plain.validation[3])


class _FixedOracle:
  """An oracle stub: per grid value (read back from the 'retrieved' marker), fixed scores."""
  k = 20

  def __init__(self, scores):
    self._scores = scores  # value -> (joint, purity)

  def score_ids(self, retrieved, queries):
    joint, purity = self._scores[float(retrieved)]
    n = len(queries)
    return {"joint@20": np.full(n, joint), "purity@20": np.full(n, purity)}


def test_tuning_picks_best_joint_or_best_joint_within_purity_tolerance(tiny):
  cat = catalog_lib.load_catalog(tiny)
  # Value 8 has the best Joint but loses 0.1 purity; value 4 is within 0.02 of the purest.
  oracle = _FixedOracle({1.0: (0.2, 1.00), 4.0: (0.5, 0.99), 8.0: (0.6, 0.90)})
  tune = lambda tol: baselines.tune_per_domain(cat, oracle, [1.0, 4.0, 8.0],
                                               lambda q, value: value, "knob",
                                               purity_tolerance=tol)
  np.testing.assert_array_equal(tune(-1.0), np.full(cat.num_domains, 8.0))
  np.testing.assert_array_equal(tune(0.02), np.full(cat.num_domains, 4.0))
  np.testing.assert_array_equal(tune(0.0), np.full(cat.num_domains, 1.0))


class _NoisyOracle:
  """An oracle stub: per grid value, a query's Joint is its own level plus the value's gain."""
  k = 20

  def __init__(self, gains):
    self._gains = gains  # value -> mean gain over the first value

  def score_ids(self, retrieved, queries):
    level = np.random.default_rng(0).uniform(0.0, 0.8, len(queries))  # the same per query
    noise = np.random.default_rng(int(retrieved)).normal(0.0, 0.1, len(queries))
    for m in np.unique(queries.domain):  # so that each domain's mean differences are the gains
      noise[queries.domain == m] -= noise[queries.domain == m].mean()
    joint = level + noise + self._gains[float(retrieved)]
    return {"joint@20": joint, "purity@20": np.ones(len(queries))}


def test_tuning_prefers_the_first_value_within_one_standard_error(tiny):
  cat = catalog_lib.load_catalog(tiny)
  tune = lambda gains, se: baselines.tune_per_domain(
      cat, _NoisyOracle(gains), [1.0, 4.0, 8.0], lambda q, value: value, "knob",
      tolerance_se=se)
  # A later value ahead by far less than the noise: the first value (the simplest) wins the tie,
  # where the plain argmax would follow the noise.
  tied = {1.0: 0.0, 4.0: 0.001, 8.0: 0.002}
  np.testing.assert_array_equal(tune(tied, 1.0), np.full(cat.num_domains, 1.0))
  np.testing.assert_array_equal(tune(tied, 0.0), np.full(cat.num_domains, 8.0))
  # Ahead by many standard errors: chosen under either rule.
  ahead = {1.0: 0.0, 4.0: 0.5, 8.0: 0.0}
  np.testing.assert_array_equal(tune(ahead, 1.0), np.full(cat.num_domains, 4.0))


class _ChanceOracle:
  """Validation Joint of grid value v: a per-query level shared by all values, noise of v's
  own (not centred: some of many equal values lead by chance), and gains[v]."""

  def __init__(self, gains):
    self._gains = gains
    self.k = 20

  def score_ids(self, retrieved, queries):
    level = np.random.default_rng(0).uniform(0.0, 0.8, len(queries))
    noise = np.random.default_rng(int(retrieved)).normal(0.0, 0.1, len(queries))
    return {"joint@20": level + noise + self._gains.get(int(retrieved), 0.0),
            "purity@20": np.ones(len(queries))}


def test_values_beyond_the_simple_ones_must_beat_chance(tiny):
  cat = catalog_lib.load_catalog(tiny)
  grid = list(range(203))  # 3 simple values, then 200 no better than them
  tune = lambda gains, alpha: baselines.tune_per_domain(
      cat, _ChanceOracle(gains), grid, lambda q, value: value, "knob", simple_values=3,
      beyond_simple_alpha=alpha)
  # The one-standard-error rule alone: out of 200 equal values, one leads by chance in some
  # domain, and is taken.
  assert np.any(tune({}, 1.0) >= 3)
  # Corrected for the 200 tries: only the simple values.
  assert np.all(tune({}, 0.05) < 3)
  # A value truly ahead is still found among the 200.
  np.testing.assert_array_equal(tune({150: 0.15}, 0.05), np.full(cat.num_domains, 150.0))


def test_methods_without_knobs_need_no_train_queries(tiny):
  cat = catalog_lib.load_catalog(tiny)
  train = cat.queries["train"]
  empty = dataclasses.replace(cat, queries=dict(cat.queries, train=train.take(np.arange(0))))
  config = evaluate_config.get_config("tiny")
  config.methods = "seed_centroid,global_attribute"
  result = evaluation.evaluate(empty, config)
  assert result.strongest_baseline == {} and result.meta["validation"] == {}
  assert all("strongest_baseline" not in r["vs"] for r in result.records)
  assert all("seed_centroid" in r["vs"] for r in result.records
             if r["method"] == "global_attribute")


def test_the_gate_reports_no_share_and_no_warning_for_a_split_without_queries(tiny, caplog):
  cat = catalog_lib.load_catalog(tiny)
  held = cat.queries["pattern_holdout"]
  empty = dataclasses.replace(
      cat, queries=dict(cat.queries, pattern_holdout=held.take(np.arange(0))))
  config = evaluate_config.get_config("tiny")
  oracle = oracle_lib.OnlineOracle(empty, config.oracle_k, "exact", config.search_share)
  index = retrieval.build_index(np.asarray(empty.embeddings), "exact")
  meta = {}
  with caplog.at_level("WARNING"):
    evaluation._novelty_gate(empty, oracle, config, {}, index,
                             ["item_holdout", "pattern_holdout"], ["modit_hppo"], meta)
  shares = meta[novelty.JSON_KEY]["novel_share"]
  assert set(shares) == {"item_holdout"} and 0.0 <= shares["item_holdout"] <= 1.0
  assert "caught only" not in caplog.text
  assert "Warning" not in results_markdown.gate_text(meta)


def test_a_purity_tolerant_gate_falls_back_to_a_shift_within_the_tolerance(tiny):
  cat = catalog_lib.load_catalog(tiny)
  config = evaluate_config.get_config("tiny")
  config.novelty_gate.fallback = "centroid_global_shift"
  oracle = oracle_lib.OnlineOracle(cat, config.oracle_k, "exact", config.search_share)
  index = retrieval.build_index(np.asarray(cat.embeddings), "exact")
  splits, gated = ["item_holdout", "pattern_holdout"], ["modit_hppo"]
  free, pure, fitted = {}, {}, {}
  evaluation._novelty_gate(cat, oracle, config, fitted, index, splits, gated, free)
  config.novelty_gate.purity_tolerance = 0.0
  evaluation._novelty_gate(cat, oracle, config, {}, index, splits, gated, pure)
  free_shifts = np.asarray(free[novelty.JSON_KEY]["gate"]["shifts"])
  pure_shifts = np.asarray(pure[novelty.JSON_KEY]["gate"]["shifts"])
  # Untouched by default: the global shift's own tuned shifts.
  np.testing.assert_allclose(
      free_shifts, [fitted["centroid_global_shift"].knob[d] for d in cat.domains])
  # The tiny world's best shift loses some purity somewhere, so the constraint must bind.
  assert not np.allclose(free_shifts, pure_shifts)
  # Each domain's chosen shift is as pure on validation queries as the purest on the grid.
  valid = query_split.validation_queries(cat)
  directions = evidence.global_directions(cat)
  centroids = evidence.seed_centroids(cat.embeddings, valid.seeds)

  def purity(shift):
    ids = oracle.search(evidence.normalize(centroids + shift * directions[valid.domain]),
                        valid.seeds, oracle.k)
    return oracle.score_ids(ids, valid)[f"purity@{oracle.k}"]

  by_value = {a: purity(a) for a in config.shift_grid}
  for m, shift in enumerate(pure_shifts):
    rows = valid.domain == m
    best = max(by_value[a][rows].mean() for a in config.shift_grid)
    chosen = min(config.shift_grid, key=lambda a: abs(a - shift))  # the gate stores float32
    assert by_value[chosen][rows].mean() >= best - 1e-9
  assert pure[novelty.JSON_KEY]["purity_tolerance"] == 0.0
  assert "within 0 of the purest on the grid" in results_markdown.gate_text(pure)
  assert "the global shift as tuned on validation queries" in results_markdown.gate_text(free)


def test_the_default_gate_falls_back_on_the_neighbourhood_offset_as_reported(tiny):
  cat = catalog_lib.load_catalog(tiny)
  config = evaluate_config.get_config("tiny")
  oracle = oracle_lib.OnlineOracle(cat, config.oracle_k, "exact", config.search_share)
  index = retrieval.build_index(np.asarray(cat.embeddings), "exact")
  meta, fitted = {}, {}
  gate = evaluation._novelty_gate(cat, oracle, config, fitted, index, ["pattern_holdout"],
                                  ["modit_hppo"], meta)
  # The gate's settings are the reported baseline's own, fitted once and shared.
  knob = fitted["neighbourhood_offset"].knob
  np.testing.assert_allclose(gate.shifts, [knob[d]["shift"] for d in cat.domains])
  np.testing.assert_array_equal(gate.offset_sizes, [knob[d]["neighbours"] for d in cat.domains])
  np.testing.assert_allclose(gate.offset_steps, [knob[d]["step"] for d in cat.domains])
  assert meta[novelty.JSON_KEY]["fallback"] == "neighbourhood_offset"
  assert "`neighbourhood_offset` query" in results_markdown.gate_text(meta)
  config.novelty_gate.fallback = "seed_centroid"
  with pytest.raises(errors.UserError, match="novelty_gate.fallback must be one of"):
    evaluation._novelty_gate(cat, oracle, config, {}, index, ["pattern_holdout"],
                             ["modit_hppo"], {})


def test_an_evaluation_searches_the_index_it_is_given(tiny_world):
  """A held index of the configured kind is searched instead of a new build (the pipeline's
  serving index), with the answers a fresh build gives; one of another kind is not."""
  cat = catalog_lib.load_catalog(tiny_world)
  config = evaluate_config.get_config("tiny")
  config.methods = "seed_centroid,centroid_global_shift"
  config.splits = "item_holdout"
  embeddings = np.asarray(cat.embeddings, np.float32)
  built = evaluation.evaluate(cat, config)
  given = evaluation.evaluate(cat, config, retrieval.build_index(embeddings, config.index_kind))
  assert given.meta["index"]["reused"] and not built.meta["index"]["reused"]
  for method in ("seed_centroid", "centroid_global_shift"):
    np.testing.assert_array_equal(given.retrieved[method]["item_holdout"],
                                  built.retrieved[method]["item_holdout"])
  other = "scann" if config.index_kind == "exact" else "exact"
  wrong_kind = evaluation.evaluate(cat, config, retrieval.build_index(embeddings, other))
  assert not wrong_kind.meta["index"]["reused"]
  assert wrong_kind.meta["index"]["kind"] == config.index_kind
