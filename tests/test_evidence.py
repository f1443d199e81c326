"""Neighbour evidence: what it reads (train items, observed labels), what the model does with it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modit_jax import catalog as catalog_lib
from modit_jax import dit
from modit_jax import errors
from modit_jax import evidence
from modit_jax import oracle as oracle_lib
from modit_jax import retrieval
from modit_jax import training
from modit_jax import trajectories

_SIZES = (5, 20, 60)
_SCALE = 3.0


@pytest.fixture(scope="module")
def cat(tiny_world):
  return catalog_lib.load_catalog(tiny_world)


def _queries(cat, split):
  q = cat.queries[split]
  return q.take(np.arange(min(40, len(q))))


def _evidence(cat, queries, groups=None, exclude_group=None, source=None):
  source = source or evidence.NeighbourEvidence(cat, _SIZES, _SCALE, groups)
  context = np.asarray(cat.embeddings[queries.seeds], np.float32)
  return source(context, np.ones(queries.seeds.shape, bool), queries.domain,
                exclude_items=queries.seeds, exclude_group=exclude_group)


def test_vectors_are_the_documented_ones(cat):
  q = _queries(cat, "item_holdout")
  got = _evidence(cat, q)
  assert got.shape == (len(q), evidence.num_tokens(_SIZES), cat.dim) == (len(q), 7, cat.dim)
  emb = np.asarray(cat.embeddings, np.float64)
  train = cat.train_items()
  for i in (0, 7, len(q) - 1):
    m = int(q.domain[i])
    anchor = emb[q.seeds[i]].mean(0)
    sims = emb[train] @ (anchor / np.linalg.norm(anchor))
    near = train[np.argsort(-sims, kind="stable")]
    labelled = np.asarray(cat.observed)[:, m]
    positive = labelled & np.asarray(cat.attributes)[:, m]
    g = emb[positive].mean(0) - emb[labelled].mean(0)
    np.testing.assert_allclose(got[i, 0], _SCALE * g / np.linalg.norm(g), atol=1e-5)
    for j, n in enumerate(_SIZES):
      ids = near[:n]
      contrast = (emb[ids[positive[ids]]].mean(0) - emb[ids[labelled[ids]]].mean(0)
                  if positive[ids].any() else np.zeros(cat.dim))
      np.testing.assert_allclose(got[i, 1 + 2 * j], _SCALE * contrast, atol=1e-5)
      np.testing.assert_allclose(got[i, 2 + 2 * j], _SCALE * (emb[ids].mean(0) - anchor),
                                 atol=1e-5)


def test_reads_only_train_items_and_their_observed_labels(cat):
  """Hidden labels flipped, patterns shuffled, held-out items moved: the same evidence."""
  rng = np.random.default_rng(7)
  observed = np.asarray(cat.observed)
  heldout = np.asarray(cat.item_split) != 0
  emb = np.array(cat.embeddings)
  noise = rng.normal(size=(heldout.sum(), cat.dim)).astype(np.float32)
  emb[heldout] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
  poisoned = dataclasses.replace(
      cat, attributes=np.where(observed, cat.attributes, ~np.asarray(cat.attributes)),
      patterns=rng.permutation(np.asarray(cat.patterns)), embeddings=emb)
  for split in ("train", "item_holdout", "pattern_holdout"):
    q = _queries(cat, split)
    context = np.asarray(cat.embeddings[q.seeds], np.float32)  # the seeds themselves unchanged
    args = (context, np.ones(q.seeds.shape, bool), q.domain)
    a = evidence.NeighbourEvidence(cat, _SIZES, _SCALE)(*args, exclude_items=q.seeds)
    b = evidence.NeighbourEvidence(poisoned, _SIZES, _SCALE)(*args, exclude_items=q.seeds)
    np.testing.assert_array_equal(a, b)
  # Not vacuous: the observed labels it may read do move it.
  flipped = dataclasses.replace(
      cat, attributes=np.where(observed, ~np.asarray(cat.attributes), cat.attributes))
  q = _queries(cat, "item_holdout")
  assert not np.allclose(_evidence(cat, q), _evidence(flipped, q))


def test_neighbours_are_train_items_never_seeds_nor_a_hidden_group(cat):
  train = cat.train_items()
  groups = np.arange(len(train)) % 9
  source = evidence.NeighbourEvidence(cat, _SIZES, _SCALE, groups)
  q = _queries(cat, "train")
  centroids = evidence.seed_centroids(cat.embeddings, q.seeds)
  near = source.neighbours(centroids, exclude_items=q.seeds)
  assert near.shape == (len(q), _SIZES[-1])
  rows = np.full(cat.num_items, -1)
  rows[train] = np.arange(len(train))
  for i in range(len(q)):
    assert not np.isin(rows[q.seeds[i]], near[i]).any()
    assert len(set(near[i])) == near.shape[1]
  # The seeds would otherwise be their own nearest neighbours.
  assert np.isin(rows[q.seeds[0]], source.neighbours(centroids[:1])[0]).any()
  hide = np.arange(len(q)) % 9
  hidden = source.neighbours(centroids, exclude_items=q.seeds, exclude_group=hide)
  assert not (groups[hidden] == hide[:, None]).any()
  # -1 hides nothing.
  np.testing.assert_array_equal(
      source.neighbours(centroids, q.seeds, np.full(len(q), -1)), near)
  # Several groups per query (HPPO hides every cluster a seed falls in), -1 as padding.
  several = np.stack([hide, (hide + 4) % 9, np.full(len(q), -1)], axis=1)
  hidden = source.neighbours(centroids, exclude_items=q.seeds, exclude_group=several)
  assert not (groups[hidden][:, :, None] == several[:, None, :]).any()
  np.testing.assert_array_equal(
      hidden, source.neighbours(centroids, q.seeds, several[:, [1, 0]]))


def test_catalog_offsets_search_the_whole_catalog_and_keep_hidden_groups(cat):
  """`catalog_sizes` tokens: the mean of the n nearest catalog items (held-out ones included,
  seeds never) minus the seeds' mean, the baseline's offset; a hidden group hides nothing."""
  q = _queries(cat, "pattern_holdout")
  train = cat.train_items()
  groups = np.arange(len(train)) % 9
  both = evidence.NeighbourEvidence(cat, _SIZES, _SCALE, groups, catalog_sizes=(4, 30))
  only = evidence.NeighbourEvidence(cat, (), _SCALE, catalog_sizes=(4, 30))
  assert (both.num_tokens, only.num_tokens) == (9, 3) == (
      evidence.num_tokens(_SIZES, (4, 30)), evidence.num_tokens((), (4, 30)))
  got = _evidence(cat, q, source=both)
  np.testing.assert_array_equal(got[:, :7], _evidence(cat, q))  # labelled tokens unchanged
  np.testing.assert_array_equal(_evidence(cat, q, source=only),
                                np.concatenate([got[:, :1], got[:, 7:]], axis=1))
  emb = np.asarray(cat.embeddings, np.float64)
  for i in (0, 5, len(q) - 1):
    anchor = emb[q.seeds[i]].mean(0)
    sims = emb @ (anchor / np.linalg.norm(anchor))
    sims[q.seeds[i]] = -np.inf
    near = np.argsort(-sims, kind="stable")
    for j, n in enumerate((4, 30)):
      np.testing.assert_allclose(got[i, 7 + j], _SCALE * (emb[near[:n]].mean(0) - anchor),
                                 atol=1e-5)
  # A pattern-holdout seed set's neighbourhood holds held-out items: its own pattern's rest.
  near, _ = only.catalog_index.search(evidence.seed_centroids(cat.embeddings, q.seeds), 30,
                                      exclude=q.seeds)
  assert (np.asarray(cat.item_split)[near] == 2).mean() > 0.5
  assert not (near[:, :, None] == q.seeds[:, None, :]).any()
  # Hiding a seed set's cluster hides it from the labelled neighbourhood only.
  hidden = _evidence(cat, q, exclude_group=np.arange(len(q)) % 9, source=both)
  np.testing.assert_array_equal(hidden[:, 7:], got[:, 7:])
  assert not np.allclose(hidden[:, :7], got[:, :7])
  # Labels never reach it: hidden or observed labels flipped, the same offsets.
  flipped = dataclasses.replace(cat, attributes=~np.asarray(cat.attributes))
  np.testing.assert_array_equal(
      _evidence(flipped, q, source=evidence.NeighbourEvidence(flipped, (), _SCALE,
                                                              catalog_sizes=(4, 30)))[:, 1:],
      _evidence(cat, q, source=only)[:, 1:])
  with pytest.raises(errors.UserError, match="catalog_offsets"):
    evidence.NeighbourEvidence(cat, (), _SCALE, catalog_sizes=(0,))
  with pytest.raises(errors.UserError, match="at least one neighbourhood size"):
    evidence.NeighbourEvidence(cat, (), _SCALE)


def test_local_directions_can_hide_groups(cat):
  """`local_directions(hidden=...)` drops the hidden groups' train items, and only those."""
  q = _queries(cat, "train")
  oracle = oracle_lib.OnlineOracle(cat, index_kind="exact")
  train = cat.train_items()
  group_of = np.full(cat.num_items, -1)
  group_of[train] = np.arange(len(train)) % 9
  nothing = np.full((len(q), 2), -1)
  plain = oracle_lib.local_directions(cat, oracle, q, _SIZES, oracle_labels=True)
  same = oracle_lib.local_directions(cat, oracle, q, _SIZES, oracle_labels=True,
                                     hidden=(group_of, nothing))
  for n in _SIZES:
    np.testing.assert_array_equal(plain[n], same[n])
  # With groups hidden the contrast is that of the nearest items outside them: the exact
  # neighbours with those groups excluded (NeighbourEvidence's search, shared groups).
  hide = np.stack([np.arange(len(q)) % 9, np.full(len(q), -1)], axis=1)
  got = oracle_lib.local_directions(cat, oracle, q, _SIZES, oracle_labels=True,
                                    hidden=(group_of, hide))
  source = evidence.NeighbourEvidence(cat, _SIZES, _SCALE, group_of[train])
  near = train[source.neighbours(evidence.seed_centroids(cat.embeddings, q.seeds),
                                 exclude_items=q.seeds, exclude_group=hide)]
  labels = oracle.labels(near, q.domain)
  want = evidence.label_contrast(cat.embeddings, near, np.ones(near.shape, bool), labels,
                                 _SIZES)
  for n in _SIZES:
    assert np.isclose(got[n], want[n], atol=1e-5).all(axis=1).mean() > 0.9  # search ties
  assert not np.allclose(got[_SIZES[-1]], plain[_SIZES[-1]])  # the hidden items did count


