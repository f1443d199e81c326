"""The retrieval API and binary on a tiny stage-3 model: answers, index caching, errors, compiles."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import perturb
from configs import sft as sft_config
from modit_jax import catalog as catalog_lib
from modit_jax import engine
from modit_jax import errors
from modit_jax import generator as generator_lib
from modit_jax import novelty
from modit_jax import retrieval
from modit_jax import retriever as retriever_lib
from modit_jax import run_dir
from modit_jax import training
import modit_jax

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def sft_workdir(tiny_world, tmp_path_factory, fast_compile):
  del fast_compile  # active for the whole module
  workdir = str(tmp_path_factory.mktemp("sft"))
  config = sft_config.get_config("tiny")
  config.init_from, config.num_steps = "", 20  # from scratch: a domain-conditioned model
  config.metric_predictor.num_steps = 30  # shapes the batches only; its quality is moot here
  # These tests check how samples are keyed (per query, per device split), so the sampler
  # must draw: the default temperature 0 would make every key give the same query.
  config.diffusion.sample_temperature = 1.0
  training.train(config, str(tiny_world), workdir)
  return workdir


@pytest.fixture(scope="module")
def retriever(sft_workdir):
  return modit_jax.Retriever.from_workdir(sft_workdir)


@pytest.fixture(scope="module")
def cat(tiny_world):
  return catalog_lib.load_catalog(tiny_world)


def _query(cat, q=0):
  """Seed ids and domain name of a held-out query of the tiny world."""
  queries = cat.queries["item_holdout"]
  return queries.seeds[q], cat.domains[queries.domain[q]]


def _new_items(cat, seeds, seed=0):
  """Raw embeddings of new items near the seeds: perturbed, scaled, not in the catalog."""
  rng = np.random.default_rng(seed)
  raw = 3.0 * (cat.embeddings[seeds] + 0.1 * rng.standard_normal((len(seeds), cat.dim)))
  unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
  assert (unit @ cat.embeddings.T).max() < 0.9999  # none of them is a catalog item
  return raw.astype(np.float32)


def test_padded_size_buckets():
  sizes = [0, 1, 2, 3, 4, 5, 255, 256, 257, 600]
  assert [generator_lib.Generator.padded_size(n) for n in sizes] == [
      1, 1, 2, 4, 4, 8, 256, 256, 512, 768]


def test_item_id_seeds_exclude_seeds_and_match_the_generator(retriever, cat):
  seeds, domain = _query(cat)
  ids, scores = retriever.retrieve(seeds, domain, k=20)
  assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (20,)
  assert len(set(ids)) == 20 and not set(ids) & set(seeds)
  assert np.all(np.diff(scores) <= 1e-6)
  # The same query through the Generator (unpadded context, int seed) and the same index.
  domain_id = cat.domain_id(domain)
  samples = retriever.generator.sample(
      cat.embeddings[seeds][None], np.ones((1, len(seeds)), bool), np.array([domain_id]),
      seed=0, guidance_scale=retriever.guidance_scale[domain_id], exclude_items=seeds[None])
  want_ids, want_scores = generator_lib.search_samples(retriever.index, samples, seeds[None], 20,
                                                    return_scores=True)
  np.testing.assert_array_equal(ids, want_ids[0])
  np.testing.assert_allclose(scores, want_scores[0], atol=1e-5)


def test_new_item_embeddings_answer_and_exclude_nothing(retriever, cat):
  seeds, domain = _query(cat, 1)
  raw = _new_items(cat, seeds)
  ids, scores = retriever.retrieve(raw, domain, k=20)
  assert ids.shape == scores.shape == (20,) and len(set(ids)) == 20
  assert np.all((ids >= 0) & (ids < cat.num_items))
  # Scale does not matter (rows are normalised).
  np.testing.assert_array_equal(retriever.retrieve(raw / 3.0, domain, k=20)[0], ids)
  # The seeds' own embeddings as raw seeds: nearly the id answer plus (possibly) the seeds
  # themselves. Not exactly: the model reads the catalog around its seeds, and raw embeddings
  # are not known to be catalog items, so the seeds stay in their own neighbourhood there.
  by_embedding, _ = retriever.retrieve(cat.embeddings[seeds], domain, k=20 + len(seeds))
  by_id, _ = retriever.retrieve(seeds, domain, k=20)
  assert len(set(by_embedding[~np.isin(by_embedding, seeds)][:20]) & set(by_id)) >= 16


@pytest.mark.parametrize("seed", [3, np.arange(16)], ids=["batch_seed", "per_query_seeds"])
def test_sampling_splits_rows_over_devices_without_changing_them(retriever, cat, seed,
                                                                monkeypatch):
  generator = retriever.generator
  queries = cat.queries["item_holdout"]
  args = (cat.embeddings[queries.seeds[:16]], np.ones((16, queries.seeds.shape[1]), bool),
          queries.domain[:16])
  assert 16 % jax.local_device_count() == 0 and jax.local_device_count() > 1
  split = generator.sample(*args, seed=seed, num_samples=2)
  placed = generator._placed_params  # pylint: disable=protected-access
  assert any(len(s.device_set) == jax.local_device_count() for s in placed)
  first = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  monkeypatch.setattr(engine, "local_row_shardings", lambda num_rows: (first, first))
  single = generator.sample(*args, seed=seed, num_samples=2)
  np.testing.assert_allclose(split, single, atol=1e-5)
  assert not np.allclose(split[:, 0], split[:, 1])  # two different samples per query


def test_batch_rows_equal_single_calls(retriever, cat):
  seeds0, _ = _query(cat, 2)
  seeds1, _ = _query(cat, 3)
  seed_sets = [seeds0, seeds1[:3], _new_items(cat, seeds1[:5], seed=1)]
  domains = ["quality", 1, "length"]
  ids, scores = retriever.retrieve_batch(seed_sets, domains, k=10)
  assert ids.shape == scores.shape == (3, 10)
  for q, (seeds, domain) in enumerate(zip(seed_sets, domains)):
    one_ids, one_scores = retriever.retrieve(seeds, domain, k=10)
    np.testing.assert_array_equal(ids[q], one_ids)
    np.testing.assert_allclose(scores[q], one_scores, atol=1e-5)


def test_id_arrays_parse_as_their_rows_do(retriever, cat):
  """An int [Q, s] batch skips the per-row parse and gives the same arrays, repeats included."""
  rng = np.random.default_rng(0)
  # 4 queries: the bucket of 8 is test_calls_in_one_bucket_compile_once's alone.
  ids = rng.integers(0, cat.num_items, (4, 5))
  ids[1, 3] = ids[1, 0]  # a repeated seed: in the context twice, excluded once
  ids[2] = ids[2, 0]  # one item five times
  rows = [retriever._parse_seeds(row, "") for row in ids]
  expected = retriever._pad([c for c, _ in rows], [e for _, e in rows])
  for got, want in zip(retriever._parse_id_batch(ids), expected):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  assert retriever_lib._id_batch(ids) is ids
  assert retriever_lib._id_batch([list(row) for row in ids]).shape == (4, 5)
  assert retriever_lib._id_batch([[1, 2], [3]]) is None  # ragged: row by row
  assert retriever_lib._id_batch(np.ones((2, 3, 32), np.float32)) is None  # embeddings
  # End to end: the batch's rows are the single calls' answers.
  batch_ids, batch_scores = retriever.retrieve_batch(ids, "safety", k=10)
  for q, row in enumerate(ids):
    one_ids, one_scores = retriever.retrieve(row, "safety", k=10)
    np.testing.assert_array_equal(batch_ids[q], one_ids)
    np.testing.assert_allclose(batch_scores[q], one_scores, atol=1e-5)
  assert not set(batch_ids[2]) & {ids[2, 0]}


def test_several_samples_merge_by_best_score(retriever, cat):
  seeds, domain = _query(cat, 5)
  one_ids, one_scores = retriever.retrieve(seeds, domain, k=15)
  merged = retriever_lib.Retriever(retriever.generator, retriever.catalog, retriever.index,
                                   num_samples=3)
  ids, scores = merged.retrieve(seeds, domain, k=15)
  assert len(set(ids)) == 15 and not set(ids) & set(seeds)
  assert np.all(np.diff(scores) <= 1e-6)
  # Sample 0 is the single-sample query, so the merged top k is at least as good rank by rank.
  assert np.all(scores >= one_scores - 1e-6)
  assert not np.array_equal(ids, one_ids)  # the other samples found other items


def test_calls_in_one_bucket_compile_once(retriever, cat):
  compiles = []
  listener = lambda event, duration, **kwargs: compiles.append(event == _COMPILE_EVENT)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    seeds, _ = _query(cat, 4)
    # 5..8 queries share the bucket of 8, which no other test uses: the first call compiles.
    retriever.retrieve_batch([seeds] * 5, "quality", k=5)
    assert sum(compiles) >= 1, "the listener saw no compilation at all"
    compiles.clear()
    cache_size = retriever.generator._sample_seeded._cache_size()  # pylint: disable=protected-access
    # Same bucket: 5..8 queries whose longest seed set has 5..8 seeds (contexts padded to 8).
    retriever.retrieve_batch([seeds[:2], seeds, seeds[:5], seeds[:1], seeds[:7], seeds[:3]],
                             ["safety", 0, 3, "length", "quality", 2], k=7)
    retriever.retrieve_batch([_new_items(cat, seeds[:6])] * 8, "popularity", k=20)
    retriever.retrieve_batch([np.arange(5)] * 7, "quality", k=3)
    assert sum(compiles) == 0
    assert retriever.generator._sample_seeded._cache_size() == cache_size  # pylint: disable=protected-access
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_generators_of_one_architecture_share_compiled_samplers(sft_workdir, cat):
  """A second model of the same architecture (another stage, an ablation) does not recompile,
  and answers with its own parameters."""
  first, second = (generator_lib.Generator(sft_workdir) for _ in range(2))
  for generator in (first, second):  # the default SFT model reads the catalog's offsets
    generator.bind_catalog(cat)
  assert second._sample_seeded is first._sample_seeded  # pylint: disable=protected-access
  second.params = perturb(first.params, seed=3)
  queries = cat.queries["item_holdout"]
  context = np.asarray(cat.embeddings[queries.seeds[:3]], np.float32)
  mask = np.ones(queries.seeds[:3].shape, bool)
  draw = lambda g: g.sample(context, mask, queries.domain[:3], seed=np.arange(3))
  before = draw(first)
  compiles = []
  listener = lambda event, duration, **kwargs: compiles.append(event == _COMPILE_EVENT)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    other = draw(second)
    assert not any(compiles)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert np.abs(other - before).max() > 1e-3  # its own parameters, not the first's
  np.testing.assert_array_equal(draw(first), before)
  # Another sampler (fewer DDIM steps) is another compiled function.
  assert generator_lib.Generator(sft_workdir, num_steps=2)._sample is not first._sample  # pylint: disable=protected-access


def test_the_novelty_gate_answers_unseen_patterns_with_the_global_shift(retriever, cat):
  gate = novelty.Gate.for_catalog(cat, dict.fromkeys(cat.domains, 0.4), retriever.index)
  gated = retriever_lib.Retriever(retriever.generator, cat, retriever.index,
                                  num_samples=2, gate=gate)
  ungated = retriever_lib.Retriever(retriever.generator, cat, retriever.index, num_samples=2)
  # A seed set of a trained pattern: the model's answer.
  seeds, domain = _query(cat)
  np.testing.assert_array_equal(gated.retrieve(seeds, domain)[0],
                                ungated.retrieve(seeds, domain)[0])
  # One of a pattern no train item belongs to: the global shift's, for ids and raw embeddings.
  queries = cat.queries["pattern_holdout"]
  seeds, m = queries.seeds[0], int(queries.domain[0])
  seed_mean = np.asarray(cat.embeddings[seeds], np.float32).mean(0)[None]
  want, _ = retriever.index.search(
      gate.fallback(retriever.index, seed_mean, np.array([m]), seeds[None]), 20,
      exclude=seeds[None])
  np.testing.assert_array_equal(gated.retrieve(seeds, cat.domains[m])[0], want[0])
  assert not np.array_equal(ungated.retrieve(seeds, cat.domains[m])[0], want[0])
  by_embedding, _ = gated.retrieve(cat.embeddings[seeds], cat.domains[m], k=20 + len(seeds))
  np.testing.assert_array_equal(by_embedding[~np.isin(by_embedding, seeds)][:20], want[0])


@pytest.mark.parametrize("seeds,domain,k,match", [
    ([0, 3600], "quality", 20, "unknown item id 3600: the catalog's ids are 0..3599"),
    ([5, -1], "quality", 20, "unknown item id -1"),
    (np.ones((2, 33), np.float32), "quality", 20, "dimension 33, but the catalog and model "
     "have dimension 32"),
    (np.ones(32, np.float32), "quality", 20, r"2-D \[s, 32\]"),
    ([], "quality", 20, "empty seed set"),
    (np.zeros((0, 32), np.float32), "quality", 20, "empty seed set"),
    (list(range(17)), "quality", 20, r"17 seeds, but the model takes at most 16 \(its "
     r"config.model.max_context\)"),
    ([1, 2], "colour", 20, "unknown domain 'colour'; known domains: quality, safety, "
     "popularity, length"),
    ([1, 2], 4, 20, r"unknown domain 4; known domains: .* \(or their ids 0..3\)"),
    ([1, 2], "quality", 0, r"k must be in \[1, 3598\]"),
    ([1, 2], "quality", 3599, r"k must be in \[1, 3598\]"),
    (np.array([[np.nan] * 32]), "quality", 20, "seed embedding row 0 is not finite"),
    (np.zeros((1, 32)), "quality", 20, "seed embedding row 0 is all zeros"),
    (["a"], "quality", 20, "item ids or float embeddings"),
])
def test_bad_queries_are_user_errors(retriever, seeds, domain, k, match):
  with pytest.raises(errors.UserError, match=match):
    retriever.retrieve(seeds, domain, k)


def test_bad_batches_name_the_seed_set(retriever):
  with pytest.raises(errors.UserError, match="seed set 1: unknown item id 9999"):
    retriever.retrieve_batch([[1, 2], [9999]], "quality")
  with pytest.raises(errors.UserError, match="2 seed sets but 3 domains"):
    retriever.retrieve_batch([[1, 2], [3]], ["quality"] * 3)
  with pytest.raises(errors.UserError, match="seed_sets is empty"):
    retriever.retrieve_batch([], "quality")
  # The same errors from an id array, which is parsed without a loop over its rows.
  with pytest.raises(errors.UserError, match="seed set 1: unknown item id 9999"):
    retriever.retrieve_batch(np.array([[1, 2], [3, 9999]]), "quality")
  with pytest.raises(errors.UserError, match="seed set 2: unknown item id -1"):
    retriever.retrieve_batch([[1, 2], [3, 4], [-1, 5]], "quality")
  with pytest.raises(errors.UserError, match="seed set 0: 17 seeds, but the model takes at "
                     "most 16"):
    retriever.retrieve_batch(np.ones((2, 17), np.int64), "quality")
  with pytest.raises(errors.UserError, match="seed set 0: unknown domain 'colour'"):
    retriever.retrieve_batch(np.ones((2, 3), np.int64), "colour")
  with pytest.raises(errors.UserError, match=r"k must be in \[1, 3597\]"):
    retriever.retrieve_batch(np.array([[1, 2, 3], [4, 4, 4]]), "quality", k=3598)


def test_pipeline_output_builds_the_index_once_then_loads_it(sft_workdir, tiny_world, tmp_path,
                                                             monkeypatch, cat):
  out = tmp_path / "out"
  out.mkdir()
  with open(out / retriever_lib.PIPELINE_FILE, "w") as f:
    json.dump({"final_workdir": os.path.relpath(sft_workdir, out),
               "dataset": os.path.relpath(tiny_world, out), "index": "index"}, f)
  (out / retriever_lib.GUIDANCE_FILE).write_text(json.dumps({"guidance_scale": {"safety": 2.5}}))
  builds = []
  build_index = retrieval.build_index
  monkeypatch.setattr(retrieval, "build_index",
                      lambda *a, **kw: builds.append(a) or build_index(*a, **kw))
  first = retriever_lib.Retriever.from_workdir(out)
  assert len(builds) == 1 and (out / "index" / retrieval.META_FILE).is_file()
  assert first.index.kind == "scann"
  second = retriever_lib.Retriever.from_workdir(out)
  assert len(builds) == 1  # read back, not rebuilt
  default = first.generator.guidance_scale
  np.testing.assert_allclose(second.guidance_scale, [default, 2.5, default, default])
  queries = cat.embeddings[:50]
  for got, want in zip(second.index.search(queries, 10), first.index.search(queries, 10)):
    np.testing.assert_array_equal(got, want)


def test_workdir_errors(sft_workdir, tmp_path):
  with pytest.raises(errors.UserError, match="neither a training workdir .config.json. nor a "
                     "pipeline output directory .pipeline.json."):
    retriever_lib.Retriever.from_workdir(tmp_path)
  (tmp_path / retriever_lib.PIPELINE_FILE).write_text(json.dumps({"final_workdir": sft_workdir}))
  (tmp_path / retriever_lib.GUIDANCE_FILE).write_text(json.dumps({"guidance_scale": {"x": 1}}))
  with pytest.raises(errors.UserError, match=r"guidance.json: unknown domain\(s\) x"):
    retriever_lib.Retriever.from_workdir(tmp_path)


# The training stack: serving a trained model must load none of it.
_TRAINING_MODULES = ("baselines", "clusters", "data", "evaluation", "hppo", "oracle",
                     "query_split", "stages", "trajectories", "training", "workflow")


def test_serving_imports_nothing_of_the_training_stack():
  code = ("import sys; import modit_jax.cli.retrieve, modit_jax.retriever; "
          "print(' '.join(sorted(m for m in sys.modules if m.startswith('modit_jax.'))))")
  out = subprocess.run([sys.executable, "-c", code], cwd=_REPO, capture_output=True,
                       text=True, timeout=300, check=True).stdout.split()
  assert "modit_jax.generator" in out and "modit_jax.run_dir" in out  # the check can fail
  loaded = sorted(m for m in out if m.split(".")[1] in _TRAINING_MODULES)
  assert not loaded, f"serving imports the training stack: {loaded}"


def test_model_facts_are_recorded_and_read_back(sft_workdir, tmp_path):
  facts = run_dir.read_facts(sft_workdir)
  assert facts == run_dir.ModelFacts("sft", conditioned=True, learned_positions=False)
  # A run directory written before the facts were recorded gets the same ones from its config.
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  saved = json.loads(open(os.path.join(sft_workdir, run_dir.CONFIG_FILE)).read())
  del saved["facts"]
  (legacy / run_dir.CONFIG_FILE).write_text(json.dumps(saved))
  assert run_dir.read_facts(str(legacy)) == facts
  # Inference reads the recorded fact, not the stage's name.
  saved["facts"] = {"stage": "sft", "conditioned": False, "learned_positions": False}
  (legacy / run_dir.CONFIG_FILE).write_text(json.dumps(saved))
  assert not run_dir.read_facts(str(legacy)).conditioned


def _run_binary(*args):
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # tiny model: compile fast
  return subprocess.run([sys.executable, "-m", "modit_jax.cli.retrieve", *args], cwd=_REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_binary_answers_new_item_embeddings(sft_workdir, retriever, cat, tmp_path):
  seeds, domain = _query(cat)
  raw = _new_items(cat, seeds[:4])
  np.save(tmp_path / "new.npy", raw)
  proc = _run_binary(f"--workdir={sft_workdir}", f"--domain={domain}",
                     f"--seed_embeddings={tmp_path / 'new.npy'}", "--k=5")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert lines[0] == f"top 5 for domain {domain} from 4 seeds (new-item embeddings):"
  assert lines[1].split() == ["rank", "item", "score"]
  ids, scores = retriever.retrieve(raw, domain, k=5)
  rows = [line.split() for line in lines[2:]]
  assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
  np.testing.assert_array_equal([int(r[1]) for r in rows], ids)
  np.testing.assert_allclose([float(r[2]) for r in rows], scores, atol=1e-4)


def test_binary_user_error_is_one_line(sft_workdir, retriever):
  del retriever  # its index is saved: the binary only loads
  proc = _run_binary(f"--workdir={sft_workdir}", "--domain=quality", "--seeds=1,99999")
  assert proc.returncode == 2
  assert "error: unknown item id 99999" in proc.stderr
  assert "Traceback" not in proc.stderr
