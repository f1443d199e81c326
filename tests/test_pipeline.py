"""The one-command pipeline on the tiny world: every run, evaluation, report, serving, re-run."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import pipeline as pipeline_config
from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import hppo as hppo_lib
from modit_jax import novelty
from modit_jax import retrieval
from modit_jax import retriever
from modit_jax import run_dir
from modit_jax import sizing
from modit_jax import training
from modit_jax import workflow

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# One ablation of each kind keeps the test short; test_hppo.py checks every policy ablation config.
_RUNS = ("pretrain", "cpt", "sft", "hppo", "cpt_random", "hppo_no_reference")


def _fast_tiny_config(ablations: bool = True):
  config = pipeline_config.get_config("tiny" if ablations else "tiny,no_ablations")
  for name in list(config.runs):
    if name not in _RUNS:
      del config.runs[name]
  for run in config.runs.values():
    run.stage.num_steps = 8  # wiring, not quality: tests/test_training.py checks learning
    run.stage.warmup_steps = 4
    if run.stage.stage == "hppo":
      run.stage.hppo.regress_steps = 0  # straight to the pools (tests/test_hppo.py has both)
  # Any field of any run can be set (here as --config.runs.hppo.stage.hppo.beta=150 would).
  config.runs.hppo.stage.hppo.beta = 150.0
  config.evaluate.num_resamples = 200
  config.evaluate.guidance_grid = (1.0,)
  # The runs as configured, offsets read: the tiny world's rule says no to the default sizes
  # (test_the_catalog_offsets_rule_asks_the_validation_queries), and the path should run here.
  config.catalog_offsets = "on"
  return config


# (kind, number of items) of every index the pipeline_out fixture's run built.
_INDEX_BUILDS = []


@pytest.fixture(scope="module")
def pipeline_out(tmp_path_factory, fast_compile):
  del fast_compile
  out = str(tmp_path_factory.mktemp("pipeline"))
  build = retrieval.build_index

  def counted(embeddings, kind="scann", **overrides):
    _INDEX_BUILDS.append((kind, len(embeddings)))
    return build(embeddings, kind, **overrides)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(retrieval, "build_index", counted)
    workflow.run_pipeline(_fast_tiny_config(), out)
  return out


def test_pipeline_writes_everything(pipeline_out):
  config = _fast_tiny_config()
  with open(os.path.join(pipeline_out, "eval", "results.json")) as f:
    results = json.load(f)
  methods = {r["method"] for r in results["records"]}
  # Every run's method and every baseline is evaluated.
  assert {run.method for run in config.runs.values()} <= methods
  assert {"seed_centroid", "centroid_global_shift", "rerank"} <= methods
  report = open(os.path.join(pipeline_out, "report.md")).read()
  for name in ("modit_hppo", "hppo_no_reference", "order_random", "modit_sft"):
    assert name in report
  assert "raw sequences: locality" in report  # what stage 1 can learn, noted before training
  pngs = [p for p in os.listdir(os.path.join(pipeline_out, "plots")) if p.endswith(".png")]
  assert pngs and all(f"plots/{p}" in report for p in pngs)
  for name in config.runs:
    assert os.path.isfile(os.path.join(pipeline_out, name, "config.json"))
  saved = run_dir.read_run_config(os.path.join(pipeline_out, "hppo"))[0]
  assert saved.hppo.beta == 150.0 and saved.num_steps == 8


def test_the_pipeline_builds_the_catalog_index_once(pipeline_out):
  """The serving index, built first, is what the offsets rule, the runs that read the catalog
  offsets and the evaluated models' offsets search: no other default index over the whole
  catalog is built (the tiny config evaluates with an exact one, tests/test_evaluation.py
  checks that an evaluation searches the index it is given)."""
  num_items = catalog_lib.load_catalog(os.path.join(pipeline_out, "dataset")).num_items
  assert _INDEX_BUILDS.count(("scann", num_items)) == 1, _INDEX_BUILDS


def test_the_final_method_is_evaluated_and_served_behind_the_novelty_gate(pipeline_out):
  with open(os.path.join(pipeline_out, "eval", "results.json")) as f:
    results = json.load(f)
  # On the tiny world every pattern-holdout seed set is novel, and about as few item-holdout
  # ones as the rule's 5 % of train queries.
  shares = results[novelty.JSON_KEY]["novel_share"]
  assert shares["pattern_holdout"] == 1.0 and shares["item_holdout"] <= 0.05, shares
  def ids(method, split):
    return np.load(os.path.join(pipeline_out, "eval", "retrieved", f"{method}_{split}.npz"))["ids"]
  ungated = "modit_hppo" + novelty.UNGATED_SUFFIX
  gated_rows = (ids("modit_hppo", "item_holdout") != ids(ungated, "item_holdout")).any(axis=1)
  assert gated_rows.mean() <= shares["item_holdout"]
  # Novel seed sets get the default fallback's answers: the reported baseline's own.
  fallback = results[novelty.JSON_KEY]["fallback"]
  assert fallback == "neighbourhood_offset"
  np.testing.assert_array_equal(ids("modit_hppo", "item_holdout")[gated_rows],
                                ids(fallback, "item_holdout")[gated_rows])
  np.testing.assert_array_equal(ids("modit_hppo", "pattern_holdout"),
                                ids(fallback, "pattern_holdout"))
  assert not np.array_equal(ids(ungated, "pattern_holdout"), ids(fallback, "pattern_holdout"))
  assert ungated in {r["method"] for r in results["records"]}
  # Both reports say what the gate did.
  for report_file in ("report.md", os.path.join("eval", "report.md")):
    text = open(os.path.join(pipeline_out, report_file)).read()
    assert ("Novelty gate (docs/novelty.md): `modit_hppo` answered" in text
            and f"(item_holdout {shares['item_holdout']:.1%}, pattern_holdout 100.0% of the "
                "seed sets)" in text
            and "hold a share of train items under" in text)
  # Serving reads the same gate back from the final run's guidance.json.
  served = retriever.Retriever.from_workdir(pipeline_out)
  knob = results["knobs"][fallback]
  np.testing.assert_allclose(served.gate.shifts,
                             [knob[d]["shift"] for d in served.catalog.domains])
  np.testing.assert_allclose(served.gate.offset_steps,
                             [knob[d]["step"] for d in served.catalog.domains])
  np.testing.assert_array_equal(served.gate.offset_sizes,
                                [knob[d]["neighbours"] for d in served.catalog.domains])
  model_alone = retriever.Retriever.from_workdir(pipeline_out, gate=False)
  assert model_alone.gate is None
  # The binary serves the same: a pattern-holdout seed set gets the fallback's answer with the
  # gate and the model's with --nogate.
  queries = served.catalog.queries["pattern_holdout"]
  seeds, domain = queries.seeds[0], served.catalog.domains[queries.domain[0]]
  def binary(*flags):
    proc = subprocess.run(
        [sys.executable, "-m", "modit_jax.cli.retrieve", f"--workdir={pipeline_out}",
         f"--domain={domain}", f"--seeds={','.join(map(str, seeds))}", "--k=10", *flags],
        cwd=_REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [int(line.split()[1]) for line in proc.stdout.strip().splitlines()[2:]]
  gated_ids, model_ids = served.retrieve(seeds, domain, k=10)[0], model_alone.retrieve(
      seeds, domain, k=10)[0]
  assert not np.array_equal(gated_ids, model_ids)
  np.testing.assert_array_equal(binary(), gated_ids)
  np.testing.assert_array_equal(binary("--nogate"), model_ids)


def test_pipeline_output_serves_and_reruns(pipeline_out):
  # A seed set of new raw embeddings (not in the catalog) is answered from OUT directly.
  served = retriever.Retriever.from_workdir(pipeline_out)
  rng = np.random.default_rng(0)
  new_items = rng.normal(size=(5, served.catalog.dim)).astype(np.float32)
  ids, scores = served.retrieve(new_items, served.catalog.domains[0], k=7)
  assert ids.shape == (7,) and np.all(np.diff(scores) <= 1e-6)

  # Re-running skips every finished run: no checkpoint is rewritten.
  def checkpoint_mtimes():
    return {name: os.path.getmtime(os.path.join(pipeline_out, name, "checkpoints"))
            for name in _fast_tiny_config().runs}
  before = checkpoint_mtimes()
  workflow.run_pipeline(_fast_tiny_config(), pipeline_out)
  assert checkpoint_mtimes() == before
  report = open(os.path.join(pipeline_out, "report.md")).read()
  assert "finished earlier, skipped" in report and "unchanged inputs, reused" in report


def test_a_finished_run_is_not_reused_for_another_config(pipeline_out):
  # A changed field of a finished run is refused, not answered with the old model.
  report = open(os.path.join(pipeline_out, "report.md")).read()
  config = _fast_tiny_config()
  config.runs.hppo.stage.hppo.beta = 300.0
  with pytest.raises(errors.UserError, match=r"hppo holds a run trained with another config or catalog "
                     r"\(hppo\.beta: 150\.0 -> 300\.0\)"):
    workflow.run_pipeline(config, pipeline_out)
  assert open(os.path.join(pipeline_out, "report.md")).read() == report


def test_pipeline_binary_refuses_bad_input_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "modit_jax.cli.pipeline", "--config=configs/pipeline.py:tiny",
       f"--workdir={tmp_path / 'out'}", f"--config.dataset={tmp_path / 'missing'}"],
      cwd=_REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error:")
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("binary,config,dataset_flag", [
    ("pipeline", "pipeline.py:tiny", "--config.dataset"),
    ("train", "hppo.py:tiny", "--dataset")])
def test_binaries_run_from_any_directory(tmp_path, binary, config, dataset_flag):
  """From outside the repository, with the config given by path, a binary loads its config
  (the pipeline's builds on its sibling files) and goes on to check its input."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the root is not on the path
  proc = subprocess.run(
      [sys.executable, "-m", f"modit_jax.cli.{binary}",
       f"--config={os.path.join(_REPO, 'configs', config)}", f"--workdir={tmp_path / 'out'}",
       f"{dataset_flag}={tmp_path / 'missing'}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path / 'missing'}: no such catalog directory")



def test_the_pipeline_fills_the_sizes_and_seed_a_run_leaves_to_it():
  """Every run gets the pipeline's sizes and seed, except those it sets itself (never
  overwritten without a word, as before the marks)."""
  config = pipeline_config.get_config("tiny")
  sizes = sizing.Sizes(seed_size=6, num_clusters=40, width=96, max_context=16,
                       target_scale=12.5, rules={})
  config.seed = 3
  config.runs.hppo.stage.model.width = 48   # as --config.runs.hppo.stage.model.width=48 would
  config.runs.hppo.stage.seed = 7
  sft = workflow.run_stage_config(config, "sft", sizes, "/o")
  assert (sft.num_clusters, sft.sft.context_size, sft.cpt.trajectory_length, sft.model.width,
          sft.model.max_context, sft.diffusion.target_scale, sft.seed) == (
              40, 6, 6, 96, 16, 12.5, 3)
  assert sft.init_from == os.path.join("/o", "cpt")
  hppo_run = workflow.run_stage_config(config, "hppo", sizes, "/o")
  assert (hppo_run.model.width, hppo_run.seed, hppo_run.num_clusters) == (48, 7, 40)
  assert config.runs.sft.stage.model.width == 0  # the pipeline's config stays as given


def test_runs_without_catalog_offsets_read_none_and_their_ablation_is_a_twin():
  """`catalog_offsets` off: no run reads the offset tokens, steps its anchor along them or
  has the `catalog_offset` candidates, so the ablation that leaves them out is HPPO's twin."""
  config = pipeline_config.get_config()
  assert "hppo_no_catalog_offset" not in workflow.twin_runs(config)
  changed = workflow.without_catalog_offsets(config)
  assert {"sft", "hppo", "sft_only", "hppo_no_catalog_offset"} <= set(changed)
  assert not {"pretrain", "cpt"} & set(changed)
  for run in config.runs.values():
    assert tuple(run.stage.model.catalog_offsets) == ()
    assert run.stage.diffusion.anchor_offset_step == 0.0
    if run.stage.stage == "hppo":
      assert "catalog_offset" not in run.stage.hppo.policies.split(",")
  assert workflow.twin_runs(config)["hppo_no_catalog_offset"] == "hppo"
  # Reading them again gives the tokens and the step back, but not the candidates an
  # ablation left out.
  ablation = config.runs.hppo_no_catalog_offset.stage
  training.set_catalog_offsets(ablation, True)
  assert tuple(ablation.model.catalog_offsets) == training.CATALOG_OFFSETS
  assert ablation.diffusion.anchor_offset_step == training.ANCHOR_OFFSET_STEP
  assert "catalog_offset" not in ablation.hppo.policies.split(",")


def test_the_catalog_offsets_rule_asks_the_validation_queries(tiny_world, monkeypatch):
  """"auto" reads the offsets where a step along them beats the seeds' mean on validation
  queries in most domains: on the tiny world with its own labels, not with random ones."""
  config = pipeline_config.get_config("tiny")
  cat = catalog_lib.load_catalog(tiny_world)
  for choice, read in (("on", True), ("off", False)):
    config.catalog_offsets = choice
    assert workflow.catalog_offsets_rule(config, cat) == (read, "set in the config")
  config.catalog_offsets = "auto"
  # The tiny world's patterns hold tens of items: the default 200-item offset crosses several
  # (its rule says no); a 50-item one is the scale the default's 200 is on the default world.
  monkeypatch.setattr(training, "CATALOG_OFFSETS", (50, 800))
  read, rule = workflow.catalog_offsets_rule(config, cat)
  assert read and "in 4 of 4 domains" in rule, rule
  rng = np.random.default_rng(0)
  random_labels = dataclasses.replace(
      cat, attributes=rng.random(cat.attributes.shape) < np.mean(cat.attributes, axis=0))
  read, rule = workflow.catalog_offsets_rule(config, random_labels)
  assert not read, rule
  config.catalog_offsets = "sometimes"
  with pytest.raises(errors.UserError, match="catalog_offsets must be one of"):
    workflow.catalog_offsets_rule(config, cat)


def test_ablations_run_on_the_generated_world_only_by_default():
  config = pipeline_config.get_config()
  assert config.ablations == "auto" and workflow.with_ablations(config)
  assert "cpt_random" in workflow.ordered_runs(config)
  config.dataset = "some/catalog"  # a given catalog: the four main runs
  assert not workflow.with_ablations(config)
  assert workflow.ordered_runs(config) == ["pretrain", "cpt", "sft", "hppo"]
  config.ablations = "all"
  assert "hppo_no_feedback" in workflow.ordered_runs(config)
  config.ablations = "yes"
  with pytest.raises(errors.UserError, match="ablations must be one of"):
    workflow.ordered_runs(config)


def test_ablations_that_would_train_the_main_run_again_are_left_out():
  config = pipeline_config.get_config()
  # By default HPPO builds no pool, so removing a policy that only enters pools changes nothing.
  twins = {f"hppo_no_{p}": "hppo" for p in hppo_lib.MODEL_POLICIES}
  assert workflow.twin_runs(config) == twins
  runs = workflow.ordered_runs(config)
  assert not set(twins) & set(runs)
  assert {"hppo_no_feedback", "hppo_no_neighbourhood", "cpt_random", "sft_only"} <= set(runs)
  # With pools after the regression every policy ablation trains something of its own.
  for run in config.runs.values():
    if run.stage.stage == "hppo":
      run.stage.hppo.regress_steps = run.stage.num_steps // 2
  assert workflow.twin_runs(config) == {}
  assert "hppo_no_policy" in workflow.ordered_runs(config)
  # Any other difference makes a run its own.
  config = pipeline_config.get_config()
  config.runs.hppo_no_policy.stage.learning_rate = 1e-3
  assert "hppo_no_policy" not in workflow.twin_runs(config)


def test_an_ablation_of_policies_that_won_no_target_is_not_trained_again(tmp_path, monkeypatch):
  """`workflow.target_twin`: judged from the main HPPO run's logged best shares."""
  config = pipeline_config.get_config()  # HPPO is the regression phase alone by default
  assert hppo_lib.regression_only(config.runs.hppo.stage)
  main = tmp_path / "hppo"
  main.mkdir()

  def log(**shares):
    records = [{"step": 0, **{hppo_lib.BEST_SHARE_KEY + p: v for p, v in shares.items()}},
               {"step": 20, "loss": 1.0}]
    (main / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  finished = {str(main): config.runs.hppo.stage.num_steps}
  monkeypatch.setattr(run_dir, "latest_step", lambda workdir: finished.get(workdir, 0))
  log(seed_centroid=0.0, tail_centroid=0.001, feedback=0.0, neighbourhood=0.999)
  workdirs = {"hppo": str(main)}
  assert workflow.target_twin(config, "hppo_no_seed_centroid", workdirs) == (
      "hppo", ["seed_centroid"])
  assert workflow.target_twin(config, "hppo_no_feedback", workdirs) == ("hppo", ["feedback"])
  for name in ("hppo_no_tail_centroid", "hppo_no_neighbourhood", "sft_only", "hppo"):
    assert workflow.target_twin(config, name, workdirs) is None, name
  # Not when the main run is unfinished, absent, or logged no share of the policy.
  assert workflow.target_twin(config, "hppo_no_seed_centroid", {}) is None
  finished.clear()
  assert workflow.target_twin(config, "hppo_no_seed_centroid", workdirs) is None
  finished[str(main)] = config.runs.hppo.stage.num_steps
  log(tail_centroid=0.001, neighbourhood=0.999)
  assert workflow.target_twin(config, "hppo_no_seed_centroid", workdirs) is None
  # Nor when the ablation differs otherwise, or builds pools (whose pairs read every policy).
  log(seed_centroid=0.0, neighbourhood=1.0)
  config.runs.hppo_no_seed_centroid.stage.learning_rate = 1e-3
  assert workflow.target_twin(config, "hppo_no_seed_centroid", workdirs) is None
  config = pipeline_config.get_config()
  for run in config.runs.values():
    if run.stage.stage == "hppo":
      run.stage.hppo.regress_steps = run.stage.num_steps // 2
  assert workflow.target_twin(config, "hppo_no_seed_centroid", workdirs) is None


def test_pipeline_config_errors(tmp_path):
  config = _fast_tiny_config(ablations=False)
  config.runs.sft.init_from = "nowhere"
  with pytest.raises(errors.UserError, match="unknown run 'nowhere'"):
    workflow.ordered_runs(config)
  config = _fast_tiny_config(ablations=False)
  config.runs.pretrain.init_from = "hppo"
  with pytest.raises(errors.UserError, match="cycle"):
    workflow.ordered_runs(config)
  config = _fast_tiny_config(ablations=False)
  config.dataset = str(tmp_path / "missing")
  with pytest.raises(errors.UserError):
    workflow.run_pipeline(config, str(tmp_path / "out"))
  config = _fast_tiny_config(ablations=False)
  config.model_dtype = "float16"
  with pytest.raises(errors.UserError, match="model_dtype must be empty or one of"):
    workflow.run_pipeline(config, str(tmp_path / "out_dtype"))
  assert not os.path.exists(tmp_path / "out_dtype")  # refused before any work
  # Without ablations, only the four main runs are trained, in dependency order.
  assert workflow.ordered_runs(_fast_tiny_config(ablations=False)) == [
      "pretrain", "cpt", "sft", "hppo"]


def test_pipeline_runs_on_a_converted_catalog(tmp_path, fast_compile):
  """Bring your own catalog: a converted table goes through the same pipeline."""
  del fast_compile
  from modit_jax import byo  # pylint: disable=g-import-not-at-top
  import test_byo  # pylint: disable=g-import-not-at-top  (its toy table)
  columns = test_byo.make_columns()
  ids = columns["item_id"]
  # Walks of 10 items within a pattern (rows are grouped by pattern in the toy table).
  rng = np.random.default_rng(1)
  seq = np.stack([ids[p * test_byo.PER + rng.choice(test_byo.PER, 10, replace=False)]
                  for p in rng.integers(0, test_byo.P, 200)])
  items = test_byo.write_npz(tmp_path / "items.npz", columns)
  sequences = test_byo.write_npz(tmp_path / "seq.npz", {"sequence": seq})
  options = byo.Options(attributes=test_byo.DOMAINS, seed_size=3, queries_per_cell=5)
  byo.convert(items, tmp_path / "dataset", options, sequences=sequences)

  config = _fast_tiny_config(ablations=False)
  config.dataset = str(tmp_path / "dataset")
  config.num_clusters, config.seed_size = 12, 3
  config.model_dtype = "bfloat16"  # the pipeline end to end in mixed precision
  config.evaluate.rerank_pool_grid = (20, 40)
  workflow.run_pipeline(config, str(tmp_path / "out"))
  with open(tmp_path / "out" / "eval" / "results.json") as f:
    methods = {r["method"] for r in json.load(f)["records"]}
  assert {"modit_hppo", "modit_sft", "rerank"} <= methods and "oracle_shift" not in methods
  # The catalog's seed-set size reaches the stages that depend on it.
  cpt_config = run_dir.read_run_config(str(tmp_path / "out" / "cpt"))[0]
  sft_config = run_dir.read_run_config(str(tmp_path / "out" / "sft"))[0]
  assert cpt_config.cpt.trajectory_length == 3 and sft_config.sft.context_size == 3
  assert cpt_config.model.dtype == sft_config.model.dtype == "bfloat16"
  report = open(tmp_path / "out" / "report.md").read()
  assert "oracle baselines skipped" in report
  assert not os.path.exists(tmp_path / "out" / "dataset")  # the given catalog is used in place


def test_results_tables_print_the_results_file(pipeline_out, tmp_path):
  results = os.path.join(pipeline_out, "eval", "results.json")
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "modit_jax.cli.results_tables", f"--results={results}", *args],
      cwd=_REPO, capture_output=True, text=True, timeout=300)
  proc = run("--methods=seed_centroid,modit_hppo", "--reference=modit_sft")
  assert proc.returncode == 0, proc.stderr
  with open(results) as f:
    records = json.load(f)["records"]
  hppo = [r for r in records if r["method"] == "modit_hppo"]
  # Every cell's mean is printed as the results file has it, in the order asked for.
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| modit_hppo |")]
  assert len(rows) == 3  # the Joint@20 table, the Purity@20 table, the significance counts
  for r in hppo:
    assert f"{r['joint@20']:.3f} [" in rows[0] and f"{r['purity@20']:.3f}" in rows[1]
  assert proc.stdout.index("| seed_centroid |") < proc.stdout.index("| modit_hppo |")
  proc = run("--methods=seed_centroid,no_such_method")
  assert proc.returncode == 2 and "has no method no_such_method" in proc.stderr
  bad = tmp_path / "bad.json"
  bad.write_text("{}")
  proc = subprocess.run([sys.executable, "-m", "modit_jax.cli.results_tables", f"--results={bad}"],
                        cwd=_REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "not an evaluation's results.json" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_results_summary_counts_each_split_as_the_evaluation_tested_it(pipeline_out):
  results = os.path.join(pipeline_out, "eval", "results.json")
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "modit_jax.cli.results_tables", *args],
      cwd=_REPO, capture_output=True, text=True, timeout=300)
  proc = run(f"--summary=first={results},second={results}", "--reference=modit_sft")
  assert proc.returncode == 0, proc.stderr
  rows = [line for line in proc.stdout.splitlines() if line.startswith(("| first ", "| second "))]
  assert len(rows) == 2 and rows[0][len("| first"):] == rows[1][len("| second"):]
  with open(results) as f:
    loaded = json.load(f)
  hppo = [r for r in loaded["records"] if r["method"] == "modit_hppo"]
  cells = rows[0].split(" | ")
  for column, split in ((1, "item_holdout"), (2, "pattern_holdout")):
    tests = [r["vs"]["modit_sft"] for r in hppo if r["split"] == split]
    gains = sum(t["significant_gain"] for t in tests)
    losses = sum(t["significant_loss"] for t in tests)
    mean = sum(t["diff"] for t in tests) / len(tests)
    assert cells[column] == f"{gains}+ {losses}− / {len(tests)} ({mean:+.3f})"
  shares = loaded["novelty_gate"]["novel_share"]
  assert f"{shares['item_holdout']:.0%} / {shares['pattern_holdout']:.0%}" in rows[0]
  # Bad input: a pair without a name, a method the file lacks, both modes at once.
  proc = run(f"--summary={results}")
  assert proc.returncode == 2 and "NAME=RESULTS_JSON" in proc.stderr
  proc = run(f"--summary=a={results}", "--summary_method=no_such_method")
  assert proc.returncode == 2 and "no no_such_method records" in proc.stderr
  proc = run(f"--summary=a={results}", f"--results={results}")
  assert proc.returncode == 2 and "either --results" in proc.stderr
  assert "Traceback" not in proc.stderr
