"""How local raw sequences are: walks inside patterns score high, shuffled ones near 0."""

import dataclasses

import numpy as np
import pytest

from modit_jax import catalog as catalog_lib
from modit_jax import sequence_locality


@pytest.fixture(scope="module")
def catalog(tiny_world):
  return catalog_lib.load_catalog(tiny_world)


def _shuffled(catalog, seed=0):
  """The catalog with every sequence slot refilled by a random train item (same padding)."""
  sequences = np.asarray(catalog.sequences).copy()
  real = sequences >= 0
  sequences[real] = np.random.default_rng(seed).choice(catalog.train_items(), real.sum())
  return dataclasses.replace(catalog, sequences=sequences)


def test_walks_inside_patterns_are_local_and_shuffled_sequences_are_not(catalog):
  walks = sequence_locality.measure(catalog)
  shuffled = sequence_locality.measure(_shuffled(catalog))
  assert walks.locality > 0.5 and not walks.low
  assert abs(shuffled.locality) < 0.1 and shuffled.low
  assert "will not stay in the seeds' pattern" in shuffled.line()
  assert "will not stay" not in walks.line()
  # Both compare against the same random pairs (seeded): only the sequences differ.
  assert shuffled.random_cosine == walks.random_cosine
  assert shuffled.num_pairs == walks.num_pairs


def test_sampling_many_pairs_is_seeded_and_close_to_all_pairs(catalog, monkeypatch):
  every = sequence_locality.measure(catalog)
  monkeypatch.setattr(sequence_locality, "MAX_PAIRS", max(every.num_pairs // 4, 2))
  sampled = sequence_locality.measure(catalog)
  assert sampled == sequence_locality.measure(catalog)  # seeded
  assert sampled.consecutive_cosine == pytest.approx(every.consecutive_cosine, abs=0.05)


def test_no_consecutive_pair_gives_none(catalog):
  sequences = np.full((3, 4), -1, np.int32)
  sequences[:, 0] = catalog.train_items()[:3]  # single items: no next item anywhere
  assert sequence_locality.measure(dataclasses.replace(catalog, sequences=sequences)) is None
