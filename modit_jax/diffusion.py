"""Continuous-time Gaussian diffusion over query embeddings (DESIGN.md 5, docs/diffusion.md).

Cosine schedule, x0-prediction, classifier-free guidance over the domain with a learned null
domain, and a DDIM sampler. Everything is a pure function of explicit params and PRNG keys; the
model is passed in as `apply_fn(params, x_t, t, context, context_mask, domain[, evidence])
-> x0_hat` (evidence only for a model that reads it).
"""

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

# The model predicts the clean embedding x0 (see docs/diffusion.md for why not eps).
PREDICTION = "x0"

# Cosine schedule offset (Nichol & Dhariwal 2021) and clip range: alpha_bar never reaches 0 (so
# the implied eps stays finite at t = 1) nor 1 (so 1 - alpha_bar stays positive at t = 0).
_COSINE_OFFSET = 0.008
ALPHA_BAR_MIN = 1e-4
ALPHA_BAR_MAX = 1.0 - 1e-5

ApplyFn = Callable[..., jnp.ndarray]


class Condition(NamedTuple):
  """What the denoiser is conditioned on besides x_t and t."""
  context: jnp.ndarray       # float [B, L, d] item embeddings
  context_mask: jnp.ndarray  # bool [B, L], True = real item
  domain: jnp.ndarray        # int32 [B], num_domains = null domain
  evidence: jnp.ndarray | None = None  # float [B, E, d] (modit_jax/evidence.py), or None


def apply_condition(apply_fn: ApplyFn, params: Any, x_t: jnp.ndarray, t: jnp.ndarray,
                    cond: Condition) -> jnp.ndarray:
  """`apply_fn` on `cond`; the evidence argument is passed only when there is evidence."""
  args = cond if cond.evidence is not None else cond[:3]
  return apply_fn(params, x_t, t, *args)