def test_local_shift_reads_the_same_contrast(cat):
  """The baseline and the model's evidence share one contrast: equal on equal neighbours."""
  q = _queries(cat, "item_holdout")
  oracle = oracle_lib.OnlineOracle(cat, index_kind="exact")
  got = oracle_lib.local_directions(cat, oracle, q, _SIZES)
  ours = _evidence(cat, q)
  for j, n in enumerate(_SIZES):
    close = np.isclose(got[n], ours[:, 1 + 2 * j] / _SCALE, atol=1e-5).all(axis=1)
    assert close.mean() > 0.9, n  # exact-search ties may order a few neighbours differently


def test_null_domain_rows_are_zero_and_bad_sizes_are_refused(cat):
  q = _queries(cat, "item_holdout")
  source = evidence.NeighbourEvidence(cat, _SIZES, _SCALE)
  context = np.asarray(cat.embeddings[q.seeds], np.float32)
  null = np.full(len(q), cat.num_domains)
  assert not source(context, np.ones(q.seeds.shape, bool), null).any()
  for sizes in ((0,), (5, 5), (2.5,)):
    with pytest.raises(errors.UserError, match="neighbour_evidence"):
      evidence.NeighbourEvidence(cat, sizes, _SCALE)
  assert evidence.num_tokens(()) == 0


