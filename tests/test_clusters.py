"""k-means latent clusters: determinism, blob recovery, blocked assignment, tiny-world agreement."""

import numpy as np
import pytest

from modit_jax import catalog as catalog_lib
from modit_jax import clusters
from modit_jax import errors


@pytest.fixture(scope="module")
def tiny(tiny_world):
  return catalog_lib.load_catalog(tiny_world)


def _blobs(seed=0, num=6, per=300, dim=8):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num, dim)) * 5
  labels = rng.permutation(np.repeat(np.arange(num), per))
  x = centres[labels] + 0.3 * rng.normal(size=(len(labels), dim))
  return x.astype(np.float32), labels, centres


def test_kmeans_is_deterministic_for_a_seed():
  x, _, _ = _blobs()
  c1, a1 = clusters.kmeans(x, 6, seed=3)
  c2, a2 = clusters.kmeans(x, 6, seed=3)
  np.testing.assert_array_equal(c1, c2)
  np.testing.assert_array_equal(a1, a2)
  assert c1.dtype == np.float32 and c1.shape == (6, 8)
  assert a1.dtype == np.int32 and a1.shape == (len(x),)


def test_kmeans_recovers_separated_blobs():
  x, labels, centres = _blobs()
  centroids, assign = clusters.kmeans(x, 6, seed=0)
  score = clusters.agreement(assign, labels)
  assert score["nmi"] == pytest.approx(1.0)
  assert score["purity"] == 1.0
  # Each centroid sits on its blob's centre (up to the noise of 300 points).
  for c in range(6):
    true = np.bincount(labels[assign == c]).argmax()
    np.testing.assert_allclose(centroids[c], centres[true], atol=0.1)
  # And every point is assigned to its nearest centroid.
  nearest = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(assign, nearest)


def test_blocked_assignment_equals_unblocked():
  # The blobs and k of the tests above: jit caches hit, only new block shapes compile.
  x, _, _ = _blobs()
  centroids, assign = clusters.kmeans(x, 6, seed=0)
  whole, dist = clusters.assign_points(x, centroids, batch_size=len(x))
  for rows in (7, 500):  # 7 leaves a ragged last block (1800 = 257 * 7 + 1)
    blocked, blocked_dist = clusters.assign_points(x, centroids, batch_size=rows)
    np.testing.assert_array_equal(blocked, whole)
    # |x|^2 ~ 200 here: expanded-form distances carry ~1e-4 of float32 cancellation.
    np.testing.assert_allclose(blocked_dist, dist, atol=1e-3)
  np.testing.assert_array_equal(assign, whole)
  # The whole algorithm too: blocks change only the float rounding of the centroid sums.
  small_centroids, small_assign = clusters.kmeans(x, 6, seed=0, batch_size=500)
  np.testing.assert_array_equal(small_assign, assign)
  np.testing.assert_allclose(small_centroids, centroids, atol=1e-5)


@pytest.mark.parametrize("k,sizes", [
    (10, [100, 50, 0, 25]), (4, [1, 1, 1, 97]), (7, [3, 3, 3]), (9, [3, 3, 3]),
    (12, [1000, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]), (5, [2, 0, 9, 4, 1])])
def test_apportion_shares_k_over_groups(k, sizes):
  shares = clusters._apportion(k, np.array(sizes))
  sizes = np.array(sizes)
  assert shares.sum() == k
  assert np.all(shares[sizes == 0] == 0)
  assert np.all((shares[sizes > 0] >= 1) & (shares[sizes > 0] <= sizes[sizes > 0]))
  exact = k * sizes / sizes.sum()
  if np.all(exact[sizes > 0] >= 1):  # no lift to 1 to pay for: every share within 1 of exact
    assert np.all(np.abs(shares - exact) < 1)
  else:  # the lifts are paid by the groups above their exact share the most
    assert shares[np.argmax(sizes)] <= np.ceil(exact.max())


def _many_blobs(seed=0, num=36, per=60, dim=8):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num, dim)) * 5
  labels = rng.permutation(np.repeat(np.arange(num), per))
  x = centres[labels] + 0.2 * rng.normal(size=(len(labels), dim))
  return x.astype(np.float32), labels