def l2_normalize(x: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
  """Scales the rows (last axis) of x to unit L2 norm."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def context_mean(context: jnp.ndarray, context_mask: jnp.ndarray) -> jnp.ndarray:
  """Mean [B, d] of the real items of contexts [B, L, d] (zeros for an empty context)."""
  mask = context_mask.astype(context.dtype)[..., None]
  total = jnp.sum(jnp.where(context_mask[..., None], context, 0), axis=1)
  return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class TargetSpace(NamedTuple):
  """How a unit query embedding maps to the diffusion's clean sample x0, and back.

  `anchored=False`: x0 = scale * e. `anchored=True`: x0 = scale * (e - mean(context)), so the
  model generates the query's displacement from its seeds' mean: a fresh model (which predicts
  0) answers with the seed centroid, and the schedule's noise acts on the displacement alone
  (docs/diffusion.md, "Anchored targets"). Hashable, so it can be a static jit argument.
  """
  scale: float
  anchored: bool = False
  # With `offset_step` > 0 the anchor also steps that far along evidence token `offset_token`
  # (a catalog offset, `model.catalog_offsets`, stored times `scale`): a fresh model answers
  # with the seeds' mean moved toward the rest of their catalog neighbourhood.
  offset_token: int = -1
  offset_step: float = 0.0

  def anchor(self, cond: Condition) -> jnp.ndarray:
    """float32 [B, d]: the point a model's zero output decodes to (before normalising)."""
    out = context_mean(cond.context, cond.context_mask).astype(jnp.float32)
    if self.offset_step:
      if cond.evidence is None:
        raise ValueError("an anchor stepped along a catalog offset needs the evidence tokens")
      out = out + (self.offset_step / self.scale) * cond.evidence[:, self.offset_token].astype(
          jnp.float32)
    return out

  def encode(self, embedding: jnp.ndarray, cond: Condition) -> jnp.ndarray:
    """x0 [B, d] of unit embeddings [B, d] under their condition."""
    if self.anchored:
      embedding = embedding - self.anchor(cond)
    return embedding * self.scale

  def decode(self, x0: jnp.ndarray, cond: Condition) -> jnp.ndarray:
    """Unit query embeddings [B, d] of (predicted) x0 [B, d]."""
    x = x0.astype(jnp.float32) / self.scale
    if self.anchored:
      x = x + self.anchor(cond)
    return l2_normalize(x)


def alpha_bar(t: jnp.ndarray) -> jnp.ndarray:
  """Cosine-schedule signal fraction at time t in [0, 1]; decreasing, clipped to (0, 1)."""
  t = jnp.asarray(t, jnp.float32)
  s = _COSINE_OFFSET
  f = jnp.cos((t + s) / (1 + s) * (math.pi / 2)) ** 2
  f0 = math.cos(s / (1 + s) * (math.pi / 2)) ** 2
  return jnp.clip(f / f0, ALPHA_BAR_MIN, ALPHA_BAR_MAX)


def q_sample(x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """Noises x0 [B, d] to time t [B]: sqrt(ab) x0 + sqrt(1 - ab) noise."""
  ab = alpha_bar(t)[:, None]
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise


def denoising_error(apply_fn: ApplyFn, params: Any, x0: jnp.ndarray, t: jnp.ndarray,
                    noise: jnp.ndarray, cond: Condition) -> jnp.ndarray:
  """Per-example error [B]: mean over d of (x0_hat - x0)^2 at the given t and noise.

  Kept per example (and with t and noise passed in) so Diffusion-DPO can score a winner and a
  loser under the same t, noise and condition.
  """
  x_t = q_sample(x0, t, noise)
  x0_hat = apply_condition(apply_fn, params, x_t, t, cond)
  return jnp.mean(jnp.square(x0_hat.astype(jnp.float32) - x0.astype(jnp.float32)), axis=-1)


def training_loss(apply_fn: ApplyFn, params: Any, x0: jnp.ndarray, cond: Condition,
                  rng: jax.Array, null_domain: int,
                  cond_drop_prob: float = 0.1) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Denoising loss with t ~ U(0, 1) and domain dropout to `null_domain` (for CFG).

  Returns (mean loss, per-example errors [B]).
  """
  batch = x0.shape[0]
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  t = jax.random.uniform(t_rng, (batch,), jnp.float32)
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  drop = jax.random.bernoulli(drop_rng, cond_drop_prob, (batch,))
  cond = cond._replace(domain=jnp.where(drop, null_domain, cond.domain).astype(jnp.int32))
  errors = denoising_error(apply_fn, params, x0, t, noise, cond)
  return jnp.mean(errors), errors


def _is_static(scale: Any, value: float) -> bool:
  # Only concrete Python/NumPy numbers can pick a branch at trace time; arrays never do.
  return isinstance(scale, numbers.Real) and float(scale) == value


def guided_prediction(apply_fn: ApplyFn, params: Any, x_t: jnp.ndarray, t: jnp.ndarray,
                      cond: Condition, null_domain: int | None,
                      guidance_scale: Any) -> jnp.ndarray:
  """Classifier-free guided x0: x0_uncond + s * (x0_cond - x0_uncond).

  The unconditional branch keeps the seed context and only swaps the domain for the null domain,
  so guidance amplifies the domain direction while the seeds anchor the pattern. `guidance_scale`
  is a scalar or a per-example [B] array. A Python scale of exactly 1 (or 0) needs only one
  branch, so only that one is evaluated; otherwise both run in one batched call.
  """
  if _is_static(guidance_scale, 1.0):
    return apply_condition(apply_fn, params, x_t, t, cond)
  if null_domain is None:
    raise ValueError("null_domain is required when guidance_scale != 1")
  null = jnp.full_like(cond.domain, null_domain)
  if _is_static(guidance_scale, 0.0):
    return apply_condition(apply_fn, params, x_t, t, cond._replace(domain=null))
  both = lambda a: None if a is None else jnp.concatenate([a, a], axis=0)
  doubled = Condition(*map(both, cond))._replace(
      domain=jnp.concatenate([cond.domain, null], axis=0))
  x0_both = apply_condition(apply_fn, params, both(x_t), both(t), doubled)
  x0_cond, x0_uncond = jnp.split(x0_both, 2, axis=0)
  scale = jnp.asarray(guidance_scale, jnp.float32)
  if scale.ndim == 1:
    scale = scale[:, None]
  return x0_uncond + scale * (x0_cond - x0_uncond)


def ddim_sample(apply_fn: ApplyFn, params: Any, cond: Condition, rng: jax.Array, dim: int,
                num_steps: int, guidance_scale: Any = 1.0, null_domain: int | None = None,
                eta: float = 0.0, normalize: bool = True,
                space: TargetSpace = TargetSpace(1.0), temperature: float = 1.0) -> jnp.ndarray:
  """Samples query embeddings [B, dim] by DDIM from t = 1 to t = 0 in `num_steps` model calls.

  Starts from x_1 ~ N(0, temperature^2 I): temperature 1 samples the learned distribution, 0
  follows the deterministic path from x_1 = 0 (the model's most central answer; nothing random
  is left with eta = 0). Uses the (guided) x0 prediction at each step; eta = 0 is
  deterministic given `rng`. The last step returns the x0 prediction itself, mapped back to a
  unit embedding by `space` when `normalize` (raw x0 otherwise). Jittable with `apply_fn`, `dim`, `num_steps`, `normalize` and
  `space` static (and `guidance_scale` static when it should skip a CFG branch).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  batch = cond.domain.shape[0]
  init_rng, step_rng = jax.random.split(rng)
  x = temperature * jax.random.normal(init_rng, (batch, dim), jnp.float32)

  def predict(x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    return guided_prediction(apply_fn, params, x, jnp.full((batch,), t, jnp.float32), cond,
                             null_domain, guidance_scale)

  def step(i: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    t = 1.0 - i / num_steps
    s = 1.0 - (i + 1) / num_steps
    ab_t, ab_s = alpha_bar(t), alpha_bar(s)
    x0_hat = predict(x, t)
    eps_hat = (x - jnp.sqrt(ab_t) * x0_hat) / jnp.sqrt(1 - ab_t)
    sigma = eta * jnp.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
    z = jax.random.normal(jax.random.fold_in(step_rng, i), x.shape, jnp.float32)
    dir_scale = jnp.sqrt(jnp.maximum(1 - ab_s - sigma ** 2, 0.0))
    return jnp.sqrt(ab_s) * x0_hat + dir_scale * eps_hat + sigma * z

  x = jax.lax.fori_loop(0, num_steps - 1, step, x)
  out = predict(x, 1.0 / num_steps)
  return space.decode(out, cond) if normalize else out


def sample_rows(params: Any, context: jnp.ndarray, context_mask: jnp.ndarray,
                domain: jnp.ndarray, guidance_scale: jnp.ndarray, rng: jax.Array,
                evidence: jnp.ndarray | None = None, *,
                apply: ApplyFn, dim: int, num_steps: int, null_domain: int,
                space: TargetSpace = TargetSpace(1.0), temperature: float = 1.0) -> jnp.ndarray:
  """Unit DDIM samples [B, dim] for contexts [B, L, d], domains [B] and guidance scales [B].

  `evidence` [B, E, d] for a model that reads it (None otherwise).

  Each row is sampled on its own with its own key, so a row's sample does not depend on the
  rest of the batch (padding rows change nothing). Jit it with the keywords bound.
  """
  keys = jax.random.split(rng, context.shape[0])
  one = lambda a: None if a is None else a[None]
  return jax.vmap(lambda k, c, m, d, g, e: ddim_sample(
      apply, params, Condition(c[None], m[None], d[None], one(e)), k, dim, num_steps,
      g, null_domain, space=space, temperature=temperature)[0])(
          keys, context, context_mask, domain, guidance_scale, evidence)
