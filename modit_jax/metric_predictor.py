"""The metric predictor: per-domain attribute probability from an item embedding.

A small MLP (shared trunk, one logit per domain) trained on the **observed** labels of train
items only (DESIGN.md section 2). Unobserved labels are never read: labels are taken through
`np.where(observed, attributes, False)` and every unobserved entry is masked out of the loss.
It re-ranks in the `rerank` baseline and orders trajectories in stage 2.

Relative features (`clusters.relative_features`, off by default): besides the embedding x, the
MLP reads x's offset from the nearest of a few coarse k-means regions of the train items, scaled
to unit mean norm. Whether an item is attribute-positive depends on where it sits within its
pattern, not only on where the pattern sits; the offset says that directly. On the
development world it raised the held-out AUC from 0.95 / 0.84 / 0.72 / 0.59 to 0.97 / 0.89 /
0.80 / 0.74, but an unseen pattern's items fall in a sibling's region, where the offset
misleads: `rerank` lost up to 0.17 Joint@20 on pattern holdout (docs/evidence.md). The region
count follows `sizing.num_predictor_regions`.

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
from modit_jax import memo

_PREDICT_BATCH = 65536
# Above this many labelled fit items a batch is drawn with replacement. `jax.random.choice`
# without replacement permutes all of them at every step: 1.2 s a step on 2 cores at the 1.6M
# of a 10M-item catalog, half an hour for the 1,500 steps. With replacement a batch of 512
# repeats an item about once in 8 batches there; below the bound (the default world, the real
# catalog) batches are drawn as before, so their results do not change.
_SAMPLE_WITHOUT_REPLACEMENT_MAX = 1 << 20
_PARAM_PREFIX = "predictor_param/"
_REGIONS_KEY = "predictor_regions"
_OFFSET_SCALE_KEY = "predictor_offset_scale"
# Predictors trained in this process, by the content of what training reads: the pipeline's
# data path and the evaluation's `rerank` train the same one on the same labelled train items
# (the second fit took ~15 s of every `make main`).
_TRAINED: memo.Memo["MetricPredictor"] = memo.Memo("metric_predictor", kept=2)


@dataclasses.dataclass(frozen=True)
class RelativeFeatures:
  """x -> [x, (x - its nearest region centre) / offset_scale]: where x sits in its region."""
  regions: np.ndarray  # float32 [R, d] k-means centres of train items
  offset_scale: float  # the train items' mean offset norm: offsets enter at unit scale

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    # Nearest centre in Euclidean distance: argmax of x.c - |c|^2 / 2.
    half_norms = 0.5 * np.square(self.regions).sum(axis=1)
    nearest = np.argmax(x @ self.regions.T - half_norms, axis=1)
    offset = (x - self.regions[nearest]) / np.float32(self.offset_scale)
    return np.concatenate([x, offset], axis=1)


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
  # Read x's offset from its nearest coarse region of train items too (module docstring). Off:
  # it raised the held-out AUC of labelled train items but lowered what the predictor does for
  # unseen patterns, and the generative method did not gain (docs/evidence.md).
  c.relative_features = False
  return c


@dataclasses.dataclass(frozen=True)
class MetricPredictor:
  """A trained predictor and its held-out validation."""
  params: Any
  num_domains: int
  hidden: tuple[int, ...]
  validation: list[dict[str, float]]  # per domain: auc, ece, n_heldout, n_positive
  features: "RelativeFeatures | None" = None  # None: the MLP reads the embedding alone

  def predict(self, embeddings: np.ndarray) -> np.ndarray:
    """float32 [N, M] attribute probabilities for float32 [N, d] embeddings."""
    apply = _probabilities_fn(self.num_domains, self.hidden)
    out = []
    for i in range(0, len(embeddings), _PREDICT_BATCH):
      x = np.asarray(embeddings[i:i + _PREDICT_BATCH], np.float32)
      if self.features is not None:
        x = self.features(x)
      out.append(np.asarray(apply(self.params, jnp.asarray(x))))
    return np.concatenate(out) if out else np.zeros((0, self.num_domains), np.float32)

  def to_arrays(self) -> dict[str, np.ndarray]:
    """The parameters as flat named arrays (for an .npz next to a model that needs them)."""
    flat = traverse_util.flatten_dict(jax.device_get(self.params), sep="/")
    arrays = {f"{_PARAM_PREFIX}{name}": np.asarray(value) for name, value in flat.items()}
    arrays[f"{_PARAM_PREFIX}hidden"] = np.asarray(self.hidden, np.int64)
    if self.features is not None:
      arrays[_REGIONS_KEY] = self.features.regions
      arrays[_OFFSET_SCALE_KEY] = np.asarray([self.features.offset_scale], np.float64)
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
    features = None
    if _REGIONS_KEY in arrays:
      features = RelativeFeatures(np.asarray(arrays[_REGIONS_KEY], np.float32),
                                  float(np.asarray(arrays[_OFFSET_SCALE_KEY]).reshape(-1)[0]))
    return cls(params, num_domains, hidden, [], features)


def has_saved(names: Any) -> bool:
  """Whether an .npz with these array names holds a predictor `to_arrays` wrote."""
  return f"{_PARAM_PREFIX}hidden" in names


def train(embeddings: np.ndarray, attributes: np.ndarray, observed: np.ndarray,
          config: ml_collections.ConfigDict | None = None,
          features: RelativeFeatures | None = None) -> MetricPredictor:
  """Fits the predictor on observed labels; validates on a held-out share of labelled items.

  Args:
    embeddings: float32 [N, d] item embeddings.
    attributes: bool [N, M]; only entries where `observed` is True are read.
    observed: bool [N, M], the labels training may read (train items only by the format).
    config: `default_config()` fields.
    features: relative features the MLP reads instead of the bare embedding (None: none).

  Returns:
    The trained predictor, with per-domain held-out AUC and calibration.
  """
  config = default_config() if config is None else config
  observed = np.asarray(observed, bool)
  labels = np.where(observed, np.asarray(attributes, bool), False)
  labelled = np.flatnonzero(observed.any(axis=1))
  if len(labelled) < 10:
    raise errors.UserError(
        f"the metric predictor needs observed labels; only {len(labelled)} items have any")
  # Everything the fit and its validation read: the labelled rows in order (the split below
  # draws positions among them), their labels, the config, the features, how batches are
  # drawn, and the JAX options that change compiled numerics.
  key = memo.digest(memo.rows_digest(embeddings, labelled), labels[labelled],
                    observed[labelled], config.to_dict(),
                    None if features is None else features.regions,
                    None if features is None else float(features.offset_scale),
                    _SAMPLE_WITHOUT_REPLACEMENT_MAX,
                    str(jax.config.jax_default_matmul_precision),
                    bool(jax.config.read("jax_disable_most_optimizations")))
  return _TRAINED.get(key, lambda: _train(embeddings, labels, observed, labelled, config,
                                          features))


def _train(embeddings: np.ndarray, labels: np.ndarray, observed: np.ndarray,
           labelled: np.ndarray, config: ml_collections.ConfigDict,
           features: RelativeFeatures | None) -> MetricPredictor:
  """`train` past its checks: `labelled` int [n], the rows with an observed label."""
  num_domains = observed.shape[1]
  rng = np.random.default_rng(config.seed)
  shuffled = rng.permutation(labelled)
  num_heldout = int(round(len(shuffled) * config.validation_fraction))
  heldout, fit = np.sort(shuffled[:num_heldout]), np.sort(shuffled[num_heldout:])

  inputs = lambda rows: (np.asarray(embeddings[rows], np.float32) if features is None
                        else features(embeddings[rows]))
  x = jnp.asarray(inputs(fit), jnp.float32)
  y = jnp.asarray(labels[fit], jnp.float32)
  w = jnp.asarray(observed[fit], jnp.float32)

  model = PredictorMLP(num_domains, tuple(config.hidden))
  params = model.init(jax.random.PRNGKey(config.seed), x[:1])["params"]
  schedule = optax.cosine_decay_schedule(config.learning_rate, config.num_steps)
  tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  batch = min(config.batch_size, len(fit))

  def loss_fn(p, data, idx):
    xs, ys, ws = data
    logits = model.apply({"params": p}, xs[idx])
    # Unweighted cross-entropy keeps the probabilities calibrated (validated below).
    per = optax.sigmoid_binary_cross_entropy(logits, ys[idx])
    wb = ws[idx]
    return jnp.sum(per * wb) / jnp.maximum(jnp.sum(wb), 1.0)

  def fit_scan(carry, data, keys):
    def step(carry, key):
      p, opt = carry
      if x.shape[0] > _SAMPLE_WITHOUT_REPLACEMENT_MAX:
        idx = jax.random.randint(key, (batch,), 0, x.shape[0])
      else:
        idx = jax.random.choice(key, x.shape[0], (batch,), replace=False)
      loss, grads = jax.value_and_grad(loss_fn)(p, data, idx)
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), loss
    return jax.lax.scan(step, carry, keys)

  keys = jax.random.split(jax.random.PRNGKey(config.seed + 1), config.num_steps)
  # The fit rows are an argument of the jitted scan, not a constant it closes over: a captured
  # array is copied into the compiled program, one more copy of the rows (0.3 GB at 10M items;
  # docs/benchmarks.md).
  (params, _), _ = jax.jit(fit_scan)((params, tx.init(params)), (x, y, w), keys)
  predictor = MetricPredictor(params, num_domains, tuple(config.hidden), [], features)
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
