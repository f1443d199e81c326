"""The metric predictor: per-domain attribute probability from an item embedding.

A small MLP (shared trunk, one logit per domain) trained on the **observed** labels of train
items only (DESIGN.md section 2). Unobserved labels are never read: labels are taken through
`np.where(observed, attributes, False)` and every unobserved entry is masked out of the loss.
It re-ranks in the `rerank` baseline and orders trajectories in stage 2.

Validation ("metric-predictor validation"): labelled items are split by item into a fit and a
held-out part before training; AUC and expected calibration error on the held-out part are
reported per domain.
"""

import dataclasses
import functools
from typing import Any, Callable

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.stats

from modit_jax import errors

_PREDICT_BATCH = 65536
_PARAM_PREFIX = "predictor_param/"


class PredictorMLP(nn.Module):
  """Embedding -> one attribute logit per domain."""
  num_domains: int
  hidden: tuple[int, ...] = (256, 256)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for width in self.hidden:
      x = nn.gelu(nn.Dense(width)(x))
    return nn.Dense(self.num_domains)(x)


@functools.lru_cache(maxsize=None)
def _probabilities_fn(num_domains: int, hidden: tuple[int, ...]) -> Callable[..., jnp.ndarray]:
  """The jitted `(params, x) -> probabilities` of one architecture, built once: a fresh jit per
  `predict` call would trace and compile again on every call (Generator calls it per batch)."""
  model = PredictorMLP(num_domains, hidden)
  return jax.jit(lambda p, x: jax.nn.sigmoid(model.apply({"params": p}, x)))


def default_config() -> ml_collections.ConfigDict:
  """The predictor's training settings (embedded in stage and evaluation configs)."""
  c = ml_collections.ConfigDict()
  c.hidden = (256, 256)
  c.learning_rate = 3e-3
  c.weight_decay = 1e-4
  c.num_steps = 1500
  c.batch_size = 512
  c.validation_fraction = 0.2
  c.seed = 0
  return c


@dataclasses.dataclass(frozen=True)
class MetricPredictor:
  """A trained predictor and its held-out validation."""
  params: Any
  num_domains: int
  hidden: tuple[int, ...]
  validation: list[dict[str, float]]  # per domain: auc, ece, n_heldout, n_positive

  def predict(self, embeddings: np.ndarray) -> np.ndarray:
    """float32 [N, M] attribute probabilities for float32 [N, d] embeddings."""
    apply = _probabilities_fn(self.num_domains, self.hidden)
    out = [np.asarray(apply(self.params, jnp.asarray(embeddings[i:i + _PREDICT_BATCH])))
           for i in range(0, len(embeddings), _PREDICT_BATCH)]
    return np.concatenate(out) if out else np.zeros((0, self.num_domains), np.float32)

  def to_arrays(self) -> dict[str, np.ndarray]:
    """The parameters as flat named arrays (for an .npz next to a model that needs them)."""
    flat = traverse_util.flatten_dict(jax.device_get(self.params), sep="/")
    arrays = {f"{_PARAM_PREFIX}{name}": np.asarray(value) for name, value in flat.items()}
    arrays[f"{_PARAM_PREFIX}hidden"] = np.asarray(self.hidden, np.int64)
    return arrays

  @classmethod
  def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "MetricPredictor":
    """The predictor `to_arrays` wrote (validation is not stored: it is reported elsewhere)."""
    hidden_key = f"{_PARAM_PREFIX}hidden"
    if hidden_key not in arrays:
      raise errors.UserError("no saved metric predictor in these arrays")
    flat = {name[len(_PARAM_PREFIX):]: np.asarray(value) for name, value in arrays.items()
            if name.startswith(_PARAM_PREFIX) and name != hidden_key}
    params = traverse_util.unflatten_dict(flat, sep="/")
    hidden = tuple(int(h) for h in arrays[hidden_key])
    num_domains = int(params[f"Dense_{len(hidden)}"]["bias"].shape[0])
    return cls(params, num_domains, hidden, [])


