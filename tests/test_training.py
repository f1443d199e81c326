"""Stage 1 end to end on the tiny world: batches, training, and the pretrained_gr method."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import evaluate as evaluate_config
from configs import pretrain as pretrain_config
from configs import synthetic as synthetic_config
from modit_jax import baselines
from modit_jax import catalog as catalog_lib
from modit_jax import data
from modit_jax import engine
from modit_jax import errors
from modit_jax import evaluation
from modit_jax import generator as generator_lib
from modit_jax import metrics
from modit_jax import models
from modit_jax import retrieval
from modit_jax import run_dir
from modit_jax import synthetic
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


@pytest.fixture(scope="module")
def stage1_evaluated(tiny, pretrained):
  """The stage-1 run evaluated as `pretrained_gr` and, from the same workdir, under a name the
  evaluation config does not list."""
  config = evaluate_config.get_config("tiny")
  config.methods = "pretrained_gr,my_stage1_run"
  config.splits = "item_holdout"
  config.workdirs.pretrained_gr = pretrained
  config.workdirs.my_stage1_run = pretrained
  return evaluation.evaluate(catalog_lib.load_catalog(tiny), config)


def test_pretrained_gr_beats_a_random_query_on_purity(tiny, stage1_evaluated):
  cat = catalog_lib.load_catalog(tiny)
  purity = stage1_evaluated.scores["pretrained_gr"]["item_holdout"]["purity@20"].mean()
  # A random unit query: its top 20 falls in the query's pattern by chance only.
  q = cat.queries["item_holdout"]
  rng = np.random.default_rng(0)
  random_queries = baselines.normalize(rng.standard_normal((len(q), cat.dim)))
  ids, _ = retrieval.build_index(cat.embeddings, "exact").search(random_queries, 20,
                                                                   exclude=q.seeds)
  random_purity = metrics.retrieval_metrics(ids, q.seeds, q.pattern, q.domain, cat.patterns,
                                            cat.attributes, ks=(20,))["purity@20"].mean()
  assert purity > random_purity + 0.3, (purity, random_purity)


def test_any_run_given_a_workdir_is_a_generative_method(stage1_evaluated):
  """A name the evaluation config does not list is evaluated from its workdir like the others."""
  retrieved = stage1_evaluated.retrieved
  np.testing.assert_array_equal(retrieved["my_stage1_run"]["item_holdout"],
                                retrieved["pretrained_gr"]["item_holdout"])


def test_train_binary_refuses_unknown_stage_without_traceback(tiny, tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "modit_jax.cli.train", "--config=configs/pretrain.py:tiny",
       "--config.stage=magic", f"--dataset={tiny}", f"--workdir={tmp_path}"],
      cwd=_REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "error: unknown stage 'magic'" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_unknown_model_dtype_is_a_clear_error():
  config = pretrain_config.get_config("tiny")
  config.model.dtype = "float16"
  with pytest.raises(errors.UserError, match="model.dtype must be one of float32, bfloat16"):
    models.make_model(config.model, 8, 3)


@pytest.mark.parametrize("field, value, message", [
    ("num_heads", 5, "model.width 32 must be divisible by model.num_heads 5"),
    ("depth", 0, "model.depth must be a positive integer, got 0"),
    ("mlp_ratio", -1, "model.mlp_ratio must be a positive integer, got -1"),
])
def test_a_model_config_that_cannot_build_a_dit_is_a_clear_error(field, value, message):
  config = pretrain_config.get_config("tiny")
  with config.unlocked():
    config.model[field] = value
  with pytest.raises(errors.UserError, match=message):
    models.make_model(config.model, 8, 3)


@pytest.mark.parametrize("field, value, message", [
    ("warmup_steps", 301, "config.warmup_steps must be in"),
    ("mesh_devices", 3, r"batch_size=64 must be divisible by the number of devices \(3\)"),
    ("mesh_devices", 99, "cannot build a mesh of 99 devices"),
    ("mesh_devices", -1, "mesh_devices must be >= 0"),
])
def test_a_refused_config_leaves_the_workdir_untouched(tiny, tmp_path, field, value, message):
  config = pretrain_config.get_config("tiny")
  config[field] = value
  with pytest.raises(errors.UserError, match=message):
    training.train(config, str(tiny), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_a_run_resumes_only_with_its_own_config_and_catalog(tiny, pretrained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  saved = open(os.path.join(workdir, run_dir.CONFIG_FILE)).read()
  # Another learning rate on a resume would mix two trainings in one checkpoint.
  config = pretrain_config.get_config("tiny")
  config.learning_rate *= 2
  config.model.num_heads = 4 if config.model.num_heads != 4 else 2
  with pytest.raises(errors.UserError, match=r"another config.*learning_rate: .* -> .*"
                     r"model\.num_heads"):
    training.train(config, str(tiny), workdir)
  assert open(os.path.join(workdir, run_dir.CONFIG_FILE)).read() == saved
  # So would another catalog of the same shape (another generator seed).
  other = tmp_path / "other_world"
  world = synthetic_config.get_config("tiny")
  world.seed += 1
  synthetic.write_world(world, other)
  with pytest.raises(errors.UserError, match="catalog: manifest"):
    training.train(pretrain_config.get_config("tiny"), str(other), workdir)
  # Bookkeeping may change: how often to log and save, where the catalog or parent lies, and
  # the matmul precision (docs/engine.md).
  config = pretrain_config.get_config("tiny")
  config.log_every, config.checkpoint_every, config.model.dtype = 1, 1, "bfloat16"
  state = training.train(config, shutil.copytree(str(tiny), str(tmp_path / "moved")), workdir)
  assert int(state.step) == config.num_steps
  # A workdir without a run config (a fresh one) is no resume.
  run_dir.check_same_run(str(tmp_path / "fresh"), config, catalog_lib.load_catalog(str(tiny)))


def test_a_field_added_later_matches_its_absence_only_at_its_default():
  """A run saved before `model.catalog_offsets` existed is the same run at its default ()."""
  config = pretrain_config.get_config("tiny")
  saved = json.loads(config.to_json_best_effort())
  del saved["model"]["catalog_offsets"]
  assert run_dir.config_changes(saved, config) == []
  config.model.catalog_offsets = (50,)
  assert run_dir.config_changes(saved, config) == [
      "model.catalog_offsets: (absent) -> [50]"]
  # Every such field's "same as absent" value is its default.
  flat = run_dir._flatten(json.loads(pretrain_config.get_config("tiny").to_json_best_effort()))
  for field, value in run_dir._SAME_AS_ABSENT.items():
    assert flat[field] == value, field


@pytest.mark.parametrize("workdir, message", [
    ("", "workdirs.pretrained_gr"),
    ("not_a_run", "is not a training workdir"),
])
def test_generative_method_without_a_model_is_refused_before_any_work(
    tiny, tmp_path, monkeypatch, workdir, message):
  def no_index(*args, **kwargs):
    raise AssertionError("the index was built before the workdir was checked")

  monkeypatch.setattr(evaluation.retrieval, "build_index", no_index)
  cat = catalog_lib.load_catalog(tiny)
  config = evaluate_config.get_config("tiny")
  config.methods = "seed_centroid,pretrained_gr"
  config.workdirs.pretrained_gr = str(tmp_path / workdir) if workdir else ""
  with pytest.raises(errors.UserError, match=message):
    evaluation.evaluate(cat, config)


@pytest.fixture(scope="module")
def cpt_workdir(tiny, pretrained, tmp_path_factory):
  from configs import cpt as cpt_config  # pylint: disable=g-import-not-at-top
  cpt = cpt_config.get_config("tiny,reversed")
  assert cpt.cpt.order == "reversed" and cpt.model.learned_positions
  cpt.init_from, cpt.num_steps = pretrained, 20
  workdir = str(tmp_path_factory.mktemp("cpt"))
  training.train(cpt, str(tiny), workdir)
  return workdir


def test_cpt_then_sft_train_from_the_earlier_stage_and_evaluate(tiny, pretrained, cpt_workdir,
                                                                 tmp_path):
  from configs import sft as sft_config  # pylint: disable=g-import-not-at-top
  sft = sft_config.get_config("tiny")
  sft.init_from, sft.num_steps = cpt_workdir, 20
  training.train(sft, str(tiny), str(tmp_path / "sft"))
  # Stage 2 adds a position table to the stage-1 model; stage 3 (seed sets) drops it again.
  assert "context_pos" not in engine.restore_params(pretrained)
  assert "context_pos" in engine.restore_params(cpt_workdir)
  assert "context_pos" not in engine.restore_params(str(tmp_path / "sft"))
  diagnostics = np.load(tmp_path / "sft" / run_dir.DIAGNOSTICS_FILE)
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


def test_init_from_a_different_model_is_refused(tiny, pretrained, tmp_path):
  from configs import sft as sft_config  # pylint: disable=g-import-not-at-top
  sft = sft_config.get_config("tiny")
  sft.init_from, sft.model.width, sft.model.num_heads = pretrained, 64, 2
  with pytest.raises(errors.UserError, match="does not fit this stage's model"):
    training.train(sft, str(tiny), str(tmp_path / "sft"))


def test_a_positions_model_gets_its_seeds_in_ascending_density(tiny, cpt_workdir):
  cat = catalog_lib.load_catalog(tiny)
  generator = generator_lib.Generator(cpt_workdir)
  assert generator.context_predictor is not None
  train = cat.train_items()
  context = np.asarray(cat.embeddings[train[[5, 40, 3, 77, 12, 60]]], np.float32)[None]
  mask = np.array([[True, True, True, True, False, False]])
  domain = np.array([2])
  ordered, ordered_mask = generator.order_context(context, mask, domain)
  np.testing.assert_array_equal(ordered_mask, mask)  # padding last
  density = generator.context_predictor.predict(ordered[0, :4])[:, 2]
  assert np.all(np.diff(density) >= 0)
  assert sorted(map(bytes, ordered[0, :4])) == sorted(map(bytes, context[0, :4]))
  # The null domain defines no order: the caller's is kept.
  kept, _ = generator.order_context(context, mask, np.array([cat.num_domains]))
  np.testing.assert_array_equal(kept, context)
  # Any order of the same seeds gives the same query; the model alone would not (positions).
  shuffled = context[:, [2, 0, 3, 1, 4, 5]]
  a = generator.sample(context, mask, domain, seed=1)
  b = generator.sample(shuffled, mask, domain, seed=1)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  generator.context_predictor = None
  raw_a = generator.sample(context, mask, domain, seed=1)
  raw_b = generator.sample(shuffled, mask, domain, seed=1)
  assert not np.allclose(raw_a, raw_b, rtol=1e-5, atol=1e-6)


def test_a_positions_model_without_a_saved_predictor_is_a_clear_error(cpt_workdir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / "cpt"
  shutil.copytree(cpt_workdir, copy)
  os.remove(copy / run_dir.DIAGNOSTICS_FILE)
  with pytest.raises(errors.UserError, match="no saved predictor"):
    generator_lib.Generator(str(copy))


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
  with np.load(tmp_path / "plain" / run_dir.DIAGNOSTICS_FILE) as x, np.load(
      tmp_path / "second" / run_dir.DIAGNOSTICS_FILE) as y:
    assert sorted(x.files) == sorted(y.files)
    for name in x.files:
      np.testing.assert_array_equal(x[name], y[name])
  # A cache from before the predictor's parameters were saved is built again, not trusted.
  monkeypatch.undo()
  [name] = os.listdir(tmp_path / "cache")
  path = tmp_path / "cache" / name
  with np.load(path) as saved:
    old = {k: saved[k] for k in saved.files if not k.startswith("predictor_param/")}
  catalog_lib.save_npz(str(path), **old)
  sft("third", str(tmp_path / "cache"))
  with np.load(path) as saved:
    assert sorted(saved.files) == sorted(x.files)
