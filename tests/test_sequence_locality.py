"""How local raw sequences are, and stage 1's choice of sequences that follows from it."""

import dataclasses

import numpy as np
import pytest

from modit_jax import catalog as catalog_lib
from modit_jax import data
from modit_jax import errors
from modit_jax import sequence_locality
from modit_jax import training
from modit_jax.stages import pretrain


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
  assert "may not stay in the seeds' pattern" in shuffled.line()
  assert "may not stay" not in walks.line()
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


# ----------------------------------------------------------------------------- stage 1's choice


def test_neighbour_walks_step_to_near_train_items_deterministically(catalog):
  train = catalog.train_items()
  walks = data.neighbour_walks(catalog.embeddings, train, 3, 6, 10_000, seed=0)
  assert walks.shape == (len(train), 6) and walks.dtype == np.int32
  assert np.isin(walks, train).all()  # held-out items never enter stage 1
  np.testing.assert_array_equal(walks[:, 0], train)  # one walk from each train item
  np.testing.assert_array_equal(walks, data.neighbour_walks(catalog.embeddings, train, 3, 6,
                                                            10_000, seed=0))
  assert not np.array_equal(walks, data.neighbour_walks(catalog.embeddings, train, 3, 6, 10_000,
                                                        seed=1))
  # Each step lands on one of the current item's 3 nearest other train items.
  emb = np.asarray(catalog.embeddings)[train]
  scores = emb @ emb.T
  np.fill_diagonal(scores, -np.inf)
  rank_of = {item: row for row, item in enumerate(train)}
  for a, b in zip(walks[:50, 2], walks[:50, 3]):
    nearest = train[np.argsort(-scores[rank_of[a]])[:3]]
    assert b in nearest
  sampled = data.neighbour_walks(catalog.embeddings, train, 3, 6, 7, seed=0)
  assert sampled.shape == (7, 6)  # at most max_walks walks


def _stage_config(mode):
  config = training.default_config("tiny")
  config.pretrain.sequences = mode
  return config


def test_auto_walks_only_without_raw_sequences_and_walks_mode_always_walks(catalog):
  shuffled = _shuffled(catalog)
  # Raw sequences are kept, local or not (walks did not help on the catalog measured).
  for given in (catalog, shuffled):
    raw, line = pretrain.stage_sequences(_stage_config("auto"), given)
    np.testing.assert_array_equal(raw, given.sequences)
    assert "raw sequences" in line
  none = dataclasses.replace(catalog, sequences=np.full((0, 4), -1, np.int32))
  walks, line = pretrain.stage_sequences(_stage_config("auto"), none)
  assert walks.shape[1] == pretrain.WALK_LENGTH and "no raw sequences" in line
  # The walks are local where the shuffled sequences are not.
  walked = sequence_locality.measure(dataclasses.replace(shuffled, sequences=walks))
  assert walked.locality > 0.5
  walks, line = pretrain.stage_sequences(_stage_config("walks"), catalog)
  assert "pretrain.sequences=walks" in line and np.isin(walks, catalog.train_items()).all()
  np.testing.assert_array_equal(pretrain.stage_sequences(_stage_config("raw"), shuffled)[0],
                                shuffled.sequences)


def test_stage_1_trains_on_a_catalog_without_sequences(tiny_world, tmp_path, fast_compile):
  del fast_compile
  bare = tmp_path / "bare"
  loaded = catalog_lib.load_catalog(tiny_world)
  catalog_lib.write_catalog(bare, dataclasses.replace(
      loaded, sequences=np.full((0, loaded.sequences.shape[1]), -1, np.int32)))
  config = _stage_config("auto")
  config.num_steps, config.warmup_steps = 4, 0
  state = training.train(config, str(bare), str(tmp_path / "run"))
  assert int(state.step) == 4
  # Asked for the raw sequences it has none of: the promised error, no traceback's worth.
  config = _stage_config("raw")
  with pytest.raises(errors.UserError, match="stage 1 needs raw sequences"):
    training.train(config, str(bare), str(tmp_path / "raw"))
  with pytest.raises(errors.UserError, match="pretrain.sequences must be one of"):
    training.train(_stage_config("sessions"), str(bare), str(tmp_path / "bad"))