def test_two_level_kmeans_recovers_blobs_as_flat_does(monkeypatch):
  x, labels = _many_blobs()
  flat_centroids, flat = clusters.kmeans(x, 36, seed=0)
  monkeypatch.setattr(clusters, "_TWO_LEVEL_MIN_PAIRS", 0)  # every k-means in two levels
  centroids, assign = clusters.kmeans(x, 36, seed=0)
  assert centroids.shape == flat_centroids.shape and assign.dtype == np.int32
  assert np.array_equal(np.unique(assign), np.arange(36))  # every cluster used
  two_level, one_level = clusters.agreement(assign, labels), clusters.agreement(flat, labels)
  assert two_level["purity"] >= 0.98 and two_level["nmi"] >= 0.98
  assert two_level["nmi"] >= one_level["nmi"] - 0.02
  # Each centroid is the mean of its points (Lloyd converged inside each coarse cluster).
  for c in range(36):
    np.testing.assert_allclose(centroids[c], x[assign == c].mean(axis=0), atol=1e-4)
  again_centroids, again = clusters.kmeans(x, 36, seed=0)
  np.testing.assert_array_equal(again, assign)
  np.testing.assert_array_equal(again_centroids, centroids)


def test_two_level_kmeans_with_coarse_centroids_from_a_sample(monkeypatch):
  """The coarse level fitted on a sample (here 30 points per coarse cluster, not all) still
  recovers the blobs, deterministically."""
  x, labels = _many_blobs()
  monkeypatch.setattr(clusters, "_TWO_LEVEL_MIN_PAIRS", 0)
  monkeypatch.setattr(clusters, "_COARSE_SAMPLE_PER_CLUSTER", 30)
  assert 30 * round(np.sqrt(36)) < len(x)  # the sample is a strict subset
  centroids, assign = clusters.kmeans(x, 36, seed=0)
  score = clusters.agreement(assign, labels)
  assert score["purity"] >= 0.98 and score["nmi"] >= 0.98
  again_centroids, again = clusters.kmeans(x, 36, seed=0)
  np.testing.assert_array_equal(again, assign)
  np.testing.assert_array_equal(again_centroids, centroids)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 13, 100, 291, 20000, 23457, 65536])
def test_bucket_rounds_up_by_at_most_a_quarter(n):
  b = clusters._bucket(n)
  assert n <= b <= max(n + 1, 1.25 * n)
  assert clusters._bucket(b) == b  # buckets are fixed points: a few shapes, not one per n


def test_padded_kmeans_never_uses_the_padding():
  """Padded shapes (two-level k-means' splits) mask their padding: the zero rows that pad the
  sample are never drawn as seeds and the zero centroids that pad k never win a point, though
  every point is far from the origin where the padding sits."""
  x, labels, _ = _blobs(seed=3, num=5, per=3, dim=4)  # 15 points: sample and k both padded
  x = x + 50.0
  assert clusters._bucket(len(x)) > len(x) and clusters._bucket(9) > 9
  seeds = clusters._init_centroids(x, 9, seed=0, padded=True)
  assert seeds.shape == (9, 4)
  assert all(np.any(np.all(x == s, axis=1)) for s in seeds)  # every seed is a real point
  centroids, assign = clusters._flat_kmeans(x, 9, 0, 50, 65536, padded=True)
  assert centroids.shape == (9, 4) and assign.min() >= 0 and assign.max() < 9
  exact_centroids, exact = clusters._flat_kmeans(x, 9, 0, 50, 65536)
  # Equal up to float rounding (the same seeds, the same Lloyd steps on these 15 points).
  np.testing.assert_array_equal(assign, exact)
  np.testing.assert_allclose(centroids, exact_centroids, atol=1e-5)
  # Points at the origin, real centroids far away: the zero padding centroids would be nearest.
  near, far = x - 50.0, x[:9] + 100.0
  assign, _, sums, counts = clusters._lloyd_pass(near, far, 65536, padded=True)
  assert assign.max() < 9 and sums.shape == (9, 4) and counts.sum() == len(near)


def test_two_level_kmeans_starts_above_its_threshold(monkeypatch):
  x, _ = _many_blobs()
  calls = []
  real = clusters._two_level_kmeans
  monkeypatch.setattr(clusters, "_two_level_kmeans", lambda *a: calls.append(a) or real(*a))
  monkeypatch.setattr(clusters, "_TWO_LEVEL_MIN_PAIRS", len(x) * 36 - 1)
  clusters.kmeans(x, 36, seed=0)
  clusters.kmeans(x, 35, seed=0)  # N k at the threshold: flat
  assert [a[1] for a in calls] == [36]


