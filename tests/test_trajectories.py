"""Stage 2 and 3 batches: density order, tail-centroid targets, determinism, no label leaks."""

import dataclasses

import numpy as np
import pytest

from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import metric_predictor
from modit_jax import trajectories

_CLUSTERS = 26  # as test_clusters: the jitted k-means is then compiled once per session
_LENGTH = 6


def _predictor_config():
  config = metric_predictor.default_config()
  config.num_steps = 100  # the ordering logic is under test, not the predictor's quality
  config.hidden = (32,)
  return config


def _build(catalog):
  return trajectories.build_source(catalog, _CLUSTERS, cluster_seed=0,
                                   predictor_config=_predictor_config())[0]


@pytest.fixture(scope="module")
def cat(tiny_world):
  return catalog_lib.load_catalog(tiny_world)


@pytest.fixture(scope="module")
def source(cat):
  return _build(cat)


def _rows(source):
  """Item id -> row of the source (-1 for items outside it)."""
  row = np.full(len(source.embeddings), -1)
  row[source.train_items] = np.arange(len(source.train_items))
  return row


def _cpt(source, order="metric", seed=0):
  return trajectories.MetricOrderedTrajectories(source, _LENGTH, order, source.num_domains, seed)


def _sft(source, seed=0, **kwargs):
  args = dict(context_size=8, tail_fraction=0.2, low_fraction=0.6)
  args.update(kwargs)
  return trajectories.TailCentroidTargets(source, null_domain=source.num_domains, seed=seed,
                                          **args)