def test_sft_batches_carry_evidence_that_hides_the_cluster_on_a_share(cat):
  config = trajectories.metric_predictor.default_config()
  config.num_steps, config.hidden = 100, (32,)
  source = trajectories.build_source(cat, 26, 0, config)[0]
  neighbour = evidence.NeighbourEvidence(cat, _SIZES, _SCALE, source.assign)
  plain = trajectories.TailCentroidTargets(source, 8, 0.2, 0.6, cat.num_domains, 0)
  with_ev = trajectories.TailCentroidTargets(source, 8, 0.2, 0.6, cat.num_domains, 0,
                                             evidence=neighbour, hide_cluster_prob=0.5)
  a, b = plain(3, 64), with_ev(3, 64)
  # The evidence stream is separate: everything else is the batch of a model without it.
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert b["evidence"].shape == (64, 7, cat.dim)
  ids = with_ev.ids(3, 64)
  shown = neighbour(b["context"], b["context_mask"], b["domain"], ids["context_ids"])
  hidden = neighbour(b["context"], b["context_mask"], b["domain"], ids["context_ids"],
                     ids["cluster"])
  is_shown = np.all(np.isclose(b["evidence"], shown), axis=(1, 2))
  is_hidden = np.all(np.isclose(b["evidence"], hidden), axis=(1, 2))
  assert np.all(is_shown | is_hidden)
  assert 0.2 < np.mean(~is_shown) < 0.8


