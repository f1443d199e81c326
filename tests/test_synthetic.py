"""The synthetic world: deterministic, chunk-invariant, with the structure DESIGN.md §4 asks."""

import filecmp
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import synthetic as synthetic_config
from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import synthetic

_FILES = ("manifest.json", "embeddings.npy", "patterns.npy", "attributes.npy", "observed.npy",
          "item_split.npy", "sequences.npy", "attribute_directions.npy",
          "queries_train.npz", "queries_item_holdout.npz", "queries_pattern_holdout.npz")


@pytest.fixture(scope="module")
def tiny_dir(tiny_world):
  return tiny_world


def _same_files(a, b, names=_FILES):
  return [n for n in names if not filecmp.cmp(os.path.join(a, n), os.path.join(b, n),
                                              shallow=False)]


def test_same_config_gives_byte_equal_files(tiny_dir, tmp_path):
  synthetic.write_world(synthetic_config.get_config("tiny"), tmp_path)
  assert _same_files(tiny_dir, tmp_path) == []


def test_other_seed_gives_other_world(tiny_dir, tmp_path):
  config = synthetic_config.get_config("tiny")
  config.seed = 1
  synthetic.write_world(config, tmp_path)
  assert "embeddings.npy" in _same_files(tiny_dir, tmp_path)


def test_chunking_does_not_change_the_items(tiny_dir, tmp_path):
  config = synthetic_config.get_config("tiny")
  config.topics_per_chunk = 1
  synthetic.write_world(config, tmp_path)
  # The manifest records the generator config (and so the chunk size); everything else is equal.
  assert _same_files(tiny_dir, tmp_path, _FILES[1:]) == []


def test_world_loads_and_has_the_promised_structure(tiny_dir):
  config = synthetic_config.get_config("tiny")
  cat = catalog_lib.load_catalog(tiny_dir)
  num_patterns = config.num_topics * config.patterns_per_topic
  assert cat.num_items == num_patterns * config.items_per_pattern
  assert cat.attribute_directions.shape == (len(config.domains), num_patterns, config.dim)
  # Positive rate per pattern and domain lies in the configured range.
  rates = cat.attributes.reshape(num_patterns, config.items_per_pattern, -1).mean(axis=1)
  lo, hi = config.positive_rate
  assert rates.min() >= lo - 1 / config.items_per_pattern
  assert rates.max() <= hi + 1 / config.items_per_pattern
  # Positives are the top of their pattern along the true direction.
  emb = cat.embeddings.reshape(num_patterns, config.items_per_pattern, -1)
  for p in range(0, num_patterns, 7):
    for m in range(cat.num_domains):
      along = (emb[p] - emb[p].mean(0)) @ cat.attribute_directions[m, p]
      pos = cat.attributes[p * config.items_per_pattern:(p + 1) * config.items_per_pattern, m]
      assert along[pos].min() > along[~pos].max()
  # Seeds sit in the low-attribute part and in the split their protocol says.
  for split, code in catalog_lib.SPLIT_CODES.items():
    q = cat.queries[split]
    assert len(q) > 0
    assert np.all(cat.item_split[q.seeds] == code)
    assert not cat.attributes[q.seeds, q.domain[:, None]].any()
  # Observed labels: only train items, about the configured fraction.
  train = cat.item_split == 0
  assert not cat.observed[~train].any()
  assert abs(cat.observed[train].mean() - config.observed_fraction) < 0.03
  # Sequences walk over train items only.
  seq = cat.sequences[cat.sequences >= 0]
  assert np.all(cat.item_split[seq] == 0)


def _nearest_neighbour_in_pattern(world_dir) -> float:
  """The share of items whose nearest other item is of their own pattern."""
  cat = catalog_lib.load_catalog(world_dir)
  emb = np.asarray(cat.embeddings, np.float32)
  sims = emb @ emb.T
  np.fill_diagonal(sims, -np.inf)
  return float(np.mean(cat.patterns[sims.argmax(1)] == cat.patterns))


def test_diffuse_variant_makes_sibling_patterns_overlap(tiny_dir, tmp_path):
  # The default construction separates patterns completely; `diffuse` (the novelty gate's
  # stress world) must not, or it would test nothing the default world does not.
  config = synthetic_config.get_config("tiny,diffuse")
  config.check_properties = False
  synthetic.write_world(config, tmp_path)
  assert _nearest_neighbour_in_pattern(tiny_dir) == 1.0
  assert _nearest_neighbour_in_pattern(tmp_path) < 0.7
  default = synthetic_config.get_config()
  assert synthetic_config.get_config("diffuse").num_topics == default.num_topics
  with pytest.raises(ValueError, match="choose one size"):
    synthetic_config.get_config("tiny,large,diffuse")


def test_bad_config_is_refused():
  config = synthetic_config.get_config("tiny")
  config.alpha = (0.5,)
  with pytest.raises(errors.UserError, match="alpha"):
    synthetic.make_axes(config)


def _run(args, cwd):
  return subprocess.run([sys.executable, "-m", "modit_jax.cli.make_dataset", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_make_dataset_binary_prints_the_property_table(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = _run(["--config=configs/synthetic.py:tiny", f"--out={tmp_path}"], repo)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in ("1. seed centroid", "2. global attribute", "3. Bound@20", "4. a global shift"):
    assert name in proc.stdout
  assert os.path.isfile(tmp_path / "properties.md")


def test_make_dataset_binary_refuses_bad_config_without_traceback(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = _run(["--config=configs/synthetic.py:tiny", "--config.alpha=(0.5,)",
               f"--out={tmp_path}"], repo)
  assert proc.returncode == 2
  assert "error: synthetic config: `alpha`" in proc.stderr
  assert "Traceback" not in proc.stderr