def _hand_source(sizes, dim=4, seed=0):
  """A source with clusters of `sizes`; density for domain 0 = id, domain 1 = -id."""
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  emb = rng.normal(size=(n + 5, dim)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  items = np.arange(5, n + 5)  # ids 0..4 are "held out": never in the source
  assign = np.repeat(np.arange(len(sizes)), sizes)
  density = np.stack([items, -items], axis=1).astype(np.float32)
  return trajectories.TrajectorySource(items, assign, density, emb)


def test_metric_trajectories_climb_density_within_one_cluster(cat, source):
  row = _rows(source)
  ids = _cpt(source).ids(step=5, batch_size=64)
  batch = _cpt(source)(5, 64)
  assert batch["context"].shape == (64, _LENGTH, cat.dim)
  assert batch["context"].dtype == np.float32 and batch["target"].dtype == np.float32
  assert batch["context_mask"].dtype == bool and batch["domain"].dtype == np.int32
  np.testing.assert_array_equal(batch["domain"], ids["domain"])
  assert set(ids["domain"].tolist()) == set(range(cat.num_domains))
  for b in range(64):
    traj = ids["trajectory"][b]
    traj = traj[traj >= 0]
    c, m, j = ids["cluster"][b], ids["domain"][b], ids["num_context"][b]
    assert len(traj) == min(_LENGTH + 1, source.sizes[c])
    assert len(set(traj.tolist())) == len(traj)
    assert np.all(cat.item_split[traj] == 0)  # train items only
    assert np.all(source.assign[row[traj]] == c)  # one cluster
    assert np.all(np.diff(source.density[row[traj], m]) >= 0)  # ascending density for m
    assert 1 <= j <= len(traj) - 1
    np.testing.assert_array_equal(ids["context_ids"][b][:j], traj[:j])
    assert np.all(ids["context_ids"][b][j:] == -1)
    assert ids["target_id"][b] == traj[j]  # the next item of the ordered trajectory
    # The batch holds exactly these items' embeddings.
    np.testing.assert_array_equal(batch["context_mask"][b], np.arange(_LENGTH) < j)
    np.testing.assert_array_equal(batch["context"][b][:j], cat.embeddings[traj[:j]])
    assert np.all(batch["context"][b][j:] == 0) and not np.signbit(batch["context"][b][j:]).any()
    np.testing.assert_array_equal(batch["target"][b], cat.embeddings[traj[j]])


def test_orders_share_everything_but_the_order(source):
  ids = {order: _cpt(source, order).ids(7, 64) for order in trajectories.ORDERS}
  for key in ("domain", "cluster", "num_context"):
    np.testing.assert_array_equal(ids["random"][key], ids["metric"][key])
    np.testing.assert_array_equal(ids["reversed"][key], ids["metric"][key])
  row = _rows(source)
  unsorted = 0
  for b in range(64):
    m = ids["metric"]["domain"][b]
    sets = {o: ids[o]["trajectory"][b][ids[o]["trajectory"][b] >= 0] for o in ids}
    assert sorted(sets["random"]) == sorted(sets["metric"]) == sorted(sets["reversed"])
    np.testing.assert_array_equal(sets["reversed"], sets["metric"][::-1])
    assert np.all(np.diff(source.density[row[sets["reversed"]], m]) <= 0)  # descending
    unsorted += np.any(np.diff(source.density[row[sets["random"]], m]) < 0)
  assert unsorted > 32  # shuffled, not sorted


def test_prefix_lengths_span_one_to_length(source):
  ids = _cpt(source).ids(0, 512)
  full = source.sizes[ids["cluster"]] > _LENGTH
  assert set(ids["num_context"][full].tolist()) == set(range(1, _LENGTH + 1))


def test_tail_centroid_is_the_mean_of_exactly_the_top_tail(cat, source):
  sft = _sft(source)
  ids = sft.ids(3, 48)
  batch = sft(3, 48)
  np.testing.assert_array_equal(batch["domain"], ids["domain"])
  assert batch["context"].shape == (48, 8, cat.dim) and batch["context_mask"].all()
  for b in range(48):
    c, m = ids["cluster"][b], ids["domain"][b]
    # Brute force, independent of the source's bookkeeping: the cluster's items ranked by
    # density for m (ties by id), top ceil(0.2 s) are the tail.
    members = source.train_items[source.assign == c]
    dens = source.density[source.assign == c, m]
    ranked = members[np.lexsort((members, dens))]
    n_tail = max(1, int(np.ceil(0.2 * len(members) - 1e-9)))
    tail = ranked[-n_tail:]
    expected = cat.embeddings[tail].astype(np.float64).mean(0)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(batch["target"][b], expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(batch["target"][b]), 1, atol=1e-6)
    assert sorted(trajectories.tail_items(source, c, m, 0.2)) == sorted(tail)
    # One more or one fewer item would be a different target.
    for other in (ranked[-n_tail - 1:], ranked[-n_tail + 1:]):
      if 0 < len(other) <= len(ranked):
        wrong = cat.embeddings[other].astype(np.float64).mean(0)
        assert not np.allclose(batch["target"][b], wrong / np.linalg.norm(wrong), atol=1e-6)
    # The context comes from the low part (bottom 60 %), never from the tail, all distinct.
    low = ranked[:int(np.ceil(0.6 * len(members) - 1e-9))]
    ctx = ids["context_ids"][b]
    assert np.isin(ctx, low).all() and not np.isin(ctx, tail).any()
    assert np.all(cat.item_split[ctx] == 0)
    assert len(set(ctx.tolist())) == 8
    np.testing.assert_array_equal(batch["context"][b], cat.embeddings[ctx])
    np.testing.assert_array_equal(sft.tail_centroid(c, m), batch["target"][b])


def test_small_clusters_and_metric_context_order():
  src = _hand_source([3, 10])
  # Cluster 0 (3 items): tail 1 (the top one), low part cut short of it: 2 items, used once
  # each and the rest drawn with replacement.
  assert trajectories.tail_count(3, 0.2) == 1 and trajectories.low_count(3, 0.6, 0.2) == 2
  assert trajectories.tail_count(10, 0.3) == 3 and trajectories.tail_count(30, 0.1) == 3
  np.testing.assert_array_equal(trajectories.tail_items(src, 1, 0, 0.3), [15, 16, 17])
  np.testing.assert_array_equal(trajectories.tail_items(src, 1, 1, 0.3), [10, 9, 8])
  np.testing.assert_array_equal(trajectories.low_items(src, 0, 0, 0.6, 0.2), [5, 6])
  sft = _sft(src, context_size=5, context_order="metric")
  ids = sft.ids(0, 64)
  for b in range(64):
    c, m = ids["cluster"][b], ids["domain"][b]
    ctx = ids["context_ids"][b]
    low = trajectories.low_items(src, c, m, 0.6, 0.2)
    assert np.isin(ctx, low).all()
    if c == 0:
      assert set(ctx.tolist()) == set(low.tolist())  # every low item at least once
    dens = src.density[ctx - 5, m]
    assert np.all(np.diff(dens) >= 0)  # "metric" context order: ascending density
  # Cluster sampling by size: cluster 1 (10 items) about 10 / 13 of the time.
  clusters_drawn = _sft(src).ids(1, 2000)["cluster"]
  assert abs(np.mean(clusters_drawn == 1) - 10 / 13) < 0.04
  # A trajectory of a 3-item cluster holds all 3 items.
  cpt = trajectories.MetricOrderedTrajectories(src, 4, "metric", 2, 0).ids(0, 64)
  small = cpt["cluster"] == 0
  np.testing.assert_array_equal(cpt["trajectory"][small][:, :3],
                                np.where(cpt["domain"][small, None] == 0, [5, 6, 7], [7, 6, 5]))
  assert np.all(cpt["trajectory"][small][:, 3:] == -1)


@pytest.mark.parametrize("make", ["cpt", "sft"])
def test_batches_are_a_pure_function_of_the_step(source, make):
  build = _cpt if make == "cpt" else _sft
  batches = build(source)
  a, b = batches(11, 32), build(source)(11, 32)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(batches(12, 32)["target"], a["target"])
  assert not np.array_equal(build(source, seed=1)(11, 32)["target"], a["target"])
  parts = [batches(11, 32, i, 4) for i in range(4)]
  for key in a:
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), a[key])
  with pytest.raises(errors.UserError, match="not divisible"):
    batches(11, 30, 0, 4)


