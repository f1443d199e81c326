"""Pooling of several worlds' evaluations (the protocol's cells), and the protocol's errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from configs import protocol as protocol_config
from modit_jax import errors
from modit_jax import pooling
from modit_jax import results_markdown
from modit_jax import workflow

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_METHODS = "seed_centroid,centroid_global_shift,local_shift,oracle_shift"


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
  """(catalog directory, evaluation directory) of the tiny world, evaluated."""
  eval_dir = tmp_path_factory.mktemp("world") / "eval"
  proc = subprocess.run(
      [sys.executable, "-m", "modit_jax.cli.evaluate", "--config=configs/evaluate.py:tiny",
       f"--config.methods={_METHODS}", f"--dataset={tiny_world}", f"--workdir={eval_dir}"],
      cwd=_REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(tiny_world), str(eval_dir)


@pytest.fixture(scope="module")
def limited_world(tiny_world, tmp_path_factory):
  """(catalog directory, evaluation directory) of the tiny world asked with 2 seeds a query."""
  eval_dir = tmp_path_factory.mktemp("limited") / "eval"
  proc = subprocess.run(
      [sys.executable, "-m", "modit_jax.cli.evaluate", "--config=configs/evaluate.py:tiny",
       f"--config.methods={_METHODS}", "--config.seed_limit=2", f"--dataset={tiny_world}",
       f"--workdir={eval_dir}"], cwd=_REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(tiny_world), str(eval_dir)


def _results(world):
  with open(os.path.join(world[1], "results.json")) as f:
    return json.load(f)


def test_one_world_pooled_is_its_evaluation(world):
  results = _results(world)
  pooled = pooling.pool({"a": world}, results["references"], num_resamples=1000, seed=0)
  assert pooled["strongest_baseline"] == results["strongest_baseline"]
  assert pooled["records"] == results["records"]


def test_two_worlds_pool_their_queries(world):
  results = _results(world)
  pooled = pooling.pool({"a": world, "b": world}, results["references"], num_resamples=1000,
                        seed=0)
  single = {(r["method"], r["split"], r["domain"]): r for r in results["records"]}
  for r in pooled["records"]:
    one = single[(r["method"], r["split"], r["domain"])]
    assert r["n"] == 2 * one["n"]
    assert r["joint@20"] == pytest.approx(one["joint@20"])
  # Per-world counts are each world's own verdicts.
  for world in ("a", "b"):
    counts = pooled["per_world"][world]["centroid_global_shift"]["vs"]["seed_centroid"]
    assert counts["gains"] == sum(
        r["vs"]["seed_centroid"]["significant_gain"] for r in results["records"]
        if r["method"] == "centroid_global_shift")
  table = pooling.per_world_table(pooled, "seed_centroid")
  assert "| centroid_global_shift | " in table and "world a" in table
  spread = pooling.spread_table(pooled)
  assert spread.count("\n") == len(pooled["methods"]) + 2
  gaps = pooling.gap_closed(pooled["records"])
  assert gaps["seed_centroid"] == pytest.approx(0.0)
  assert gaps["oracle_shift"] == pytest.approx(1.0)


def test_pooled_results_say_what_the_novelty_gate_did(world, tmp_path):
  worlds = {}
  # World c's pattern-holdout split had no queries: it records no share there.
  for name, shares, threshold in (("a", {"item_holdout": 0.0, "pattern_holdout": 0.2}, 0.55),
                                  ("b", {"item_holdout": 0.0, "pattern_holdout": 0.6}, 0.6),
                                  ("c", {"item_holdout": 0.3}, 0.6)):
    eval_dir = tmp_path / name
    shutil.copytree(world[1], eval_dir)
    results = _results((world[0], eval_dir))
    results["novelty_gate"] = {
        "methods": ["modit_hppo"], "novel_share": shares,
        "gate": {"neighbours": 20, "threshold": threshold, "directions": [], "shifts": []}}
    (eval_dir / "results.json").write_text(json.dumps(results))
    worlds[name] = (world[0], str(eval_dir))
  without = pooling.pool({n: worlds[n] for n in "bc"}, results["references"],
                         num_resamples=200, seed=0)
  assert without["novelty_gate"]["novel_share"] == {"item_holdout": pytest.approx(0.15),
                                                    "pattern_holdout": pytest.approx(0.6)}
  pooled = pooling.pool({n: worlds[n] for n in "ab"}, results["references"],
                        num_resamples=200, seed=0)
  assert pooled["novelty_gate"]["novel_share"] == {"item_holdout": 0.0,
                                                   "pattern_holdout": pytest.approx(0.4)}
  assert pooled["novelty_gate"]["gate"] == {"neighbours": 20, "thresholds": [0.55, 0.6]}
  text = results_markdown.gate_text(pooled)
  assert "(item_holdout 0.0%, pattern_holdout 40.0% of the seed sets)" in text
  assert "their world's threshold (0.550, 0.600)" in text
  assert "novelty_gate" not in pooling.pool({"a": world}, results["references"],
                                            num_resamples=200, seed=0)


def test_a_world_without_evaluation_is_a_clear_error(tmp_path):
  with pytest.raises(errors.UserError, match="no finished evaluation"):
    pooling.pool({"a": (str(tmp_path), str(tmp_path))}, ["seed_centroid"], num_resamples=10,
                 seed=0)


@pytest.mark.parametrize("worlds, dataset, message", [
    ((0, 1), "", "development world"),
    ((1, 1), "", "distinct"),
    ((1, 2), "/some/catalog", "generates its worlds"),
])
def test_protocol_config_errors(tmp_path, worlds, dataset, message):
  config = protocol_config.get_config("tiny")
  config.worlds = worlds
  config.pipeline.dataset = dataset
  with pytest.raises(errors.UserError, match=message):
    workflow.run_protocol(config, str(tmp_path))


def test_a_world_trains_with_its_seed_plus_the_offset():
  config = protocol_config.get_config("tiny")
  default = workflow.world_pipeline(config, 7)
  assert (default.world.seed, default.seed) == (7, 7)
  config.training_seed_offset = 100
  retrained = workflow.world_pipeline(config, 7)
  # The world (its generator seed) stays; only the training seed moves.
  assert (retrained.world.seed, retrained.seed) == (7, 107)
  assert config.pipeline.seed == protocol_config.get_config("tiny").pipeline.seed  # not mutated
  config.training_seed_offset = -1
  with pytest.raises(errors.UserError, match="training_seed_offset"):
    workflow.world_pipeline(config, 7)


def test_an_evaluation_with_fewer_seeds_is_rescored_with_them(world, limited_world):
  limited = _results(limited_world)
  assert limited["seed_limit"] == 2 and _results(world)["seed_limit"] == 0
  with open(os.path.join(limited_world[1], "report.md")) as f:
    assert "only its first 2 seeds" in f.read()
  # Fewer seeds change what the seed average retrieves.
  full = {(r["method"], r["split"], r["domain"]): r for r in _results(world)["records"]}
  assert any(r["joint@20"] != full[(r["method"], r["split"], r["domain"])]["joint@20"]
             for r in limited["records"] if r["method"] == "seed_centroid")
  # Pooling rescores the saved ids with the same 2 seeds (a seed's label changes Bound@K
  # only where a pattern has few positives, so the records alone could not tell): its catalog
  # is the cut one, and one world pools to its records.
  catalog, _, _ = pooling._load_world(*limited_world)  # pylint: disable=protected-access
  assert {q.seeds.shape[1] for q in catalog.queries.values()} == {2}
  pooled = pooling.pool({"a": limited_world}, limited["references"], num_resamples=1000,
                        seed=0)
  assert pooled["records"] == limited["records"]