def has_saved(names: Any) -> bool:
  """Whether an .npz with these array names holds a predictor `to_arrays` wrote."""
  return f"{_PARAM_PREFIX}hidden" in names


def train(embeddings: np.ndarray, attributes: np.ndarray, observed: np.ndarray,
          config: ml_collections.ConfigDict | None = None) -> MetricPredictor:
  """Fits the predictor on observed labels; validates on a held-out share of labelled items.

  Args:
    embeddings: float32 [N, d] item embeddings.
    attributes: bool [N, M]; only entries where `observed` is True are read.
    observed: bool [N, M], the labels training may read (train items only by the format).
    config: `default_config()` fields.

  Returns:
    The trained predictor, with per-domain held-out AUC and calibration.
  """
  config = default_config() if config is None else config
  observed = np.asarray(observed, bool)
  labels = np.where(observed, np.asarray(attributes, bool), False)
  labelled = np.flatnonzero(observed.any(axis=1))
  num_domains = observed.shape[1]
  if len(labelled) < 10:
    raise errors.UserError(
        f"the metric predictor needs observed labels; only {len(labelled)} items have any")
  rng = np.random.default_rng(config.seed)
  shuffled = rng.permutation(labelled)
  num_heldout = int(round(len(shuffled) * config.validation_fraction))
  heldout, fit = np.sort(shuffled[:num_heldout]), np.sort(shuffled[num_heldout:])

  x = jnp.asarray(embeddings[fit], jnp.float32)
  y = jnp.asarray(labels[fit], jnp.float32)
  w = jnp.asarray(observed[fit], jnp.float32)

  model = PredictorMLP(num_domains, tuple(config.hidden))
  params = model.init(jax.random.PRNGKey(config.seed), x[:1])["params"]
  schedule = optax.cosine_decay_schedule(config.learning_rate, config.num_steps)
  tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  batch = min(config.batch_size, len(fit))

  def loss_fn(p, idx):
    logits = model.apply({"params": p}, x[idx])
    # Unweighted cross-entropy keeps the probabilities calibrated (validated below).
    per = optax.sigmoid_binary_cross_entropy(logits, y[idx])
    wb = w[idx]
    return jnp.sum(per * wb) / jnp.maximum(jnp.sum(wb), 1.0)

  def step(carry, key):
    p, opt = carry
    idx = jax.random.choice(key, x.shape[0], (batch,), replace=False)
    loss, grads = jax.value_and_grad(loss_fn)(p, idx)
    updates, opt = tx.update(grads, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  keys = jax.random.split(jax.random.PRNGKey(config.seed + 1), config.num_steps)
  (params, _), _ = jax.jit(lambda c, k: jax.lax.scan(step, c, k))((params, tx.init(params)),
                                                                   keys)
  predictor = MetricPredictor(params, num_domains, tuple(config.hidden), [])
  probs = predictor.predict(np.asarray(embeddings[heldout], np.float32))
  validation = [_validate(probs[:, m], labels[heldout, m], observed[heldout, m])
                for m in range(num_domains)]
  return dataclasses.replace(predictor, validation=validation)


def _validate(prob: np.ndarray, label: np.ndarray, mask: np.ndarray) -> dict[str, float]:
  """Held-out AUC and expected calibration error (10 equal-width bins) of one domain."""
  prob, label = prob[mask], label[mask]
  out = {"n_heldout": int(mask.sum()), "n_positive": int(label.sum()),
         "auc": float("nan"), "ece": float("nan")}
  if 0 < label.sum() < len(label):
    ranks = scipy.stats.rankdata(prob)
    num_pos, num_neg = label.sum(), (~label).sum()
    out["auc"] = float((ranks[label].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))
  if len(label):
    bins = np.minimum((prob * 10).astype(int), 9)
    gap = sum(abs(prob[bins == b].mean() - label[bins == b].mean()) * np.mean(bins == b)
              for b in range(10) if np.any(bins == b))
    out["ece"] = float(gap)
  return out
