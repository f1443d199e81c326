"""The real development catalog's builder (modit_jax/music_catalog.py) and its text encoder."""

import json
import os

import numpy as np
import pytest

from modit_jax import byo
from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import music_catalog

pytest.importorskip("music21", reason="the real-catalog extra is not installed")
pytest.importorskip("onnxruntime", reason="the real-catalog extra is not installed")


def test_book_sequences_follow_each_book_in_order():
  works = {"item_id": np.array(["a", "b", "c", "d", "e", "f"]),
           "book": np.array(["x", "y", "x", "x", "z", "y"]),
           "number": np.array([3, 1, 1, 2, 1, 2])}
  rows = music_catalog.book_sequences(works, length=2)
  # Book x in its order (c, d, a) in rows of 2; y (b, f); z has one work and gives nothing;
  # a row left with a single work has no next item and is dropped.
  assert rows.tolist() == [["c", "d"], ["b", "f"]]
  assert music_catalog.book_sequences(works, length=4).tolist() == [
      ["c", "d", "a", ""], ["b", "f", "", ""]]


def test_encoder_is_deterministic_and_semantic():
  from modit_jax import text_encoder  # pylint: disable=g-import-not-at-top
  encoder = text_encoder.TextEncoder(num_threads=1)
  texts = ["The Irish washerwoman, a jig", "An Irish jig for the fiddle",
           "Mass for four voices", "Kyrie of a Renaissance mass"]
  a = encoder.encode(texts)
  assert a.shape == (4, text_encoder.DIM) and a.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
  # The same texts in another order and batching give the same rows.
  b = encoder.encode(texts[::-1], batch_size=3)[::-1]
  np.testing.assert_allclose(a, b, atol=1e-5)
  sim = a @ a.T
  assert sim[0, 1] > max(sim[0, 2], sim[0, 3]) and sim[2, 3] > max(sim[2, 0], sim[2, 1])
  with pytest.raises(errors.UserError, match="non-empty"):
    encoder.encode(["a title", " "])


def test_build_a_small_music_catalog(tmp_path):
  options = music_catalog.default_options()
  options.max_works = 1200
  options.num_patterns = 12
  options.queries_per_cell = 20
  out, cache = str(tmp_path / "dataset"), str(tmp_path / "cache")
  catalog = music_catalog.build(out, cache, options)
  loaded = catalog_lib.load_catalog(out)
  assert loaded.num_items == 1200 and loaded.dim == 384
  assert loaded.domains == list(music_catalog.DOMAINS) and loaded.seed_size == 5
  assert loaded.manifest["patterns"]["source"] == "derived"
  assert len(loaded.sequences) > 0
  # The texts are kept beside the catalog, row for row (text_catalog.convert).
  np.testing.assert_array_equal(np.load(os.path.join(out, "texts.npy")),
                                music_catalog.read_works(1200)["text"])
  # Labels come from the scores: every domain has positives and negatives.
  rates = loaded.attributes.mean(axis=0)
  assert np.all((rates > 0.05) & (rates < 0.95))
  # The observed labels are a sparse share of train labels only.
  assert not loaded.observed[loaded.item_split != 0].any()
  assert 0.05 < loaded.observed[loaded.item_split == 0].mean() < 0.15
  # Built again with the same options: reused, and the embeddings come from the cache.
  assert len(os.listdir(cache)) == 1
  again = music_catalog.build(out, cache, options)
  np.testing.assert_array_equal(again.embeddings, catalog.embeddings)
  with open(os.path.join(out, music_catalog.SOURCE_FILE)) as f:
    assert json.load(f)["options"]["max_works"] == 1200
  options.num_patterns = 13
  with pytest.raises(errors.UserError, match="other options"):
    music_catalog.build(out, cache, options)
  # A catalog built elsewhere from the cached embeddings is byte-identical (seeded).
  options.num_patterns = 12
  other = music_catalog.build(str(tmp_path / "again"), cache, options)
  np.testing.assert_array_equal(other.patterns, catalog.patterns)
  np.testing.assert_array_equal(other.queries["train"].seeds, catalog.queries["train"].seeds)
  assert "seed centroid" in byo.sanity_table(loaded)