def test_model_masks_evidence_for_the_null_domain(fast_compile):
  del fast_compile
  model = dit.tiny(dim=6, num_domains=3, num_evidence=4)
  params = dit.init_params(model, jax.random.PRNGKey(0))
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  rng = np.random.default_rng(0)
  x, t = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32), jnp.array([0.3, 0.7])
  context = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
  mask = jnp.ones((2, 5), bool)
  ev1 = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
  ev2 = jnp.asarray(rng.normal(size=(2, 4, 6)), jnp.float32)
  apply = lambda d, e: model.apply({"params": params}, x, t, context, mask, d, e)
  null, real = jnp.array([3, 3]), jnp.array([0, 2])
  np.testing.assert_allclose(apply(null, ev1), apply(null, ev2), atol=1e-6)
  assert not np.allclose(apply(real, ev1), apply(real, ev2), atol=1e-3)
  # The seeds stay a set: permuting them changes nothing.
  perm = context[:, ::-1]
  np.testing.assert_allclose(
      model.apply({"params": params}, x, t, perm, mask, real, ev1), apply(real, ev1), atol=1e-5)
  with pytest.raises(ValueError, match="evidence"):
    model.apply({"params": params}, x, t, context, mask, real)


def test_only_the_stages_whose_batches_carry_evidence_accept_it(tiny_world, tmp_path):
  for stage in ("pretrain", "cpt"):
    config = training.default_config("tiny")
    for field in ("neighbour_evidence", "catalog_offsets"):
      config.stage = stage
      config.model[field] = (5,)
      with pytest.raises(errors.UserError, match="sft and hppo stages only"):
        training.train(config, str(tiny_world), str(tmp_path / stage))
      assert not (tmp_path / stage).exists()
      config.model[field] = ()


def test_too_few_train_items_left_is_a_clear_error(cat):
  q = _queries(cat, "train").take(np.arange(2))
  count = len(cat.train_items())
  source = evidence.NeighbourEvidence(cat, (count - 1,), _SCALE, np.zeros(count, np.int64))
  centroids = evidence.seed_centroids(cat.embeddings, q.seeds)
  assert source.neighbours(centroids).shape == (2, count - 1)  # nothing excluded: all fit
  with pytest.raises(errors.UserError, match="smaller neighbourhood sizes"):
    source.neighbours(centroids, exclude_items=q.seeds)


def test_catalog_offsets_are_the_neighbourhood_mean_minus_the_seed_mean(cat):
  q = _queries(cat, "pattern_holdout")
  emb = np.asarray(cat.embeddings, np.float32)
  index = retrieval.build_index(emb, "exact")
  seed_means = emb[q.seeds].mean(axis=1)
  offsets = evidence.catalog_offsets(emb, index, seed_means, q.seeds, (3, 30))
  # By hand: every catalog item (held-out ones too) but the seeds, nearest the seed mean.
  scores = seed_means @ emb.T
  np.put_along_axis(scores, q.seeds, -np.inf, axis=1)
  order = np.argsort(-scores, axis=1)
  for n in (3, 30):
    np.testing.assert_allclose(offsets[n], emb[order[:, :n]].mean(1) - seed_means, atol=1e-5)
  # An unseen pattern's neighbourhood is its own held-out items, which no train-side search
  # reaches: that is what the offset adds to the seeds.
  split = np.asarray(cat.item_split)[order[:, :30]]
  assert (split == catalog_lib.SPLIT_CODES["pattern_holdout"]).mean() > 0.5


def test_catalog_offsets_of_a_small_catalog_average_all_but_the_seeds(cat):
  """A size above what is left after the seeds gives the mean over every other item."""
  q = _queries(cat, "pattern_holdout").take(np.arange(3))
  emb = np.asarray(cat.embeddings[:40], np.float32)
  seeds = np.arange(3 * q.seeds.shape[1]).reshape(3, -1) % 40
  means = emb[seeds].mean(axis=1)
  offsets = evidence.catalog_offsets(emb, retrieval.build_index(emb, "exact"), means, seeds,
                                     (5, 1000))
  for i in range(3):
    others = np.setdiff1d(np.arange(40), seeds[i])
    np.testing.assert_allclose(offsets[1000][i], emb[others].mean(0) - means[i], atol=1e-5)
  assert not np.allclose(offsets[5], offsets[1000])


def test_offset_index_reuses_only_the_default_index():
  """The catalog offsets search the catalog's default index: one the caller holds is reused
  when it is that index, and a default one is built otherwise, with the same answers."""
  rng = np.random.default_rng(0)
  emb = evidence.normalize(rng.normal(size=(3000, 16)))  # above ScaNN's brute-force size
  default = retrieval.build_index(emb)
  assert evidence.offset_index(emb, default) is default
  for other in (retrieval.build_index(emb, "exact"), default.with_search(leaves_to_search=1),
                None):
    built = evidence.offset_index(emb, other)
    assert built is not other and built.params == default.params
    queries = emb[:50] + 0.1
    np.testing.assert_array_equal(built.search(queries, 30)[0], default.search(queries, 30)[0])