def test_hidden_labels_patterns_and_heldout_items_never_reach_a_batch(cat, source):
  rng = np.random.default_rng(123)
  observed = np.asarray(cat.observed)
  heldout = np.asarray(cat.item_split) != 0
  assert not observed[heldout].any()
  # Every label training may not read is flipped (held-out items have none observed), and the
  # ground-truth patterns are shuffled.
  poisoned = dataclasses.replace(
      cat, attributes=np.where(observed, cat.attributes, ~np.asarray(cat.attributes)),
      patterns=rng.permutation(np.asarray(cat.patterns)))
  assert (poisoned.attributes != cat.attributes).mean() > 0.5
  # Held-out items moved to random places on the sphere.
  emb = np.array(cat.embeddings)
  noise = rng.normal(size=(heldout.sum(), cat.dim)).astype(np.float32)
  emb[heldout] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
  moved = dataclasses.replace(cat, embeddings=emb)

  for other in (_build(poisoned), _build(moved)):
    assert other.density.tobytes() == source.density.tobytes()
    assert other.assign.tobytes() == source.assign.tobytes()
    for make in (lambda s: _cpt(s, "metric"), lambda s: _cpt(s, "random"), _sft):
      for step in (0, 9):
        a, b = make(source)(step, 32), make(other)(step, 32)
        assert a.keys() == b.keys()
        for key in a:
          assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
  # The check is not vacuous: flipping the labels training may read does change the batches.
  flipped = dataclasses.replace(
      cat, attributes=np.where(observed, ~np.asarray(cat.attributes), cat.attributes))
  other = _build(flipped)
  assert other.density.tobytes() != source.density.tobytes()
  assert _cpt(other)(0, 32)["target"].tobytes() != _cpt(source)(0, 32)["target"].tobytes()


def test_refuses_bad_parameters(source):
  m = source.num_domains
  cases = [
      (lambda: trajectories.MetricOrderedTrajectories(source, 1, "metric", m, 0), "length"),
      (lambda: trajectories.MetricOrderedTrajectories(source, 4, "sorted", m, 0), "order"),
      (lambda: trajectories.MetricOrderedTrajectories(source, 4, "metric", m + 1, 0),
       "null_domain"),
      (lambda: _sft(source, tail_fraction=0.0), "tail_fraction"),
      (lambda: _sft(source, tail_fraction=1.5), "tail_fraction"),
      (lambda: _sft(source, low_fraction=float("nan")), "low_fraction"),
      (lambda: _sft(source, low_fraction=-0.1), "low_fraction"),
      (lambda: _sft(source, context_size=0), "context_size"),
      (lambda: _sft(source, context_order="sorted"), "context order"),
      (lambda: trajectories.tail_items(source, 0, 0, 2.0), "tail_fraction"),
      (lambda: trajectories.TrajectorySource(source.train_items, source.assign[:-1],
                                             source.density, source.embeddings), "assign"),
      (lambda: trajectories.TrajectorySource(source.train_items, source.assign,
                                             source.density[:, 0], source.embeddings),
       "density"),
      (lambda: trajectories.TrajectorySource(np.arange(4), np.arange(4), np.zeros((4, 2)),
                                             source.embeddings), "2 or more"),
      (lambda: trajectories.TrajectorySource(np.array([0, 0]), np.zeros(2, int),
                                             np.zeros((2, 2)), source.embeddings), "duplicate"),
  ]
  for make, match in cases:
    with pytest.raises(errors.UserError, match=match):
      make()


def test_refuses_too_many_clusters(cat):
  with pytest.raises(errors.UserError, match="latent clusters"):
    # Refused before the predictor trains, not after.
    trajectories.build_source(cat, len(cat.train_items()) + 1, 0, _predictor_config())


def test_training_data_never_reads_patterns_or_hidden_labels(cat):
  """Scrambled patterns (their count too) and flipped unobserved labels: the same source.

  The latent clusters, the density and hence every CPT trajectory and SFT target are built
  from embeddings and observed labels only (DESIGN.md section 2).
  """
  rng = np.random.default_rng(0)
  poisoned = dataclasses.replace(
      cat, patterns=rng.integers(0, 3 * int(cat.patterns.max()) + 7, cat.num_items),
      attributes=np.where(cat.observed, cat.attributes, ~cat.attributes))
  a, b = _build(cat), _build(poisoned)
  np.testing.assert_array_equal(a.train_items, b.train_items)
  np.testing.assert_array_equal(a.assign, b.assign)
  np.testing.assert_array_equal(a.density, b.density)
