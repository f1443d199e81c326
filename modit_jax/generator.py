"""Generating query embeddings with a trained model, and searching them.

A `Generator` loads a training workdir once (`run_dir.load`: its recorded config and facts and
the EMA parameters of its latest checkpoint) and samples query embeddings for seed sets by
DDIM. Sampling is jitted once per padded batch size (`Generator.padded_size`: powers of two up
to `_BUCKET`, then multiples of it), so evaluating many query files, or serving many calls,
does not recompile. Serving and evaluation both sample here; nothing of training is imported.
"""

import functools
from typing import Any

import jax
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import diffusion
from modit_jax import dit
from modit_jax import engine
from modit_jax import errors
from modit_jax import metric_predictor
from modit_jax import models
from modit_jax import retrieval
from modit_jax import run_dir

_BUCKET = 256


@functools.lru_cache(maxsize=16)
def _jitted_samplers(model: dit.DiT, dim: int, num_steps: int, null_domain: int,
                     space: diffusion.TargetSpace, temperature: float) -> tuple[Any, Any]:
  """The jitted samplers (one stream, per-row seeds) of one architecture and sampler.

  Shared by every Generator with equal arguments (a DiT compares by its fields), so the models
  of one pipeline (stages and ablations of one width) compile each padded batch size once.
  """
  sample_rows = functools.partial(
      diffusion.sample_rows, apply=models.apply_fn(model), dim=dim, num_steps=num_steps,
      null_domain=null_domain, space=space, temperature=temperature)
  return (jax.jit(sample_rows),
          jax.jit(functools.partial(Generator._seeded_rows, sample_rows)))


