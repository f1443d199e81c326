"""Stage 4 (HPPO): Pareto pairs, the Diffusion-DPO loss, candidate pools, the stage end to end."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import hppo as hppo_config
from configs import sft as sft_config
from conftest import perturb
from modit_jax import catalog as catalog_lib
from modit_jax import diffusion
from modit_jax import dit
from modit_jax import engine
from modit_jax import errors
from modit_jax import evidence as evidence_lib
from modit_jax import generator as generator_lib
from modit_jax import hppo
from modit_jax import memo
from modit_jax import models
from modit_jax import oracle as oracle_lib
from modit_jax import query_split
from modit_jax import training
from modit_jax import trajectories

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, DOMAINS = 16, 3


def _tiny_model():
  return dit.DiT(dim=DIM, num_domains=DOMAINS, width=16, depth=1, num_heads=2, mlp_ratio=2,
                 max_context=4)


def _pair_batch(seed: int = 0, batch: int = 6):
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  return {"context": rng.normal(size=(batch, 4, DIM)).astype(np.float32),
          "context_mask": np.ones((batch, 4), bool),
          "domain": rng.integers(0, DOMAINS, batch).astype(np.int32),
          "winner": unit(rng.normal(size=(batch, DIM))).astype(np.float32),
          "loser": unit(rng.normal(size=(batch, DIM))).astype(np.float32)}


@pytest.fixture(scope="module")
def model_and_params(fast_compile):
  del fast_compile
  model = _tiny_model()
  params = perturb(dit.init_params(model, jax.random.PRNGKey(0)), seed=1)
  return model, params, models.apply_fn(model)


def test_pareto_pairs_hand_made():
  # One query, four candidates: (joint, purity).
  joint = np.array([[0.50, 0.30, 0.30, 0.10]])
  purity = np.array([[0.90, 1.00, 0.80, 0.95]])
  pairs, counts = hppo.pareto_pairs(joint, purity, margin=0.05)
  # By joint with margin: 0>1, 0>2, 0>3, 1>3, 2>3 (1 vs 2 is a tie). Pareto drops 0>1
  # (purity 0.90 < 1.00), 0>3 (0.90 < 0.95) and 2>3 (0.80 < 0.95).
  assert {tuple(p) for p in pairs} == {(0, 0, 2), (0, 1, 3)}
  assert counts == {"candidate_pairs": 6, "margin_pairs": 5, "kept_pairs": 2}
  no_filter, _ = hppo.pareto_pairs(joint, purity, margin=0.05, pareto=False)
  assert len(no_filter) == 5
  # A larger margin drops the close pairs first.
  # Only 0>3 (gap 0.4) clears a margin of 0.25, and it fails the Pareto filter.
  wide, wide_counts = hppo.pareto_pairs(joint, purity, margin=0.25)
  assert len(wide) == 0 and wide_counts["margin_pairs"] == 1
  # Queries are independent: a second query's pairs carry its own row index.
  pairs2, _ = hppo.pareto_pairs(np.concatenate([joint, joint]), np.concatenate([purity, purity]),
                                margin=0.05)
  assert sorted(map(tuple, pairs2)) == [(0, 0, 2), (0, 1, 3), (1, 0, 2), (1, 1, 3)]


def test_dpo_loss_is_log2_when_policy_equals_reference(model_and_params):
  _, params, apply = model_and_params
  loss_fn = hppo.dpo_loss_fn(apply, diffusion.TargetSpace(4.0), beta=50.0)
  loss, aux = loss_fn(params, _pair_batch(), jax.random.PRNGKey(0), params)
  assert math.isclose(float(loss), math.log(2), rel_tol=1e-6)
  assert float(aux["winner_drift"]) == 0.0 and float(aux["loser_drift"]) == 0.0
  # With another policy the loss moves away from log 2.
  other = perturb(params, seed=7, scale=0.1)
  moved, _ = loss_fn(other, _pair_batch(), jax.random.PRNGKey(0), params)
  assert abs(float(moved) - math.log(2)) > 1e-4


def test_sft_term_pulls_toward_the_batch_best(model_and_params):
  """With `best` in the batch the SFT term scores it; the DPO part is unchanged."""
  _, params, apply = model_and_params
  space = diffusion.TargetSpace(4.0)
  policy = perturb(params, seed=9, scale=0.1)
  batch = _pair_batch()
  rng = jax.random.PRNGKey(0)
  sft = lambda b: hppo.dpo_loss_fn(apply, space, beta=50.0, sft_weight=1.0)(policy, b, rng,
                                                                             params)
  no_sft = hppo.dpo_loss_fn(apply, space, beta=50.0)(policy, batch, rng, params)
  base, base_aux = sft(batch)
  # The winner as `best` is the winner-target loss, to float rounding.
  same, _ = sft(dict(batch, best=batch["winner"]))
  assert math.isclose(float(same), float(base), rel_tol=1e-6)
  # Another `best` changes only the SFT term: the DPO loss is the one without an SFT term.
  other, other_aux = sft(dict(batch, best=batch["loser"]))
  assert not math.isclose(float(other), float(base), rel_tol=1e-4)
  for aux in (base_aux, other_aux):
    assert math.isclose(float(aux["dpo_loss"]), float(no_sft[1]["dpo_loss"]), rel_tol=1e-6)


def test_no_gradient_reaches_the_reference(model_and_params):
  _, params, apply = model_and_params
  loss_fn = hppo.dpo_loss_fn(apply, diffusion.TargetSpace(4.0), beta=50.0, sft_weight=0.5)
  policy = perturb(params, seed=3, scale=0.1)
  grad_ref = jax.grad(lambda r: loss_fn(policy, _pair_batch(), jax.random.PRNGKey(0), r)[0])(
      params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grad_ref))
  grad_policy = jax.grad(lambda p: loss_fn(p, _pair_batch(), jax.random.PRNGKey(0), params)[0])(
      policy)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_policy)) > 0


def test_engine_step_keeps_the_reference_out_of_the_state(model_and_params):
  _, params, apply = model_and_params
  config = training.default_config("tiny")
  config.num_steps, config.warmup_steps = 2, 1
  tx = engine.make_optimizer(config)
  state = engine.create_train_state(params, tx)
  reference = jax.tree.map(jnp.copy, params)
  new_state, metrics = engine.train_step(
      state, _pair_batch(), jax.random.PRNGKey(0), reference,
      loss_fn=hppo.dpo_loss_fn(apply, diffusion.TargetSpace(4.0), 50.0), tx=tx, ema_decay=0.5)
  # Up to float rounding: under autodiff the policy's forward pass may round differently.
  assert math.isclose(float(metrics["loss"]), math.log(2), rel_tol=1e-4)
  assert "implicit_accuracy" in metrics
  # The reference is an argument, not state: the state's leaves are params, opt and EMA only.
  assert len(jax.tree.leaves(new_state)) == len(jax.tree.leaves(state))
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params))]
  assert any(changed)


def test_swapping_winner_and_loser_flips_delta(model_and_params):
  _, params, apply = model_and_params
  policy = perturb(params, seed=5, scale=0.1)
  batch = _pair_batch(2)
  swapped = dict(batch, winner=batch["loser"], loser=batch["winner"])
  t = jnp.linspace(0.1, 0.9, 6)
  noise = jax.random.normal(jax.random.PRNGKey(1), (6, DIM))
  space = diffusion.TargetSpace(4.0)
  dw, dl, _ = hppo.preference_drifts(apply, policy, params, batch, t, noise, space)
  sw, sl, _ = hppo.preference_drifts(apply, policy, params, swapped, t, noise, space)
  np.testing.assert_allclose(np.asarray(sw - sl), -np.asarray(dw - dl), rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(dw - dl).max()) > 0


def test_policy_ablation_configs():
  full = hppo.parse_policies(hppo_config.get_config("tiny").hppo.policies)
  assert full == list(hppo.DEFAULT_POLICIES) == [
      p for p in hppo.POLICIES if p != "global_shift"]
  for policy in hppo.DEFAULT_POLICIES:
    c = hppo_config.get_config(f"tiny,no_{policy}")
    assert hppo.parse_policies(c.hppo.policies) == [p for p in hppo.DEFAULT_POLICIES
                                                    if p != policy]
  with pytest.raises(ValueError, match="unknown hppo config variant"):
    hppo_config.get_config("no_magic")
  with pytest.raises(errors.UserError, match="known: policy"):
    hppo.parse_policies("policy,magic")


# ----------------------------------------------------------------------------- stage end to end


def _tiny_sft(tiny_world, workdir: str, catalog_offsets: bool) -> str:
  """Trains a 60-update tiny SFT model from scratch into `workdir`; without `catalog_offsets`
  it reads none (the default before 2026-12-03)."""
  config = sft_config.get_config("tiny")
  config.init_from, config.num_steps = "", 60
  if not catalog_offsets:
    config.model.catalog_offsets, config.diffusion.anchor_offset_step = (), 0.0
  training.train(config, str(tiny_world), workdir)
  return workdir


@pytest.fixture(scope="module")
def sft_workdir(tiny_world, tmp_path_factory, fast_compile):
  del fast_compile
  return _tiny_sft(tiny_world, str(tmp_path_factory.mktemp("sft")), catalog_offsets=True)


@pytest.fixture(scope="module")
def plain_sft_workdir(tiny_world, tmp_path_factory, fast_compile):
  del fast_compile
  return _tiny_sft(tiny_world, str(tmp_path_factory.mktemp("plain_sft")), catalog_offsets=False)


def _hppo_config(sft_workdir: str, **overrides):
  config = hppo_config.get_config("tiny")
  config.init_from = sft_workdir
  config.num_steps, config.checkpoint_every, config.hppo.pool_every = 40, 20, 20
  config.hppo.regress_steps = 0
  config.log_every = 10
  for key, value in overrides.items():
    config[key] = value
  return config


class _Killed(Exception):
  pass


def _assert_resumes_exactly(config, tiny_world, workdir, monkeypatch, kill_steps, full):
  """Kills the run in `workdir` at each of `kill_steps` in turn, resumes it to the end, and
  checks its parameters equal those of the uninterrupted state `full`."""
  calls = hppo.PairBatches.__call__

  def dies_at(kill_step):
    def call(self, step, *args):
      if step == kill_step:
        raise _Killed()
      return calls(self, step, *args)
    return call

  for kill_step in kill_steps:
    monkeypatch.setattr(hppo.PairBatches, "__call__", dies_at(kill_step))
    with pytest.raises(_Killed):
      training.train(config, str(tiny_world), str(workdir))
  monkeypatch.setattr(hppo.PairBatches, "__call__", calls)
  resumed = training.train(config, str(tiny_world), str(workdir))
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(full.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hppo_stage_trains_and_resumes_exactly(tiny_world, plain_sft_workdir, tmp_path,
                                               monkeypatch):
  # DPO pools are tested on the pool and model from before the catalog offsets: with the
  # `catalog_offset` candidates in the pool the tiny world's mean DPO loss over these 40
  # updates was 0.72, above log 2 (0.72 with the plain model, 1.31 with the anchored one).
  # The default HPPO run builds no pools (its 2,000 updates are the regression).
  config = _hppo_config(plain_sft_workdir)
  config.model.catalog_offsets, config.diffusion.anchor_offset_step = (), 0.0
  config.hppo.policies = ",".join(p for p in hppo.DEFAULT_POLICIES if p != "catalog_offset")
  full = training.train(config, str(tiny_world), str(tmp_path / "full"))

  records = [json.loads(line) for line in open(tmp_path / "full" / engine.METRICS_FILE)]
  pools = [r for r in records if "pool/kept_pairs" in r]
  assert [r["step"] for r in pools] == [0, 20]  # rebuilt every pool_every steps
  for r in pools:
    assert 0 < r["pool/kept_pairs"] <= r["pool/margin_pairs"] <= r["pool/candidate_pairs"]
  first = next(r for r in records if "dpo_loss" in r)
  assert 0 <= first["implicit_accuracy"] <= 1
  # It learns its pools' preferences: from the reference (margin 0, DPO loss log 2) the
  # winners' implicit reward rises above the losers'. Each value is one batch's, and every
  # pool brings new pairs, so neither is monotone.
  dpo = [r for r in records if "dpo_loss" in r]
  assert np.mean([r["implicit_margin"] for r in dpo]) > 0
  assert np.mean([r["dpo_loss"] for r in dpo]) < math.log(2)

  # Killed one step after the checkpoint (and pool rebuild) at 20, then resumed.
  _assert_resumes_exactly(config, tiny_world, tmp_path / "resumed", monkeypatch, (25,), full)


def test_regression_phase_then_pools_resume_exactly(tiny_world, sft_workdir, tmp_path,
                                                    monkeypatch):
  """Regression updates (no pairs) until hppo.regress_steps, then pools; killed in each phase.

  On a mesh of 2 of the 8 devices (`mesh_devices`, as `engine.train_mesh` picks 1 for wide CPU
  models): the pools are sampled over all 8 from the policy trained on the 2."""
  config = _hppo_config(sft_workdir, num_steps=40, checkpoint_every=10, log_every=5,
                        mesh_devices=2)
  config.hppo.regress_steps, config.hppo.pool_every = 20, 10
  full = training.train(config, str(tiny_world), str(tmp_path / "full"))
  records = [json.loads(line) for line in open(tmp_path / "full" / engine.METRICS_FILE)]
  # The targets once at step 0, then a pool every pool_every steps.
  assert [r["step"] for r in records if "pool/kept_pairs" in r] == [0, 20, 30]
  assert {r["step"] for r in records if "sft_error" in r} == {5, 10, 15, 20}
  assert min(r["step"] for r in records if "dpo_loss" in r) == 25

  # Killed after the checkpoint at 10 (regression), then after the one at 30 (pools).
  _assert_resumes_exactly(config, tiny_world, tmp_path / "resumed", monkeypatch, (13, 33), full)


def test_regression_targets_need_no_model(tiny_world, sft_workdir):
  """Every fit query, candidates of the model-free policies only, its best as the target."""
  config = _hppo_config(sft_workdir)
  config.hppo.every_domain = False  # the fit queries as they are (the option: the next test)
  cat = catalog_lib.load_catalog(tiny_world)
  params = engine.restore_params(sft_workdir)
  targets = _pool_builder(cat, config, params).build_policy_free()
  np.testing.assert_array_equal(targets.queries.seeds, query_split.fit_queries(cat).seeds)
  policies = {name.split(":")[0] for name in targets.names}
  assert policies == set(hppo.DEFAULT_POLICIES) - {"policy", "reference", "interpolation"}
  rows = np.arange(len(targets.queries))
  np.testing.assert_array_equal(targets.joint[rows, targets.best], targets.joint.max(axis=1))
  # The same targets whatever the policy's parameters (they are not read).
  zeros = jax.tree.map(np.zeros_like, params)
  again = _pool_builder(cat, config, zeros).build_policy_free()
  np.testing.assert_array_equal(again.candidates, targets.candidates)
  # Its batches carry no pair, and their loss is the SFT term alone.
  config.hppo.regress_steps = 20
  batches = hppo.PairBatches(_pool_builder(cat, config, params), config)
  batches.before_step(0, types.SimpleNamespace(params=params))
  batch = batches(0, 0, 1, 8)
  assert "winner" not in batch and batch["best"].shape == (8, cat.dim)
  model = models.make_model(config.model, cat.dim, cat.num_domains)
  space = models.target_space(config, model.dim)
  loss_fn = hppo.dpo_loss_fn(models.apply_fn(model), space, beta=2.0, sft_weight=5.0)
  loss, aux = loss_fn(params, jax.tree.map(jnp.asarray, batch), jax.random.PRNGKey(0), None)
  np.testing.assert_allclose(float(loss), 5.0 * float(aux["sft_error"]), rtol=1e-6)


def test_every_domain_asks_each_fit_seed_set_about_every_domain(tiny_world, sft_workdir):
  """`hppo.every_domain`: the fit seed sets under every domain, scored by the same oracle."""
  cat = catalog_lib.load_catalog(tiny_world)
  params = engine.restore_params(sft_workdir)
  config = _hppo_config(sft_workdir)
  config.hppo.every_domain = True
  targets = _pool_builder(cat, config, params).build_policy_free()
  fit = query_split.fit_queries(cat)
  fit_sets = {tuple(sorted(s)) for s in fit.seeds}
  rows = {(tuple(sorted(s)), int(m)) for s, m in zip(targets.queries.seeds, targets.queries.domain)}
  assert len(rows) == len(targets.queries) == len(fit_sets) * cat.num_domains
  assert rows == {(s, m) for s in fit_sets for m in range(cat.num_domains)}
  validation = {tuple(sorted(s)) for s in query_split.validation_queries(cat).seeds}
  assert not {s for s, _ in rows} & validation
  # A fit query's own (seeds, domain) gets the target it gets without the option.
  config.hppo.every_domain = False
  plain = _pool_builder(cat, config, params).build_policy_free()
  best = {(tuple(s), int(m)): c[b] for s, m, c, b in zip(
      targets.queries.seeds, targets.queries.domain, targets.candidates, targets.best)}
  for s, m, c, b in zip(plain.queries.seeds, plain.queries.domain, plain.candidates, plain.best):
    np.testing.assert_allclose(best[(tuple(s), int(m))], c[b], atol=1e-6)
  # The added domains are answered for their own domain: targets differ across a seed set's
  # domains (not one target copied four times).
  first = targets.queries.seeds[0]
  same_set = np.flatnonzero((targets.queries.seeds == first).all(axis=1))
  picked = targets.candidates[same_set, targets.best[same_set]]
  assert len(same_set) == cat.num_domains and not np.allclose(picked[0], picked[1:])


def test_leaving_out_policies_that_win_no_target_leaves_every_regression_batch(tiny_world,
                                                                             sft_workdir):
  """What `workflow.target_twin` relies on: the ablation would train exactly the main run."""
  cat = catalog_lib.load_catalog(tiny_world)
  params = engine.restore_params(sft_workdir)
  config = _hppo_config(sft_workdir)
  config.hppo.regress_steps = config.num_steps
  state = types.SimpleNamespace(params=params)

  def batches_and_shares(policies):
    config.hppo.policies = ",".join(policies)
    batches = hppo.PairBatches(_pool_builder(cat, config, params), config)
    scalars = batches.before_step(0, state)
    return batches, {p: scalars[hppo.BEST_SHARE_KEY + p] for p in policies}

  trained = hppo.policies_trained_on(config)
  full, shares = batches_and_shares(trained)
  never_best = [p for p in trained if shares[p] == 0.0]
  some_best = [p for p in trained if shares[p] > 0.0]
  assert never_best and some_best, shares  # the tiny world has both kinds
  steps = (0, 7, config.num_steps - 1)
  without, _ = batches_and_shares([p for p in trained if p not in never_best])
  for step in steps:
    a, b = full(step, 0, 1, 16), without(step, 0, 1, 16)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # Leaving out a policy that some query's target came from changes targets.
  without, _ = batches_and_shares([p for p in trained if p != some_best[0]])
  assert any(not np.array_equal(full(step, 0, 1, 64)["best"], without(step, 0, 1, 64)["best"])
             for step in steps)


def test_global_shift_candidates_step_along_the_observed_direction(tiny_world, sft_workdir):
  config = _hppo_config(sft_workdir)
  config.hppo.policies, config.hppo.global_steps = "seed_centroid,global_shift", (0.5, 2.0)
  cat = catalog_lib.load_catalog(tiny_world)
  targets = _pool_builder(cat, config, engine.restore_params(sft_workdir)).build_policy_free()
  assert targets.names == ["seed_centroid:mean", "global_shift:a0.5", "global_shift:a2"]
  centroid = evidence_lib.seed_centroids(cat.embeddings, targets.queries.seeds)
  direction = evidence_lib.global_directions(cat)[targets.queries.domain]
  for column, step in ((1, 0.5), (2, 2.0)):
    np.testing.assert_allclose(targets.candidates[:, column],
                               evidence_lib.normalize(centroid + step * direction), atol=1e-6)


def test_catalog_offset_candidates_are_the_offset_baselines_queries(tiny_world, sft_workdir):
  """c + a g_m + b (mean of the n nearest catalog items, held-out ones included, seeds never,
  minus the seeds' mean), read without labels: held-out items moved, the candidates move."""
  config = _hppo_config(sft_workdir)
  config.hppo.policies = "seed_centroid,catalog_offset"
  config.hppo.offset_size, config.hppo.offset_shifts, config.hppo.offset_steps = 7, (0.5,), (
      2.0, 6.0)
  cat = catalog_lib.load_catalog(tiny_world)
  params = engine.restore_params(sft_workdir)
  targets = _pool_builder(cat, config, params).build_policy_free()
  assert targets.names == ["seed_centroid:mean", "catalog_offset:a0.5b2",
                           "catalog_offset:a0.5b6"]
  emb = np.asarray(cat.embeddings, np.float64)
  centroid = evidence_lib.seed_centroids(cat.embeddings, targets.queries.seeds)
  direction = evidence_lib.global_directions(cat)[targets.queries.domain]
  for q in (0, 3, len(targets.queries) - 1):
    seeds = targets.queries.seeds[q]
    mean = emb[seeds].mean(0)
    sims = emb @ mean
    sims[seeds] = -np.inf
    offset = emb[np.argsort(-sims, kind="stable")[:7]].mean(0) - mean
    for column, step in ((1, 2.0), (2, 6.0)):
      want = centroid[q] + 0.5 * direction[q] + step * offset
      np.testing.assert_allclose(targets.candidates[q, column], want / np.linalg.norm(want),
                                 atol=1e-5)
  # Held-out items are read (their embeddings): moving them moves some candidates.
  heldout = np.asarray(cat.item_split) != 0
  moved = np.array(cat.embeddings)
  noise = np.random.default_rng(0).normal(size=(heldout.sum(), cat.dim)).astype(np.float32)
  moved[heldout] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
  other = _pool_builder(dataclasses.replace(cat, embeddings=moved), config,
                        params).build_policy_free()
  assert not np.allclose(other.candidates[:, 1:], targets.candidates[:, 1:])


def test_hidden_clusters_leave_the_targets_what_an_unseen_pattern_offers(tiny_world,
                                                                         sft_workdir):
  """hide_cluster_prob: a hidden query's neighbourhood skips its seeds' clusters, and its
  target is one of the candidates built without them."""
  config = _hppo_config(sft_workdir)
  cat = catalog_lib.load_catalog(tiny_world)
  params = engine.restore_params(sft_workdir)
  builder = _pool_builder(cat, config, params)
  visible = builder.build_policy_free()
  config.hppo.hide_cluster_prob = 1.0
  hidden = _pool_builder(cat, config, params).build_policy_free()
  assert visible.counts["hidden_queries"] == 0
  assert hidden.counts["hidden_queries"] == len(hidden.queries)
  names = np.array(hidden.names)
  policy_of = np.array([n.split(":")[0] for n in names])
  assert set(policy_of[hidden.best]) <= set(hppo.UNSEEN_PATTERN_POLICIES)
  rows = np.arange(len(hidden.queries))
  eligible = np.isin(policy_of, hppo.UNSEEN_PATTERN_POLICIES)
  np.testing.assert_array_equal(hidden.joint[rows, hidden.best],
                                hidden.joint[:, eligible].max(axis=1))
  # Only the neighbourhood candidates change, and they no longer read the hidden clusters'
  # labels: flipping the labels of one query's seed clusters leaves them (the observed ones
  # among those labels do move the global direction and the predictor's tail).
  neighbourhood = policy_of == "neighbourhood"
  np.testing.assert_array_equal(hidden.candidates[:, ~neighbourhood],
                                visible.candidates[:, ~neighbourhood])
  assert not np.allclose(hidden.candidates[:, neighbourhood],
                         visible.candidates[:, neighbourhood])
  source, _ = trajectories.build_source(cat, config.num_clusters, config.seed,
                                        config.metric_predictor)
  group_of = np.full(cat.num_items, -1)
  group_of[source.train_items] = source.assign
  query = 0
  in_hidden = np.isin(group_of, group_of[hidden.queries.seeds[query]])
  flipped = dataclasses.replace(
      cat, attributes=np.where(in_hidden[:, None], ~cat.attributes, cat.attributes))
  again = _pool_builder(flipped, config, params).build_policy_free()
  np.testing.assert_allclose(again.candidates[query, neighbourhood],
                             hidden.candidates[query, neighbourhood], atol=1e-6)
  assert not np.allclose(again.candidates[query, ~neighbourhood],
                         hidden.candidates[query, ~neighbourhood], atol=1e-6)
  # Pools of the model's candidates hide nothing (their evidence would be the visible one).
  with pytest.raises(ValueError, match="only the regression targets"):
    builder._candidates(params, hidden.queries.take(np.arange(2)), 0,  # pylint: disable=protected-access
                        np.zeros((2, 1), np.int64))


def test_hppo_config_errors(tiny_world, sft_workdir, tmp_path):
  with pytest.raises(errors.UserError, match="init_from"):
    training.train(_hppo_config(""), str(tiny_world), str(tmp_path / "a"))
  with pytest.raises(errors.UserError, match="multiple of hppo.pool_every"):
    training.train(_hppo_config(sft_workdir, checkpoint_every=30), str(tiny_world),
                   str(tmp_path / "b"))
  positions = _hppo_config(sft_workdir)
  positions.model.learned_positions = True
  with pytest.raises(errors.UserError, match="learned_positions"):
    training.train(positions, str(tiny_world), str(tmp_path / "c"))
  regress = _hppo_config(sft_workdir)
  regress.hppo.regress_steps = 30
  with pytest.raises(errors.UserError, match="regress_steps"):
    training.train(regress, str(tiny_world), str(tmp_path / "e"))
  hide = _hppo_config(sft_workdir)
  hide.hppo.hide_cluster_prob = 1.5
  with pytest.raises(errors.UserError, match="hide_cluster_prob"):
    training.train(hide, str(tiny_world), str(tmp_path / "f"))
  target = _hppo_config(sft_workdir)
  target.hppo.sft_target = "mean"
  with pytest.raises(errors.UserError, match="sft_target"):
    training.train(target, str(tiny_world), str(tmp_path / "d"))
  assert not (tmp_path / "d").exists()


def _pool_builder(cat, config, params) -> hppo.CandidatePools:
  """HPPO's pool builder on `cat` with the SFT model's `params` as policy and reference."""
  model = models.make_model(config.model, cat.dim, cat.num_domains)
  source, _ = trajectories.build_source(cat, config.num_clusters, config.seed,
                                        config.metric_predictor)
  oracle = oracle_lib.OnlineOracle(cat, k=20, index_kind="exact")
  return hppo.CandidatePools(cat, source, oracle, models.apply_fn(model), params, config,
                             model.num_domains, models.target_space(config, model.dim),
                             models.sample_temperature(config),
                             models.neighbour_evidence(config, cat, source.assign))


def test_an_ablations_targets_are_the_main_runs_less_a_policy(tiny_world, sft_workdir,
                                                             monkeypatch):
  """A candidate-policy ablation's regression targets come from the main run's policy-free
  candidates (`hppo._POLICY_FREE`), with no search: they equal a build of their own. A policy
  the kept candidates lack, or another config, builds anew."""
  config = _hppo_config(sft_workdir)
  cat = catalog_lib.load_catalog(tiny_world)
  params = engine.restore_params(sft_workdir)
  main = _pool_builder(cat, config, params).build_policy_free()
  config.hppo.policies = ",".join(p for p in hppo.DEFAULT_POLICIES if p != "feedback")
  scores = []
  score = oracle_lib.OnlineOracle.score
  monkeypatch.setattr(oracle_lib.OnlineOracle, "score",
                      lambda *a: scores.append(1) or score(*a))
  builder = _pool_builder(cat, config, params)
  ablation = builder.build_policy_free()
  assert not scores
  assert {n.split(":")[0] for n in ablation.names} == (
      {n.split(":")[0] for n in main.names} - {"feedback"})
  memo.clear_all()
  alone = builder.build_policy_free()
  assert scores
  assert alone.names == ablation.names and alone.counts == ablation.counts
  for field in ("candidates", "joint", "purity", "pairs", "best", "evidence"):
    np.testing.assert_array_equal(getattr(alone, field), getattr(ablation, field))
  # The kept candidates (the ablation's own now) lack feedback: the main run builds anew.
  scores.clear()
  config.hppo.policies = ",".join(hppo.DEFAULT_POLICIES)
  _pool_builder(cat, config, params).build_policy_free()
  assert scores
  scores.clear()
  config.hppo.neighbourhood_size = 50
  _pool_builder(cat, config, params).build_policy_free()
  assert scores


def test_pool_never_reads_held_out_truth(tiny_world, sft_workdir):
  """Poisoned held-out labels and patterns leave the pool (candidates and labels) unchanged."""
  config = _hppo_config(sft_workdir)
  cat = catalog_lib.load_catalog(tiny_world)
  held_out = cat.item_split != 0
  rng = np.random.default_rng(0)
  # Not written to disk: permuted held-out patterns would (rightly) fail the loader's checks.
  poisoned = dataclasses.replace(
      cat, patterns=np.where(held_out, rng.permutation(cat.patterns), cat.patterns),
      attributes=np.where(held_out[:, None], ~cat.attributes, cat.attributes))
  params = engine.restore_params(sft_workdir)
  pools = [_pool_builder(c, config, params).build(params, 0) for c in (cat, poisoned)]
  a, b = pools
  assert a.names == b.names and len(a.names) == 23  # 9 of them catalog_offset's
  np.testing.assert_array_equal(a.candidates, b.candidates)
  np.testing.assert_array_equal(a.joint, b.joint)
  np.testing.assert_array_equal(a.pairs, b.pairs)
  # Relevance feedback moves toward the oracle's hits: its rounds beat the seed centroid it
  # starts from on the pool's queries.
  names = np.array(a.names)
  centroid = a.joint[:, names == "seed_centroid:mean"][:, 0]
  for round_name in ("feedback:r1", "feedback:r2"):
    assert a.joint[:, names == round_name][:, 0].mean() > centroid.mean() + 0.05


def test_the_neighbourhood_policy_reads_train_labels_only_and_finds_hits(tiny_world,
                                                                         sft_workdir):
  """The optional policy: local_shift with the oracle's labels of train items."""
  config = _hppo_config(sft_workdir)
  config.hppo.policies = "seed_centroid,neighbourhood"
  config.hppo.neighbourhood_size, config.hppo.margin = 40, 0.05  # pairs among 4 candidates
  cat = catalog_lib.load_catalog(tiny_world)
  held_out = cat.item_split != 0
  poisoned = dataclasses.replace(
      cat, attributes=np.where(held_out[:, None], ~cat.attributes, cat.attributes))
  params = engine.restore_params(sft_workdir)
  a, b = (_pool_builder(c, config, params).build(params, 0) for c in (cat, poisoned))
  assert a.names == ["seed_centroid:mean", "neighbourhood:a2", "neighbourhood:a4",
                     "neighbourhood:a8"]
  np.testing.assert_array_equal(a.candidates, b.candidates)
  np.testing.assert_array_equal(a.joint, b.joint)
  # Not vacuous: the train labels it reads do move it.
  flipped = dataclasses.replace(
      cat, attributes=np.where(held_out[:, None], cat.attributes, ~cat.attributes))
  c = _pool_builder(flipped, config, params).build(params, 0)
  assert not np.allclose(a.candidates[:, 1:], c.candidates[:, 1:])
  assert a.joint[:, 1:].max(axis=1).mean() > a.joint[:, 0].mean() + 0.1
  with pytest.raises(errors.UserError, match="neighbourhood"):
    hppo.parse_policies("policy,neighbours")


def test_pools_draw_only_fit_queries(tiny_world, sft_workdir):
  """Validation queries choose knobs; no HPPO pool may train on them (query_split)."""
  config = _hppo_config(sft_workdir)
  cat = catalog_lib.load_catalog(tiny_world)
  params = engine.restore_params(sft_workdir)
  builder = _pool_builder(cat, config, params)
  fit = {tuple(s) for s in query_split.fit_queries(cat).seeds}
  validation = {tuple(s) for s in query_split.validation_queries(cat).seeds}
  for pool_index in range(3):
    drawn = {tuple(s) for s in builder.build(params, pool_index).queries.seeds}
    assert drawn and drawn <= fit and not drawn & validation


def test_pool_best_is_each_querys_highest_joint_then_purity(tiny_world, sft_workdir):
  config = _hppo_config(sft_workdir)
  cat = catalog_lib.load_catalog(tiny_world)
  params = engine.restore_params(sft_workdir)
  pool = _pool_builder(cat, config, params).build(params, 0)
  rows = np.arange(len(pool.queries))
  np.testing.assert_array_equal(pool.joint[rows, pool.best], pool.joint.max(axis=1))
  tied = pool.joint == pool.joint.max(axis=1, keepdims=True)
  np.testing.assert_array_equal(pool.purity[rows, pool.best],
                                np.where(tied, pool.purity, -1).max(axis=1))
  # The batches carry it as the SFT target, or not at all with sft_target "winner".
  config.hppo.sft_target = "best"
  batches = hppo.PairBatches(_pool_builder(cat, config, params), config)
  scalars = batches.before_step(0, types.SimpleNamespace(params=jax.tree.map(jnp.asarray,
                                                                            params)))
  assert batches(0, 0, 1, 8)["best"].shape == (8, cat.dim)
  # The logged share of queries each policy wins is that of the same best (ties by Purity).
  policy_of = np.array([name.split(":")[0] for name in pool.names])
  for policy in set(policy_of):
    assert scalars[f"pool/best_share/{policy}"] == pytest.approx(
        np.mean(policy_of[pool.best] == policy))
  config.hppo.sft_target = "winner"
  batches = hppo.PairBatches(_pool_builder(cat, config, params), config)
  batches.before_step(0, types.SimpleNamespace(params=jax.tree.map(jnp.asarray, params)))
  assert "best" not in batches(0, 0, 1, 8)
  config.hppo.sft_target = "mean"
  with pytest.raises(errors.UserError, match="sft_target"):
    hppo.PairBatches(_pool_builder(cat, config, params), config)


def test_a_model_that_reads_neighbour_evidence_trains_and_samples(tiny_world, tmp_path,
                                                                  fast_compile):
  """SFT and HPPO with neighbour evidence (modit_jax/evidence.py), a catalog offset and an
  anchor stepped along it, then sampling from it."""
  del fast_compile
  sizes = (5, 20)
  sft = sft_config.get_config("tiny")
  sft.init_from, sft.num_steps, sft.model.neighbour_evidence = "", 30, sizes
  sft.model.catalog_offsets, sft.diffusion.anchor_offset_step = (12,), 2.0
  training.train(sft, str(tiny_world), str(tmp_path / "sft"))
  assert engine.restore_params(str(tmp_path / "sft"))["evidence_slot"].shape == (6, 32)
  # HPPO's pools compute their queries' evidence and its pairs carry it: the model refuses a
  # batch without it, so a finished run shows both.
  config = _hppo_config(str(tmp_path / "sft"), num_steps=20)
  config.model.neighbour_evidence = sizes
  config.model.catalog_offsets, config.diffusion.anchor_offset_step = (12,), 2.0
  config.hppo.policies += ",catalog_offset"
  training.train(config, str(tiny_world), str(tmp_path / "hppo"))
  records = [json.loads(line) for line in open(tmp_path / "hppo" / engine.METRICS_FILE)]
  assert any("dpo_loss" in r for r in records)

  cat = catalog_lib.load_catalog(tiny_world)
  queries = cat.queries["item_holdout"].take(np.arange(6))
  context = np.asarray(cat.embeddings[queries.seeds], np.float32)
  mask = np.ones(queries.seeds.shape, bool)
  generator = generator_lib.Generator(str(tmp_path / "hppo"))
  assert generator.reads_evidence
  with pytest.raises(errors.UserError, match="bind_catalog"):
    generator.sample(context, mask, queries.domain)
  generator.bind_catalog(cat)
  out = generator.sample(context, mask, queries.domain, guidance_scale=4.0,
                         exclude_items=queries.seeds)
  assert out.shape == (6, 1, cat.dim)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
  # The answer depends on the observed labels near the seeds: flip them and it moves.
  flipped = dataclasses.replace(
      cat, attributes=np.where(cat.observed, ~cat.attributes, cat.attributes))
  generator.bind_catalog(flipped)
  moved = generator.sample(context, mask, queries.domain, guidance_scale=4.0,
                           exclude_items=queries.seeds)
  assert not np.allclose(out, moved, atol=1e-4)
  # A guidance grid samples the same rows once per scale: their evidence is computed once
  # (rebinding the catalog above forgot the earlier catalog's).
  calls = []
  compute = generator._evidence
  generator._evidence = lambda *args: calls.append(1) or compute(*args)
  again = generator.sample(context, mask, queries.domain, guidance_scale=4.0,
                           exclude_items=queries.seeds)
  np.testing.assert_array_equal(again, moved)
  generator.sample(context, mask, queries.domain, guidance_scale=1.0, exclude_items=queries.seeds)
  assert not calls
  generator.sample(context[:3], mask[:3], queries.domain[:3], exclude_items=queries.seeds[:3])
  assert len(calls) == 1

  # The serving bench serves it too (it once fed such a model no evidence and crashed).
  result = subprocess.run(
      [sys.executable, os.path.join(_REPO, "bench", "end_to_end.py"),
       f"--pipeline={tmp_path / 'hppo'}", "--seed_sets=16", "--batch_sizes=8", "--rounds=1"],
      cwd=_REPO, env=dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1"),
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert "not timed: the model reads neighbour evidence" in result.stdout
  assert re.search(r"^seed_sets_per_s@N=\d+,batch=8=\d", result.stdout, re.MULTILINE)
