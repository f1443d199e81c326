"""Stage 1 end to end on the tiny world: batches, training, and the pretrained_gr method."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import evaluate as evaluate_config
from configs import pretrain as pretrain_config
from modit_jax import baselines
from modit_jax import catalog as catalog_lib
from modit_jax import data
from modit_jax import errors
from modit_jax import evaluation
from modit_jax import metrics
from modit_jax import retrieval
from modit_jax import training

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tiny_world):
  return tiny_world


@pytest.fixture(scope="module")
def pretrained(tiny, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  training.train(pretrain_config.get_config("tiny"), str(tiny), workdir)
  return workdir


def test_sequence_prefix_batches(tiny):
  cat = catalog_lib.load_catalog(tiny)
  prefixes = data.SequencePrefixes(cat.sequences, cat.embeddings, max_context=6, null_domain=4,
                                   seed=0)
  a, b = prefixes(3, 32), prefixes(3, 32)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])  # a pure function of the step
  assert not np.array_equal(prefixes(4, 32)["target"], a["target"])
  # Process slices of the global batch concatenate back to it.
  parts = [prefixes(3, 32, i, 4) for i in range(4)]
  for key in a:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), a[key])
  assert a["context"].shape == (32, 6, cat.dim)
  assert np.all(a["context_mask"].sum(1) >= 1)
  assert np.all(a["domain"] == 4)
  assert np.all(a["context"][~a["context_mask"]] == 0)
  # Every (context, target) is a window of a raw sequence: target follows the last context item.
  ids = {tuple(row[row >= 0]) for row in cat.sequences}
  emb_to_id = {e.tobytes(): i for i, e in enumerate(cat.embeddings)}
  for q in range(8):
    ctx = [emb_to_id[e.tobytes()] for e in a["context"][q][a["context_mask"][q]]]
    window = tuple(ctx + [emb_to_id[a["target"][q].tobytes()]])
    assert any(_contains(seq, window) for seq in ids)


def _contains(seq, window):
  n = len(window)
  return any(seq[i:i + n] == window for i in range(len(seq) - n + 1))


def test_process_slice_refuses_uneven_batch():
  with pytest.raises(errors.UserError, match="not divisible"):
    data.process_slice(10, 0, 3)


def test_pretrained_gr_beats_a_random_query_on_purity(tiny, pretrained):
  cat = catalog_lib.load_catalog(tiny)
  config = evaluate_config.get_config("tiny")
  config.methods = "pretrained_gr"
  config.splits = "item_holdout"
  config.workdirs.pretrained_gr = pretrained
  result = evaluation.evaluate(cat, config)
  purity = result.scores["pretrained_gr"]["item_holdout"]["purity@20"].mean()
  # A random unit query: its top 20 falls in the query's pattern by chance only.
  q = cat.queries["item_holdout"]
  rng = np.random.default_rng(0)
  random_queries = baselines.normalize(rng.standard_normal((len(q), cat.dim)))
  ids, _ = retrieval.build_index(cat.embeddings, "exact").search(random_queries, 20,
                                                                   exclude=q.seeds)
  random_purity = metrics.retrieval_metrics(ids, q.seeds, q.pattern, q.domain, cat.patterns,
                                            cat.attributes, ks=(20,))["purity@20"].mean()
  assert purity > random_purity + 0.3, (purity, random_purity)


def test_train_binary_refuses_unknown_stage_without_traceback(tiny, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "modit_jax.train", "--config=configs/pretrain.py:tiny",
       "--config.stage=magic", f"--dataset={tiny}", f"--workdir={tmp_path}"],
      cwd=_REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "error: unknown stage 'magic'" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_generative_method_without_workdir_is_a_clear_error(tiny):
  cat = catalog_lib.load_catalog(tiny)
  config = evaluate_config.get_config("tiny")
  config.methods = "pretrained_gr"
  with pytest.raises(errors.UserError, match="workdirs.pretrained_gr"):
    evaluation.evaluate(cat, config)


def test_cpt_then_sft_train_from_the_earlier_stage_and_evaluate(tiny, pretrained, tmp_path):
  from configs import cpt as cpt_config  # pylint: disable=g-import-not-at-top
  from configs import sft as sft_config  # pylint: disable=g-import-not-at-top
  cpt = cpt_config.get_config("tiny,reversed")
  assert cpt.cpt.order == "reversed"
  cpt.init_from, cpt.num_steps = pretrained, 20
  training.train(cpt, str(tiny), str(tmp_path / "cpt"))
  sft = sft_config.get_config("tiny")
  sft.init_from, sft.num_steps = str(tmp_path / "cpt"), 20
  training.train(sft, str(tiny), str(tmp_path / "sft"))
  diagnostics = np.load(tmp_path / "sft" / training.DIAGNOSTICS_FILE)
  assert diagnostics["predictor_auc"].shape == (4,)
  cat = catalog_lib.load_catalog(tiny)
  assert np.all(cat.item_split[diagnostics["train_items"]] == 0)
  config = evaluate_config.get_config("tiny")
  config.methods = "modit_sft"
  config.splits = "pattern_holdout"
  config.workdirs.modit_sft = str(tmp_path / "sft")
  result = evaluation.evaluate(cat, config)
  ids = result.retrieved["modit_sft"]["pattern_holdout"]
  assert ids.shape == (len(cat.queries["pattern_holdout"]), 50)
  # The evaluation-only diagnostic: the latent clusters against the hidden patterns.
  diag = result.meta["data_diagnostics"]["modit_sft"]
  assert 0.5 < diag["cluster_nmi"] <= 1.0
  assert set(diag["predictor"]) == set(cat.domains)


def test_data_cache_is_reused_and_changes_nothing(tiny, pretrained, tmp_path, monkeypatch):
  from configs import sft as sft_config  # pylint: disable=g-import-not-at-top
  from modit_jax import trajectories  # pylint: disable=g-import-not-at-top

  def sft(name, cache):
    config = sft_config.get_config("tiny")
    config.init_from, config.num_steps, config.data_cache = pretrained, 20, cache
    return training.train(config, str(tiny), str(tmp_path / name))

  plain = sft("plain", "")
  first = sft("first", str(tmp_path / "cache"))
  assert len(os.listdir(tmp_path / "cache")) == 1
  # A second run with the same cache never recomputes the predictor and clusters.
  monkeypatch.setattr(trajectories, "build_source",
                      lambda *a, **k: pytest.fail("the cached data path was recomputed"))
  second = sft("second", str(tmp_path / "cache"))
  for state in (first, second):
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with np.load(tmp_path / "plain" / training.DIAGNOSTICS_FILE) as x, np.load(
      tmp_path / "second" / training.DIAGNOSTICS_FILE) as y:
    assert sorted(x.files) == sorted(y.files)
    for name in x.files:
      np.testing.assert_array_equal(x[name], y[name])
