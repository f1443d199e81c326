"""Tests for modit_jax.diffusion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import perturb

from modit_jax import diffusion
from modit_jax import dit
from modit_jax import errors
from modit_jax import models
from modit_jax import training

DIM = 8
NUM_DOMAINS = 3
NULL = NUM_DOMAINS


pytestmark = pytest.mark.usefixtures("fast_compile")


@functools.lru_cache(maxsize=None)
def _model():
  model = dit.tiny(DIM, NUM_DOMAINS)
  params = dit.init_params(model, jax.random.PRNGKey(0))
  apply_fn = jax.jit(lambda p, *args: model.apply({"params": p}, *args))
  return apply_fn, params


def _cond(batch=4, length=5, seed=1):
  rng = np.random.default_rng(seed)
  context = rng.normal(size=(batch, length, DIM)).astype(np.float32)
  mask = np.ones((batch, length), bool)
  mask[0, 3:] = False
  domain = rng.integers(0, NUM_DOMAINS, batch).astype(np.int32)
  return diffusion.Condition(jnp.asarray(context), jnp.asarray(mask), jnp.asarray(domain))


def _domain_echo(params, x_t, t, context, context_mask, domain):
  """A fake model whose prediction is its domain index, to observe condition handling."""
  del params, t, context, context_mask
  return jnp.broadcast_to(domain[:, None].astype(jnp.float32), x_t.shape)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _echo_loss(x0, cond, rng, null_domain, drop_prob):
  return diffusion.training_loss(_domain_echo, None, x0, cond, rng, null_domain, drop_prob)


def test_prediction_type_is_x0():
  assert diffusion.PREDICTION == "x0"


def test_alpha_bar_monotone_and_clipped():
  ab = np.asarray(diffusion.alpha_bar(jnp.linspace(0.0, 1.0, 1001)))
  assert np.all(np.diff(ab) <= 0)
  inner = np.asarray(diffusion.alpha_bar(jnp.linspace(0.01, 0.98, 500)))
  assert np.all(np.diff(inner) < 0)
  assert ab[0] > 0.9999 and ab[0] < 1.0
  assert 0 < ab[-1] <= 1e-3


def test_q_sample_endpoints():
  rng = np.random.default_rng(0)
  x0 = diffusion.l2_normalize(jnp.asarray(rng.normal(size=(64, DIM)), jnp.float32))
  noise = jnp.asarray(rng.normal(size=(64, DIM)), jnp.float32)
  near_zero = diffusion.q_sample(x0, jnp.zeros(64), noise)
  np.testing.assert_allclose(near_zero, x0, atol=2e-2)
  at_one = diffusion.q_sample(x0, jnp.ones(64), noise)
  np.testing.assert_allclose(at_one, noise, atol=2e-2)


def test_l2_normalize():
  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(diffusion.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


def test_denoising_error_matches_manual_computation():
  apply_fn, params = _model()
  params = perturb(params)
  cond = _cond()
  rng = np.random.default_rng(3)
  x0 = jnp.asarray(rng.normal(size=(4, DIM)), jnp.float32)
  noise = jnp.asarray(rng.normal(size=(4, DIM)), jnp.float32)
  t = jnp.array([0.0, 0.3, 0.7, 1.0])
  err = jax.jit(functools.partial(diffusion.denoising_error, apply_fn))(
      params, x0, t, noise, cond)
  x_t = diffusion.q_sample(x0, t, noise)
  pred = apply_fn(params, x_t, t, *cond)
  assert err.shape == (4,)
  np.testing.assert_allclose(err, np.mean((np.asarray(pred) - np.asarray(x0)) ** 2, -1),
                             rtol=1e-5)


@pytest.mark.parametrize("drop_prob", [0.0, 1.0])
def test_training_loss_condition_dropout(drop_prob):
  cond = _cond(batch=16)
  x0 = jnp.zeros((16, DIM))
  loss, errors = _echo_loss(x0, cond, jax.random.PRNGKey(0), NULL, drop_prob)
  expected = np.full(16, NULL) if drop_prob else np.asarray(cond.domain)
  np.testing.assert_allclose(errors, expected.astype(np.float32) ** 2)
  assert float(loss) == pytest.approx(float(np.mean(expected ** 2)))


def test_training_loss_drops_about_the_requested_fraction():
  cond = _cond(batch=4000)
  cond = cond._replace(domain=jnp.zeros(4000, jnp.int32))
  _, errors = _echo_loss(jnp.zeros((4000, DIM)), cond, jax.random.PRNGKey(1), 1, 0.1)
  assert 0.07 < float(jnp.mean(errors)) < 0.13  # Error is 1 exactly where dropped.


def test_guidance_scale_endpoints_and_extrapolation():
  apply_fn, params = _model()
  params = perturb(params)
  cond = _cond()
  x_t = jnp.asarray(np.random.default_rng(5).normal(size=(4, DIM)), jnp.float32)
  t = jnp.full((4,), 0.5)
  x0_cond = apply_fn(params, x_t, t, *cond)
  x0_uncond = apply_fn(params, x_t, t, cond.context, cond.context_mask,
                       jnp.full((4,), NULL, jnp.int32))
  assert np.abs(np.asarray(x0_cond - x0_uncond)).max() > 1e-3
  guided = functools.partial(diffusion.guided_prediction, apply_fn, params, x_t, t, cond, NULL)
  # Python scales take the one-branch shortcut; array scales take the batched two-branch path.
  for scale in (0.0, jnp.float32(0.0)):
    np.testing.assert_allclose(guided(scale), x0_uncond, atol=1e-5)
  for scale in (1.0, jnp.float32(1.0)):
    np.testing.assert_allclose(guided(scale), x0_cond, atol=1e-5)
  np.testing.assert_allclose(guided(3.0), x0_uncond + 3.0 * (x0_cond - x0_uncond), atol=1e-4)
  per_example = jnp.array([0.0, 1.0, 2.0, 0.5])
  np.testing.assert_allclose(
      guided(per_example), x0_uncond + per_example[:, None] * (x0_cond - x0_uncond), atol=1e-4)


def test_guidance_needs_null_domain():
  apply_fn, params = _model()
  with pytest.raises(ValueError, match="null_domain"):
    diffusion.guided_prediction(apply_fn, params, jnp.zeros((4, DIM)), jnp.zeros(4), _cond(),
                                None, 2.0)


@functools.lru_cache(maxsize=None)
def _sampler(num_steps=4):
  """A jitted DDIM sampler; guidance scale and eta are traced, so one compile serves all."""
  apply_fn, _ = _model()

  @jax.jit
  def sample(params, cond, rng, guidance_scale, eta):
    return diffusion.ddim_sample(apply_fn, params, cond, rng, DIM, num_steps,
                                 guidance_scale=guidance_scale, null_domain=NULL, eta=eta)
  return sample


def test_ddim_sample_shape_norm_and_determinism():
  _, params = _model()
  params = perturb(params)
  cond = _cond()
  sample = _sampler()
  a = np.asarray(sample(params, cond, jax.random.PRNGKey(0), 2.0, 0.0))
  b = np.asarray(sample(params, cond, jax.random.PRNGKey(0), 2.0, 0.0))
  c = np.asarray(sample(params, cond, jax.random.PRNGKey(1), 2.0, 0.0))
  assert a.shape == (4, DIM) and a.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-3


def test_ddim_guidance_and_eta_change_the_sample():
  _, params = _model()
  params = perturb(params)
  cond = _cond()
  sample = functools.partial(_sampler(), params, cond, jax.random.PRNGKey(0))
  base = np.asarray(sample(1.0, 0.0))
  for other in (sample(1.0, 1.0), sample(3.0, 0.0)):
    other = np.asarray(other)
    assert np.all(np.isfinite(other))
    np.testing.assert_allclose(np.linalg.norm(other, axis=-1), 1.0, atol=1e-5)
    assert np.abs(base - other).max() > 1e-3


def test_ddim_returns_final_x0_prediction():
  # A zero-initialised model predicts x0 = 0 at every step; returning anything but the final x0
  # prediction (e.g. a last noisy DDIM update) would give a non-zero sample.
  apply_fn, params = _model()
  out = jax.jit(functools.partial(diffusion.ddim_sample, apply_fn, dim=DIM, num_steps=3,
                                  normalize=False))(params, _cond(), jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def _toy_batch(rng, batch, length=4):
  """Contexts of 2..length random unit items; target = normalised mean of the real items."""
  items_rng, len_rng, dom_rng = jax.random.split(rng, 3)
  context = diffusion.l2_normalize(jax.random.normal(items_rng, (batch, length, DIM)))
  lengths = jax.random.randint(len_rng, (batch,), 2, length + 1)
  mask = jnp.arange(length)[None, :] < lengths[:, None]
  x0 = diffusion.l2_normalize(jnp.sum(context * mask[..., None], axis=1))
  domain = jax.random.randint(dom_rng, (batch,), 0, NUM_DOMAINS)
  return x0, diffusion.Condition(context, mask, domain)


def test_training_lowers_loss_and_samples_approach_target():
  apply_fn, params = _model()
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)
  eval_x0, eval_cond = _toy_batch(jax.random.PRNGKey(123), 512)

  @jax.jit
  def eval_loss(params):
    # Fixed t, noise and no dropout, so losses before and after training are comparable.
    loss, _ = diffusion.training_loss(apply_fn, params, eval_x0, eval_cond,
                                      jax.random.PRNGKey(7), NULL, cond_drop_prob=0.0)
    return loss

  @jax.jit
  def train_steps(params, opt_state, rng):
    def step(carry, rng):
      params, opt_state = carry
      data_rng, loss_rng = jax.random.split(rng)
      x0, cond = _toy_batch(data_rng, 64)
      grads = jax.grad(lambda p: diffusion.training_loss(apply_fn, p, x0, cond, loss_rng,
                                                         NULL)[0])(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, opt_state), _ = jax.lax.scan(step, (params, opt_state), jax.random.split(rng, 150))
    return params, opt_state

  initial = float(eval_loss(params))
  params, opt_state = train_steps(params, opt_state, jax.random.PRNGKey(0))
  final = float(eval_loss(params))
  assert initial == pytest.approx(1.0 / DIM, rel=1e-5)  # Zero output at init: mean(x0^2).
  assert final < 0.2 * initial  # Reaches < 0.01x in practice: the target is learnable.

  samples = _sampler()(params, eval_cond, jax.random.PRNGKey(9), 1.0, 0.0)
  cosine = float(jnp.mean(jnp.sum(samples * eval_x0, axis=-1)))
  # Random unit vectors in 8 dims have cosine ~0 +- 0.35; the mean over 512 is ~0 +- 0.02.
  assert cosine > 0.8


def test_anchored_space_round_trips_and_starts_at_the_seed_centroid():
  cond = _cond()
  target = diffusion.l2_normalize(jax.random.normal(jax.random.PRNGKey(3), (4, DIM)))
  space = diffusion.TargetSpace(5.0, anchored=True)
  x0 = space.encode(target, cond)
  # x0 is the scaled displacement from the real context items' mean (padding ignored).
  mask = np.asarray(cond.context_mask)[..., None]
  mean = (np.asarray(cond.context) * mask).sum(1) / mask.sum(1)
  np.testing.assert_allclose(np.asarray(x0), 5.0 * (np.asarray(target) - mean), atol=1e-5)
  np.testing.assert_allclose(np.asarray(space.decode(x0, cond)), np.asarray(target), atol=1e-5)
  # A fresh (zero-output) model samples exactly the normalised seed centroid when anchored,
  # whatever the noise; unanchored, its x0 = 0 carries no direction at all.
  apply_fn, params = _model()
  sample = jax.jit(functools.partial(diffusion.ddim_sample, apply_fn, dim=DIM, num_steps=3,
                                     space=space))
  centroid = mean / np.linalg.norm(mean, axis=1, keepdims=True)
  for key in (0, 1):
    np.testing.assert_allclose(np.asarray(sample(params, cond, jax.random.PRNGKey(key))),
                               centroid, atol=1e-5)


def test_an_offset_anchor_steps_along_its_evidence_token():
  """anchor_offset_step: x0 = scale (e - mean - step * evidence[token] / scale)."""
  cond = _cond()
  evidence = jax.random.normal(jax.random.PRNGKey(5), (4, 3, DIM))
  cond = cond._replace(evidence=evidence)
  target = diffusion.l2_normalize(jax.random.normal(jax.random.PRNGKey(3), (4, DIM)))
  space = diffusion.TargetSpace(5.0, anchored=True, offset_token=2, offset_step=4.0)
  mask = np.asarray(cond.context_mask)[..., None]
  mean = (np.asarray(cond.context) * mask).sum(1) / mask.sum(1)
  anchor = mean + 4.0 / 5.0 * np.asarray(evidence)[:, 2]
  x0 = space.encode(target, cond)
  np.testing.assert_allclose(np.asarray(x0), 5.0 * (np.asarray(target) - anchor), atol=1e-5)
  np.testing.assert_allclose(np.asarray(space.decode(x0, cond)), np.asarray(target), atol=1e-5)
  zero = np.asarray(space.decode(jnp.zeros_like(x0), cond))
  np.testing.assert_allclose(zero, anchor / np.linalg.norm(anchor, axis=1, keepdims=True),
                             atol=1e-5)


def test_an_offset_anchor_needs_catalog_offsets():
  config = training.default_config("tiny")
  config.diffusion.target_scale, config.diffusion.anchor_offset_step = 3.0, 6.0
  with pytest.raises(errors.UserError, match="anchor_offset_step"):
    models.target_space(config, DIM)
  config.model.neighbour_evidence, config.model.catalog_offsets = (5, 9), (20, 40)
  space = models.target_space(config, DIM)
  # g_m, two tokens per labelled size, then the catalog offsets: the first is token 5.
  assert (space.offset_token, space.offset_step, space.anchored) == (5, 6.0, True)
  config.diffusion.anchored = False
  with pytest.raises(errors.UserError, match="anchor_offset_step"):
    models.target_space(config, DIM)


def test_temperature_zero_is_deterministic_and_central():
  _, params = _model()
  params = perturb(params)
  cond = _cond()
  sample = jax.jit(functools.partial(diffusion.ddim_sample, _model()[0], dim=DIM, num_steps=4,
                                     null_domain=NULL),
                   static_argnames=("temperature",))
  cold = [np.asarray(sample(params, cond, jax.random.PRNGKey(k), temperature=0.0))
          for k in (0, 1)]
  warm = [np.asarray(sample(params, cond, jax.random.PRNGKey(k), temperature=1.0))
          for k in (0, 1)]
  # Temperature 0 leaves nothing random (eta = 0): every key gives the same query.
  np.testing.assert_array_equal(cold[0], cold[1])
  assert np.abs(warm[0] - warm[1]).max() > 1e-3
  np.testing.assert_allclose(np.linalg.norm(cold[0], axis=-1), 1.0, atol=1e-5)
