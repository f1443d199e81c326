"""Generating query embeddings from a trained checkpoint, and searching them.

A `Generator` loads a training workdir once (its `config.json` and the EMA parameters of its
latest checkpoint) and samples query embeddings for seed sets by DDIM. Sampling is jitted once
per padded batch size (batches are padded to a multiple of `_BUCKET`), so evaluating many query
files does not recompile.
"""

import functools

import jax
import ml_collections
import numpy as np

from modit_jax import baselines
from modit_jax import catalog as catalog_lib
from modit_jax import diffusion
from modit_jax import engine
from modit_jax import errors
from modit_jax import oracle as oracle_lib
from modit_jax import retrieval
from modit_jax import training

_BUCKET = 256


class Generator:
  """Samples query embeddings with the model of a training workdir."""

  def __init__(self, workdir: str, num_steps: int | None = None):
    self.config, self.dim, self.num_domains = training.read_run_config(workdir)
    self.model = training.make_model(self.config.model, self.dim, self.num_domains)
    self.params = jax.device_put(engine.restore_params(workdir, use_ema=True))
    self.num_steps = int(num_steps or self.config.diffusion.sample_steps)
    self.guidance_scale = float(self.config.diffusion.guidance_scale)
    self._sample = jax.jit(functools.partial(
        _sample, apply=training.apply_fn(self.model), dim=self.dim, num_steps=self.num_steps,
        null_domain=self.num_domains))

  def sample(self, context: np.ndarray, context_mask: np.ndarray, domain: np.ndarray,
             seed: int = 0, num_samples: int = 1,
             guidance_scale: float | np.ndarray | None = None) -> np.ndarray:
    """Unit query embeddings float32 [Q, num_samples, d] for contexts [Q, L, d].

    `domain` int [Q] holds domain ids, or `num_domains` (the null domain) for none.
    `guidance_scale` is a scalar or per-query [Q] (None: the training config's value); it is
    traced, so changing it does not recompile.
    """
    scale = self.guidance_scale if guidance_scale is None else guidance_scale
    num = context.shape[0]
    padded = -(-max(num, 1) // _BUCKET) * _BUCKET
    pad = lambda x: np.concatenate([x, np.zeros((padded - num,) + x.shape[1:], x.dtype)])
    ctx, mask = pad(np.asarray(context, np.float32)), pad(np.asarray(context_mask, bool))
    dom = pad(np.asarray(domain, np.int32))
    scale = pad(np.broadcast_to(np.asarray(scale, np.float32), (num,)))
    out = []
    for s in range(num_samples):
      rng = jax.random.fold_in(jax.random.PRNGKey(seed), s)
      out.append(np.asarray(self._sample(self.params, ctx, mask, dom, scale, rng))[:num])
    return np.stack(out, axis=1)


def _sample(params, context, context_mask, domain, guidance_scale, rng, *, apply, dim,
            num_steps, null_domain):
  # Rows are independent: one key per row keeps a row's sample the same whatever its batch.
  keys = jax.random.split(rng, context.shape[0])
  return jax.vmap(lambda k, c, m, d, g: diffusion.ddim_sample(
      apply, params, diffusion.Condition(c[None], m[None], d[None]), k, dim, num_steps,
      g, null_domain)[0])(keys, context, context_mask, domain, guidance_scale)


def search_samples(index: retrieval.Index, queries: np.ndarray, seeds: np.ndarray,
                   k: int) -> np.ndarray:
  """Searches every sample of float [Q, n, d] and merges per query by best score; ids [Q, k]."""
  num, n = queries.shape[:2]
  ids, scores = index.search(queries.reshape(num * n, -1), k, exclude=np.repeat(seeds, n, 0))
  if n == 1:
    return ids
  ids, scores = ids.reshape(num, n * k), scores.reshape(num, n * k)
  order = np.argsort(-scores, axis=1, kind="stable")
  ids = np.take_along_axis(ids, order, axis=1)
  out = np.empty((num, k), ids.dtype)
  for q in range(num):  # first occurrence of each id, best score first
    _, first = np.unique(ids[q], return_index=True)
    out[q] = ids[q][np.sort(first)][:k]
  return out


# Each reads the training workdir named in the evaluation config's `workdirs.<method>`.
GENERATIVE_METHODS = ("pretrained_gr", "modit_cpt", "modit_sft", "modit_sft_only", "order_random",
                      "order_reversed")


def fit(name: str, workdir: str, catalog: catalog_lib.Catalog,
        oracle: oracle_lib.OnlineOracle | None, config: ml_collections.ConfigDict
        ) -> baselines.Fitted:
  """The generative method `name` as a `baselines.Fitted`, reading the model in `workdir`.

  A domain-conditioned model's guidance scale is a knob like the baselines' ones: chosen per
  domain over `config.guidance_grid` on train queries with the online oracle (an empty grid
  keeps the training config's scale).
  """
  if not workdir:
    raise errors.UserError(
        f"method {name} needs its training workdir: set --config.workdirs.{name}=DIR")
  generator = Generator(workdir)
  if (generator.dim, generator.num_domains) != (catalog.dim, catalog.num_domains):
    raise errors.UserError(
        f"{workdir} was trained on d={generator.dim} with {generator.num_domains} domains; "
        f"the catalog has d={catalog.dim} and {catalog.num_domains}")
  # Stage 1 never sees a domain token: it is asked with the null domain (guidance is moot).
  conditioned = generator.config.stage != "pretrain"
  emb = catalog.embeddings

  def samples(queries: catalog_lib.Queries, scale: np.ndarray | float,
              num_samples: int) -> np.ndarray:
    context = np.asarray(emb[queries.seeds], np.float32)
    domain = queries.domain if conditioned else np.full(len(queries), generator.num_domains)
    return generator.sample(context, np.ones(queries.seeds.shape, bool), domain, config.seed,
                            num_samples, scale)

  scales = np.full(catalog.num_domains, generator.guidance_scale)
  knob = None
  if conditioned and len(config.guidance_grid):
    grid = [float(g) for g in config.guidance_grid]
    scales = baselines.tune_per_domain(
        catalog, oracle, grid,
        lambda q, g: oracle.search(samples(q, g, 1)[:, 0], q.seeds, oracle.k),
        f"{name} guidance scale")
    knob = dict(zip(catalog.domains, scales.tolist()))

  def retrieve(queries: catalog_lib.Queries, index: retrieval.Index, k: int) -> np.ndarray:
    return search_samples(index, samples(queries, scales[queries.domain], config.num_samples),
                          queries.seeds, k)

  return baselines.Fitted(name, retrieve, knob=knob)