def test_empty_cluster_moves_to_the_farthest_point():
  x = np.array([[0, 0], [1, 0], [0, 1], [9, 9]], np.float32)
  sums = np.array([[1, 1], [0, 0]], np.float64)
  counts = np.array([3, 0], np.float64)
  sqdist = np.array([0.1, 0.5, 0.5, 90.0], np.float32)
  new = clusters._update_centroids(sums, counts, sqdist, x, np.zeros((2, 2), np.float32))
  np.testing.assert_allclose(new, [[1 / 3, 1 / 3], [9, 9]])


def test_kmeans_with_fewer_distinct_points_than_k():
  # Three distinct points, each 600 times, in the blobs' shape (jit caches hit); k = 6.
  _, _, centres = _blobs()
  labels = np.repeat(np.arange(3), 600)
  centroids, assign = clusters.kmeans(centres[labels].astype(np.float32), 6, seed=0)
  assert np.isfinite(centroids).all()
  assert clusters.agreement(assign, labels)["purity"] == 1.0


@pytest.mark.parametrize("bad, match", [
    (dict(k=0), "1 <= k"), (dict(k=31), "1 <= k"), (dict(num_iters=0), "num_iters"),
    (dict(batch_size=0), "batch_size"), (dict(x=np.zeros(5, np.float32)), "2-D"),
    (dict(x=np.zeros((5, 2), np.int32)), "float"),
    (dict(x=np.where(np.arange(60).reshape(30, 2) == 41, np.nan, 1).astype(np.float32)),
     "row 20 has NaN")])
def test_kmeans_refuses_bad_arguments(bad, match):
  args = dict(x=np.zeros((30, 2), np.float32), k=3, seed=0)
  args.update(bad)
  with pytest.raises(errors.UserError, match=match):
    clusters.kmeans(args.pop("x"), args.pop("k"), **args)


def test_agreement_known_values():
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
  perfect = clusters.agreement(np.array([5, 5, 5, 3, 3, 3, 9, 9]), labels)
  assert perfect == pytest.approx({"nmi": 1.0, "purity": 1.0})
  one = clusters.agreement(np.zeros(8, int), labels)
  assert one["nmi"] == pytest.approx(0.0) and one["purity"] == pytest.approx(3 / 8)
  # Two clusters {0,0,0,1} and {1,1,2,2}: majorities 3 + 2 of 8. NMI computed by hand.
  mixed = clusters.agreement(np.array([0, 0, 0, 0, 1, 1, 1, 1]), labels)
  assert mixed["purity"] == pytest.approx(5 / 8)
  p = np.array([[3, 1, 0], [0, 2, 2]]) / 8
  pa, pb = p.sum(1), p.sum(0)
  mi = sum(p[i, j] * np.log(p[i, j] / (pa[i] * pb[j])) for i in range(2) for j in range(3)
           if p[i, j] > 0)
  h = lambda q: -np.sum(q * np.log(q))
  assert mixed["nmi"] == pytest.approx(mi / ((h(pa) + h(pb)) / 2))
  with pytest.raises(errors.UserError):
    clusters.agreement(np.zeros(3), np.zeros(4))


def test_latent_clusters_find_the_patterns_of_the_tiny_world(tiny):
  train = tiny.train_items()
  k = len(np.unique(tiny.patterns[train]))  # the test may read the truth; training never does
  items, assign, centroids = clusters.latent_clusters(tiny, k, seed=0)
  np.testing.assert_array_equal(items, train)
  assert items.dtype == np.int64 and assign.shape == (len(train),)
  assert centroids.shape == (k, tiny.dim)
  score = clusters.agreement(assign, tiny.patterns[items])
  print(f"tiny world, k = {k}: NMI {score['nmi']:.3f}, purity {score['purity']:.3f}")
  assert score["nmi"] > 0.7
  assert score["purity"] > 0.7
  with pytest.raises(errors.UserError, match="number of train items"):
    clusters.latent_clusters(tiny, len(train) + 1, seed=0)


def test_latent_clusters_on_the_callers_train_rows_equal_their_own(tiny):
  """A caller's copy of the train rows (trajectories.build_source shares one) gives the same
  clusters as the rows gathered inside; a copy of other rows is refused."""
  train = tiny.train_items()
  rows = np.asarray(tiny.embeddings[train], np.float32)
  own = clusters.latent_clusters(tiny, 12, seed=3)
  given = clusters.latent_clusters(tiny, 12, seed=3, train_embeddings=rows)
  for a, b in zip(own, given):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(rows, tiny.embeddings[train])  # read, not written
  with pytest.raises(ValueError, match="train items"):
    clusters.latent_clusters(tiny, 12, seed=3, train_embeddings=rows[:-1])
