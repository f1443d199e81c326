"""Tests for modit_jax.dit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturb

from configs import pretrain as pretrain_config
from modit_jax import dit
from modit_jax import engine
from modit_jax import models

DIM = 8
NUM_DOMAINS = 3


pytestmark = pytest.mark.usefixtures("fast_compile")


def _inputs(batch=4, length=5, seed=1):
  rng = np.random.default_rng(seed)
  x_t = rng.normal(size=(batch, DIM)).astype(np.float32)
  t = rng.random(batch).astype(np.float32)
  context = rng.normal(size=(batch, length, DIM)).astype(np.float32)
  mask = np.ones((batch, length), bool)
  domain = rng.integers(0, NUM_DOMAINS, batch).astype(np.int32)
  return x_t, t, context, mask, domain


@functools.lru_cache(maxsize=None)
def _model(learned_positions=False, dtype=jnp.float32):
  """A tiny model, its init params and a jitted apply; cached so tests share compilations."""
  model = dit.tiny(DIM, NUM_DOMAINS, learned_positions=learned_positions, dtype=dtype)
  params = dit.init_params(model, jax.random.PRNGKey(0))
  apply = jax.jit(lambda p, *args: model.apply({"params": p}, *args))
  return params, apply


def _perturbed(learned_positions=False, dtype=jnp.float32):
  params, apply = _model(learned_positions, dtype)
  return perturb(params), apply


def test_output_shape_dtype_and_zero_at_init():
  params, apply = _model()
  out = apply(params, *_inputs())
  assert out.shape == (4, DIM)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)  # adaLN-Zero and zero output layer.


def test_nonzero_after_perturbing_params():
  params, apply = _perturbed()
  out = np.asarray(apply(params, *_inputs()))
  assert np.all(np.isfinite(out))
  assert np.abs(out).mean() > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_output():
  params, apply = _perturbed(dtype=jnp.bfloat16)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  out = apply(params, *_inputs())
  assert out.dtype == jnp.float32 and out.shape == (4, DIM)
  assert np.all(np.isfinite(np.asarray(out)))
  reference, apply32 = _perturbed()
  np.testing.assert_allclose(out, apply32(reference, *_inputs()), atol=0.1, rtol=0.1)


def test_low_precision_matmul_gradients_match_float32_autodiff():
  # Operands that bfloat16 holds exactly, so only the custom VJP's rounding of the output
  # gradient to bfloat16 (for dx) separates it from float32 autodiff; a wrong contraction or
  # a swapped gradient would be off by far more.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
  r = jnp.asarray(rng.normal(size=(3, 5, 8)), jnp.float32)

  def loss(matmul, x, w):
    return jnp.sum(matmul(x, w) * r)

  # pylint: disable=protected-access
  dx, dw = jax.grad(functools.partial(loss, dit._low_precision_matmul), argnums=(0, 1))(x, w)
  reference = lambda x, w: jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
  rx, rw = jax.grad(functools.partial(loss, reference), argnums=(0, 1))(
      x.astype(jnp.float32), w.astype(jnp.float32))
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  assert dit._low_precision_matmul(x, w).dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(dx, np.float32), rx, rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(np.asarray(dw, np.float32), rw, rtol=2e-2, atol=2e-2)


def test_bfloat16_parameter_gradients_agree_with_float32():
  # Mixed precision must train the same model: the gradient of a loss with respect to every
  # parameter points the same way as in float32. A small perturbation keeps the model in a
  # trained-like regime (conftest's default makes outputs 5x the target's size, where bfloat16
  # rounding is amplified); a wrong or missing gradient would give a cosine far from 1.
  params = perturb(_model()[0], scale=0.05)
  inputs = _inputs(batch=8)
  target = jnp.asarray(np.random.default_rng(2).normal(size=(8, DIM)), jnp.float32)

  def grads(dtype):
    model = dit.tiny(DIM, NUM_DOMAINS, dtype=dtype)
    loss = lambda p: jnp.mean((model.apply({"params": p}, *inputs) - target) ** 2)
    return jax.jit(jax.grad(loss))(params)

  g16, g32 = grads(jnp.bfloat16), grads(jnp.float32)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(g16))
  flat16 = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(g16)])
  flat32 = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(g32)])
  cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
  assert cosine > 0.999, cosine
  assert abs(np.linalg.norm(flat16) / np.linalg.norm(flat32) - 1) < 0.01


def test_bfloat16_train_step_sharded_matches_single_device():
  # The custom VJP under the engine's jitted step: batch split over 8 devices, weight
  # gradients summed across them, against one device. Accumulation order may differ between
  # layouts and bfloat16 rounds what it feeds the matmuls, hence rtol 1e-3. A gradient missing
  # its cross-device sum would come from 2 of the 16 examples and point elsewhere; the first
  # Adam updates are about +-lr per parameter, so a flipped sign moves a parameter by 2e-2.
  config = pretrain_config.get_config("tiny")
  config.model.dtype = "bfloat16"
  config.batch_size = 16
  config.warmup_steps = 1  # full-size updates from the first step, so parameters really move
  config.learning_rate = 1e-2
  model = models.make_model(config.model, DIM, NUM_DOMAINS)
  loss_fn = models.denoising_loss_fn(model, config)
  tx = engine.make_optimizer(config)
  host_state = engine.create_train_state(dit.init_params(model, jax.random.PRNGKey(0)), tx)
  rng = np.random.default_rng(0)
  batches = [{"context": rng.normal(size=(16, 5, DIM)).astype(np.float32),
              "context_mask": rng.random((16, 5)) < 0.8,
              "domain": rng.integers(0, NUM_DOMAINS + 1, 16).astype(np.int32),
              "target": rng.normal(size=(16, DIM)).astype(np.float32)} for _ in range(3)]

  def run(num_devices):
    mesh = engine.make_mesh(num_devices)
    shardings = engine.param_sharding(host_state, mesh, fsdp=False)
    state = engine.device_put_global(host_state, shardings)
    step_fn = engine.jit_train_step(loss_fn, tx, config.ema_decay, mesh, shardings)
    key = engine.device_put_global(jax.random.PRNGKey(1), engine.replicated(mesh))
    losses = []
    for batch in batches:
      state, metrics = step_fn(state, engine.shard_batch(batch, mesh), key)
      losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses

  single, single_losses = run(1)
  sharded, sharded_losses = run(8)
  # The steps moved the parameters by far more than the tolerance below.
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(single),
                                                jax.tree_util.tree_leaves(host_state.params))]
  assert min(moved) > 1e-3, min(moved)
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-3)
  for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(single)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("learned_positions", [False, True])
def test_padding_invariance(learned_positions):
  params, apply = _perturbed(learned_positions)
  x_t, t, context, mask, domain = _inputs(length=3)
  ref = apply(params, x_t, t, context, mask, domain)
  rng = np.random.default_rng(7)
  for length in (5, dit.tiny(DIM, NUM_DOMAINS).max_context):
    pad = length - 3
    garbage = rng.normal(scale=100.0, size=(4, pad, DIM)).astype(np.float32)
    garbage[0, 0, 0] = np.nan  # Even non-finite padding must not leak.
    padded = np.concatenate([context, garbage], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((4, pad), bool)], axis=1)
    out = apply(params, x_t, t, padded, padded_mask, domain)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_ragged_batch_rows_are_independent():
  params, apply = _perturbed()
  x_t, t, context, mask, domain = _inputs()
  mask[0, 3:] = False  # Row 0 has three real items, the others five.
  out = apply(params, x_t, t, context, mask, domain)
  short = apply(params, x_t, t, context[:, :3], mask[:, :3], domain)
  np.testing.assert_allclose(out[0], short[0], atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(out[1:] - short[1:])).max() > 1e-3  # Real items do matter.


def test_permutation_invariance_without_positions():
  params, apply = _perturbed(learned_positions=False)
  x_t, t, context, mask, domain = _inputs()
  mask[0, 1] = False  # A padded slot in the middle, moved around by the permutation too.
  perm = np.array([3, 0, 4, 1, 2])
  out = apply(params, x_t, t, context, mask, domain)
  out_perm = apply(params, x_t, t, context[:, perm], mask[:, perm], domain)
  np.testing.assert_allclose(out_perm, out, atol=1e-5, rtol=1e-5)


def test_order_matters_with_learned_positions():
  params, apply = _perturbed(learned_positions=True)
  x_t, t, context, mask, domain = _inputs()
  perm = np.array([3, 0, 4, 1, 2])
  out = np.asarray(apply(params, x_t, t, context, mask, domain))
  out_perm = np.asarray(apply(params, x_t, t, context[:, perm], mask[:, perm], domain))
  assert np.abs(out_perm - out).max() > 1e-3


def test_domain_token_matters_and_null_domain_is_valid():
  params, apply = _perturbed()
  x_t, t, context, mask, _ = _inputs()
  outs = [np.asarray(apply(params, x_t, t, context, mask, np.full(4, d, np.int32)))
          for d in range(NUM_DOMAINS + 1)]  # The last one is the null domain.
  assert all(np.all(np.isfinite(o)) for o in outs)
  for i in range(len(outs)):
    for j in range(i):
      assert np.abs(outs[i] - outs[j]).max() > 1e-3


def test_time_conditioning_matters():
  params, apply = _perturbed()
  x_t, _, context, mask, domain = _inputs()
  a = np.asarray(apply(params, x_t, np.full(4, 0.1, np.float32), context, mask, domain))
  b = np.asarray(apply(params, x_t, np.full(4, 0.9, np.float32), context, mask, domain))
  assert np.abs(a - b).max() > 1e-3


def test_context_longer_than_max_context_is_rejected():
  model = dit.tiny(DIM, NUM_DOMAINS, max_context=4)
  inputs = _inputs()
  with pytest.raises(ValueError, match="max_context"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs))


def test_flops_positive_and_grow_with_depth_and_context():
  shallow = dit.DiT(dim=64, num_domains=3, depth=2)
  deep = dit.DiT(dim=64, num_domains=3, depth=4)
  f2, f4 = dit.flops_per_example(shallow, 8), dit.flops_per_example(deep, 8)
  assert 0 < f2 < f4
  assert dit.flops_per_example(deep, 16) > f4
  # Every block but the last (query token only) costs the same: linear in depth.
  f3 = dit.flops_per_example(dit.DiT(dim=64, num_domains=3, depth=3), 8)
  assert f3 - f2 == pytest.approx((f4 - f2) / 2)
  assert 2.0 < f4 / f2 < 3.0


@pytest.mark.parametrize("overrides", [{}, {"depth": 3, "width": 64}])
def test_flops_match_xla_cost_analysis(overrides):
  model = dit.tiny(DIM, NUM_DOMAINS, **overrides)
  params = jax.eval_shape(lambda: dit.init_params(model, jax.random.PRNGKey(0)))
  inputs = _inputs(length=model.max_context)
  lowered = jax.jit(lambda p, *args: model.apply({"params": p}, *args)).lower(params, *inputs)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = cost["flops"] / inputs[0].shape[0]
  ours = dit.flops_per_example(model, model.max_context)
  # XLA also counts elementwise ops (norms, softmax, activations), which we leave out.
  assert 0.85 * xla_flops < ours <= xla_flops
