"""Tests that would catch a broken stage: the tiny world's pipeline trained in full.

Each stage must do what it is for, measured on the validation queries (train queries that no
model trained on; `query_split`) with the truth of train items, or on the evaluation cells:
stages 2-3 raise Attr@20 over the pretrained model, HPPO fits its regression targets and
raises validation Joint@20 over its reference (tests/test_hppo.py has its preference pairs),
and the final model beats the seed centroid.
"""

import json
import os

import numpy as np
import pytest

from configs import pipeline as pipeline_config
from modit_jax import catalog as catalog_lib
from modit_jax import evaluation
from modit_jax import generative
from modit_jax import metrics
from modit_jax import oracle as oracle_lib
from modit_jax import query_split
from modit_jax import report
from modit_jax import workflow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fast_compile):
  del fast_compile
  out = str(tmp_path_factory.mktemp("quality"))
  config = pipeline_config.get_config("tiny,no_ablations")
  config.evaluate.methods = "seed_centroid"
  config.evaluate.num_resamples = 200
  workflow.run_pipeline(config, out)
  return out, config


@pytest.fixture(scope="module")
def validation_scores(trained):
  """Per run: Attr@20 and Joint@20 (float [Q]) on validation queries over train items."""
  out, config = trained
  cat = catalog_lib.load_catalog(os.path.join(out, "dataset"))
  oracle = oracle_lib.OnlineOracle(cat, k=20, index_kind="exact")
  queries = query_split.validation_queries(cat)
  scores = {}
  for run in ("pretrain", "sft", "hppo"):
    method = config.runs[run].method
    fitted = generative.fit(method, os.path.join(out, run), cat, oracle,
                            config.evaluate)[method]
    ids = fitted.retrieve(queries, evaluation.TrainIndex(oracle), 20)
    scores[run] = metrics.retrieval_metrics(ids, queries.seeds, queries.pattern, queries.domain,
                                            cat.patterns, cat.attributes, ks=(20,))
  return scores


def test_cpt_then_sft_raise_attr_over_the_pretrained_model(validation_scores):
  pretrained, sft = validation_scores["pretrain"], validation_scores["sft"]
  # Measured on the tiny world: 0.02 -> 0.19.
  assert sft["attr@20"].mean() > pretrained["attr@20"].mean() + 0.1


def test_hppo_regression_fits_its_targets(trained):
  out, _ = trained
  history = report.load_metrics(os.path.join(out, "hppo"))
  error = history["sft_error"][np.isfinite(history["sft_error"])]
  assert len(error) >= 4
  # Each logged value is one batch's; the last quarter's mean against the first quarter's.
  quarter = len(error) // 4
  assert error[-quarter:].mean() < 0.8 * error[:quarter].mean()


def test_hppo_raises_validation_joint_over_its_reference(validation_scores):
  assert (validation_scores["hppo"]["joint@20"].mean()
          > validation_scores["sft"]["joint@20"].mean())


def test_the_trained_model_beats_the_seed_centroid(trained):
  out, _ = trained
  with open(os.path.join(out, "eval", "results.json")) as f:
    records = json.load(f)["records"]
  mean = lambda m: np.mean([r["joint@20"] for r in records if r["method"] == m])
  assert mean("modit_hppo") > mean("seed_centroid") + 0.2
  hppo = [r for r in records if r["method"] == "modit_hppo"]
  assert sum(r["vs"]["seed_centroid"]["significant_gain"] for r in hppo) >= 6
