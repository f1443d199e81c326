"""The pipeline's sizes follow from the catalog (modit_jax/sizing.py, docs/sizing.md)."""

import json
import math
import os

import numpy as np
import pytest

from configs import pipeline as pipeline_config
from configs import synthetic as synthetic_config
from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import run_dir
from modit_jax import sizing
from modit_jax import synthetic
from modit_jax import workflow


@pytest.fixture(scope="module")
def text_shaped_catalog(tmp_path_factory):
  """A tiny catalog shaped like a text-encoder one: 384-d, 5-item seed sets."""
  config = synthetic_config.get_config("tiny")
  config.dim = 384
  config.seed_size = 5
  config.num_local_axes = 6
  path = str(tmp_path_factory.mktemp("text_shaped") / "dataset")
  synthetic.write_world(config, path)
  return path


def test_width_rule():
  assert [sizing.model_width(d) for d in (16, 64, 192, 384, 768, 1024, 4096)] == [
      64, 64, 64, 128, 256, 352, 512]


def test_cluster_rule():
  # One cluster per 10 seed sets of train items, and at least 2.
  assert sizing.num_latent_clusters(68_000, 8) == 850
  assert sizing.num_latent_clusters(10_000, 5) == 200
  assert sizing.num_latent_clusters(3_000, 5) == 60
  assert sizing.num_latent_clusters(60, 5) == 2


def test_sizes_follow_the_text_shaped_catalog(text_shaped_catalog):
  catalog = catalog_lib.load_catalog(text_shaped_catalog)
  sizes = sizing.choose(catalog)
  num_train = len(catalog.train_items())
  assert sizes.seed_size == 5
  assert sizes.width == 128
  assert sizes.max_context == 16
  assert sizes.num_clusters == sizing.num_latent_clusters(num_train, 5)
  # The target scale gives a seed set's spread unit per-coordinate scale: sqrt(d) / spread.
  seeds = np.asarray(catalog.embeddings)[catalog.queries["train"].seeds]
  spread = np.sqrt(((seeds - seeds.mean(1, keepdims=True)) ** 2).sum(-1).mean() * 5 / 4)
  assert sizes.target_scale == pytest.approx(math.sqrt(384) / spread, rel=1e-5)
  # Every size has its rule, and the printed lines name them.
  assert set(sizes.rules) == {"seed_size", "num_clusters", "width", "max_context",
                              "target_scale"}
  assert any(line.startswith("width = 128 (d 384 / 3") for line in sizes.lines())
  # A value set in the config wins over its rule.
  forced = sizing.choose(catalog, seed_size=5, num_clusters=7, width=96)
  assert (forced.num_clusters, forced.width) == (7, 96)
  assert forced.rules["width"] == "set in the config"


def test_sizes_never_read_the_truth(text_shaped_catalog):
  # The patterns and their count can change without changing any size.
  catalog = catalog_lib.load_catalog(text_shaped_catalog)
  other = catalog_lib.Catalog(**{**catalog.__dict__,
                                 "patterns": catalog.patterns[::-1].copy(),
                                 "manifest": {**catalog.manifest, "num_patterns": 1}})
  assert sizing.choose(other) == sizing.choose(catalog)


def test_too_small_catalog_is_refused(text_shaped_catalog):
  catalog = catalog_lib.load_catalog(text_shaped_catalog)
  with pytest.raises(errors.UserError, match="train items"):
    sizing.choose(catalog, seed_size=10_000)


def test_pipeline_applies_the_sizes(text_shaped_catalog, tmp_path, fast_compile):
  """The pipeline with no size set trains every run at the catalog's sizes and records them."""
  del fast_compile
  config = pipeline_config.get_config("tiny,no_ablations")
  config.dataset = text_shaped_catalog
  config.num_clusters = 0  # the tiny variant fixes these two; here the rules choose
  config.model_width = 0
  for name in list(config.runs):
    if name not in ("pretrain", "cpt", "sft"):
      del config.runs[name]
    else:
      config.runs[name].stage.num_steps = 8  # wiring, not quality
      config.runs[name].stage.warmup_steps = 4
  config.final_run = "sft"
  config.evaluate.methods = "seed_centroid"
  config.evaluate.guidance_grid = (1.0,)
  config.evaluate.num_resamples = 50
  out = str(tmp_path)
  workflow.run_pipeline(config, out)
  with open(os.path.join(out, workflow.SIZES_FILE)) as f:
    recorded = json.load(f)
  assert (recorded["seed_size"], recorded["width"]) == (5, 128)
  for name in ("pretrain", "cpt", "sft"):
    run, dim, _ = run_dir.read_run_config(os.path.join(out, name))
    assert dim == 384
    assert run.model.width == 128
    assert run.num_clusters == recorded["num_clusters"]
    assert run.sft.context_size == 5 and run.cpt.trajectory_length == 5
    assert run.diffusion.target_scale == pytest.approx(recorded["target_scale"])
  # The catalog-offsets rule's answer is recorded with its reason, and the runs follow it.
  assert "beats the seeds' mean in" in recorded["rules"]["catalog_offsets"]
  sft, _, _ = run_dir.read_run_config(os.path.join(out, "sft"))
  assert bool(len(sft.model.catalog_offsets)) == recorded["catalog_offsets"]
  assert (sft.diffusion.anchor_offset_step > 0) == recorded["catalog_offsets"]
  report_text = open(os.path.join(out, "report.md")).read()
  assert "width = 128" in report_text and "catalog_offsets = " in report_text