class Generator:
  """Samples query embeddings with the model of a training workdir."""

  def __init__(self, workdir: str, num_steps: int | None = None):
    run = run_dir.load(workdir)
    self.config, self.dim, self.num_domains = run.config, run.dim, run.num_domains
    self.facts, self.model, self.params = run.facts, run.model, run.params
    self._placed_params = {}  # sharding -> self.params placed with it
    self.num_steps = int(num_steps or self.config.diffusion.sample_steps)
    self.guidance_scale = float(self.config.diffusion.guidance_scale)
    self._sample, self._sample_seeded = _jitted_samplers(
        self.model, self.dim, self.num_steps, self.num_domains,
        models.target_space(self.config, self.dim), models.sample_temperature(self.config))
    # A model with learned positions was trained on contexts in ascending predicted density
    # for the domain (stage-2 trajectories): its seeds are ordered the same way here.
    self.context_predictor: metric_predictor.MetricPredictor | None = None
    if self.facts.learned_positions:
      self.context_predictor = run_dir.saved_predictor(workdir)
    # A model that reads neighbour evidence computes it from the catalog it is bound to.
    self.reads_evidence = self.model.num_evidence > 0
    self._evidence = None
    self._last_evidence = None  # (inputs, evidence) of the last `sample` call

  @staticmethod
  def _seeded_rows(sample_rows, params, context, context_mask, domain, guidance_scale, seeds,
                   index, evidence):
    # Each row is a batch of one keyed by fold_in(PRNGKey(its seed), index): its sample depends
    # on nothing else in the batch, not even its position. With one query this is the key an
    # int seed gives row 0, so both paths agree on a single query.
    def one(c, m, d, g, seed, e):
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), index)
      e = None if e is None else e[None]
      return sample_rows(params, c[None], m[None], d[None], g[None], rng, e)[0]
    return jax.vmap(one)(context, context_mask, domain, guidance_scale, seeds, evidence)

  def bind_catalog(self, catalog: catalog_lib.Catalog,
                   index: retrieval.Index | None = None) -> None:
    """Checks that `catalog` fits the model, and reads its neighbour evidence from it.

    Refuses a catalog of another dimension or number of domains than the model's. A model
    that reads neighbour evidence computes it from this catalog's train items and observed
    labels (`models.neighbour_evidence`), as its training did; `index`, an index the caller
    holds over `catalog.embeddings`, spares building the catalog offsets' own when it is the
    default one.
    """
    if (self.dim, self.num_domains) != (catalog.dim, catalog.num_domains):
      raise errors.UserError(
          f"the model was trained on d={self.dim} with {self.num_domains} domains; the "
          f"catalog has d={catalog.dim} and {catalog.num_domains}")
    if self.reads_evidence:
      self._evidence = models.neighbour_evidence(self.config, catalog, catalog_index=index)
      self._last_evidence = None

  def params_on(self, sharding: jax.sharding.Sharding) -> Any:
    """The EMA parameters placed with `sharding`, sent to the devices once per sharding."""
    if sharding not in self._placed_params:
      self._placed_params[sharding] = jax.device_put(self.params, sharding)
    return self._placed_params[sharding]

  @staticmethod
  def padded_size(num: int) -> int:
    """The batch size `num` queries are padded to: one compilation per size.

    Powers of two up to `_BUCKET`, then multiples of `_BUCKET`: a single query costs one row,
    and a large batch wastes less than `_BUCKET` rows.
    """
    if num <= _BUCKET:
      return 1 << max(num - 1, 0).bit_length()
    return -(-num // _BUCKET) * _BUCKET

  def sample(self, context: np.ndarray, context_mask: np.ndarray, domain: np.ndarray,
             seed: int | np.ndarray = 0, num_samples: int = 1,
             guidance_scale: float | np.ndarray | None = None,
             exclude_items: np.ndarray | None = None) -> np.ndarray:
    """Unit query embeddings float32 [Q, num_samples, d] for contexts [Q, L, d].

    `domain` int [Q] holds domain ids, or `num_domains` (the null domain) for none.
    `seed` is an int (one random stream for the batch: row q gets the q-th key of it) or int
    [Q] per-query seeds (a query's samples then depend only on its own seed and inputs, not on
    its batch or position). `guidance_scale` is a scalar or per-query [Q] (None: the training
    config's value). Both are traced, so changing them does not recompile; the batch is padded
    to `padded_size(Q)`, so only a new (bucket, L) compiles. `exclude_items` int [Q, s]
    (catalog ids, -1: none), the seeds' ids, are kept out of their own neighbourhood when the
    model reads neighbour evidence (`bind_catalog` first).
    """
    scale = self.guidance_scale if guidance_scale is None else guidance_scale
    num = context.shape[0]
    evidence = None
    if self.reads_evidence:
      if self._evidence is None:
        raise errors.UserError("this model reads neighbour evidence from its catalog: call "
                               "bind_catalog(catalog) before sampling")
      evidence = self._evidence_of(context, context_mask, domain, exclude_items)
    padded = self.padded_size(num)
    pad = lambda x: np.concatenate([x, np.zeros((padded - num,) + x.shape[1:], x.dtype)])
    ctx, mask = pad(np.asarray(context, np.float32)), pad(np.asarray(context_mask, bool))
    dom = pad(np.asarray(domain, np.int32))
    if evidence is not None:
      evidence = pad(evidence)
    if self.context_predictor is not None:
      # After padding: the predictor then also compiles once per bucket.
      ctx, mask = self.order_context(ctx, mask, dom)
    scale = pad(np.broadcast_to(np.asarray(scale, np.float32), (num,)))
    seeds = None
    if np.ndim(seed):
      if np.shape(seed) != (num,):
        raise ValueError(f"per-query seeds must have shape ({num},), got {np.shape(seed)}")
      seeds = pad(np.asarray(seed, np.int32))
    # Rows are split over the local devices (on CPU, --cpu_devices of them): each row's sample
    # depends only on its own inputs and key, so the split changes it only by float rounding.
    rows, replicated = engine.local_row_shardings(padded)
    ctx, mask, dom, scale, evidence = jax.device_put((ctx, mask, dom, scale, evidence), rows)
    params = self.params_on(replicated)
    if seeds is not None:
      seeds = jax.device_put(seeds, rows)
    out = []
    for s in range(num_samples):
      if seeds is None:
        rng = jax.device_put(jax.random.fold_in(jax.random.PRNGKey(seed), s), replicated)
        x = self._sample(params, ctx, mask, dom, scale, rng, evidence)
      else:
        x = self._sample_seeded(params, ctx, mask, dom, scale, seeds,
                                jax.device_put(np.int32(s), replicated), evidence)
      out.append(np.asarray(x)[:num])
    return np.stack(out, axis=1)

  def _evidence_of(self, context: np.ndarray, context_mask: np.ndarray, domain: np.ndarray,
                   exclude_items: np.ndarray | None) -> np.ndarray:
    """The bound catalog's evidence of these rows; the last call's when the rows are equal.

    A guidance grid samples the same queries once per scale, and the evidence (the catalog
    search and the sums behind the offsets) does not depend on the scale: computed once.
    """
    inputs = tuple(None if a is None else np.array(a) for a in
                   (context, context_mask, domain, exclude_items))
    last = self._last_evidence
    if last is not None and all(
        (a is None and b is None) or (a is not None and b is not None and a.dtype == b.dtype
                                      and np.array_equal(a, b))
        for a, b in zip(inputs, last[0])):
      return last[1]
    evidence = self._evidence(*inputs)
    self._last_evidence = (inputs, evidence)
    return evidence

  def order_context(self, context: np.ndarray, context_mask: np.ndarray, domain: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Contexts in ascending predicted density for each row's domain, padding last.

    Rows asked with the null domain keep their order (no domain defines one).
    """
    context = np.asarray(context, np.float32)
    context_mask = np.asarray(context_mask, bool)
    domain = np.asarray(domain)
    num, length = context_mask.shape
    density = self.context_predictor.predict(context.reshape(num * length, -1))
    density = density.reshape(num, length, -1)
    real = domain < self.num_domains
    key = np.take_along_axis(density, np.minimum(domain, self.num_domains - 1)[:, None, None],
                             2)[..., 0]
    key = np.where(real[:, None], key, np.arange(length, dtype=np.float32)[None, :])
    # Stable: ties keep the caller's order. Padded slots sort after every real one.
    order = np.lexsort((np.where(context_mask, key, 0), ~context_mask), axis=1)
    return (np.take_along_axis(context, order[..., None], 1),
            np.take_along_axis(context_mask, order, 1))


def search_samples(index: retrieval.Index, queries: np.ndarray, seeds: np.ndarray,
                   k: int, return_scores: bool = False
                   ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Searches every sample of float [Q, n, d] and merges per query by best score; ids [Q, k].

  `seeds` int [Q, E] are excluded (-1: none). With `return_scores`, returns (ids, scores
  [Q, k]), each id's score being its best over the query's samples.
  """
  num, n = queries.shape[:2]
  ids, scores = index.search(queries.reshape(num * n, -1), k, exclude=np.repeat(seeds, n, 0))
  if n > 1:
    ids, scores = ids.reshape(num, n * k), scores.reshape(num, n * k)
    order = np.argsort(-scores, axis=1, kind="stable")
    ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    keep = np.empty((num, k), np.int64)
    for q in range(num):  # first occurrence of each id, best score first
      _, first = np.unique(ids[q], return_index=True)
      keep[q] = np.sort(first)[:k]
    ids, scores = np.take_along_axis(ids, keep, 1), np.take_along_axis(scores, keep, 1)
  return (ids, scores) if return_scores else ids
