"""The generative methods of evaluation: a trained run made into a `baselines.Fitted`.

Each method reads the training workdir named in the evaluation config; its guidance scale is
a knob chosen on train queries like the baselines' ones, and its queries are sampled by a
`generator.Generator`.
"""

from absl import logging
import ml_collections
import numpy as np

from modit_jax import baselines
from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import evidence
from modit_jax import generator as generator_lib
from modit_jax import hppo
from modit_jax import novelty
from modit_jax import oracle as oracle_lib
from modit_jax import retrieval
from modit_jax import run_dir

# The pipeline's generative methods, listed so that the evaluation config offers their
# `workdirs.<method>` on the command line; any other name given a workdir is evaluated the same
# way. The `hppo_no_<policy>` methods are the candidate-policy ablation (configs/hppo.py).
GENERATIVE_METHODS = ("pretrained_gr", "modit_cpt", "modit_sft", "modit_sft_only", "order_random",
                      "order_reversed", "modit_hppo") + tuple(
                          f"hppo_no_{policy}" for policy in hppo.DEFAULT_POLICIES)


def check_workdir(name: str, workdir: str) -> None:
  """Raises `UserError` unless `workdir` is a training workdir for the method `name`."""
  if not workdir:
    raise errors.UserError(
        f"method {name} needs its training workdir: set --config.workdirs.{name}=DIR")
  run_dir.read_run_config(workdir)


def fit(name: str, workdir: str, catalog: catalog_lib.Catalog,
        oracle: oracle_lib.OnlineOracle | None, config: ml_collections.ConfigDict,
        gate: novelty.Gate | None = None,
        index: retrieval.Index | None = None) -> dict[str, baselines.Fitted]:
  """The generative method `name` as a `baselines.Fitted`, reading the model in `workdir`.

  A domain-conditioned model's guidance scale is a knob like the baselines' ones: chosen per
  domain over `config.guidance_grid` on train queries with the online oracle (an empty grid
  keeps the training config's scale).

  Returns {name: method}; with a `gate`, {name + UNGATED_SUFFIX: the model alone, name: the
  model behind the novelty gate}, both answering from the same samples. `index`: the
  evaluation's index over `catalog.embeddings`, reused for a model's catalog offsets when it
  is the default one (`Generator.bind_catalog`).
  """
  check_workdir(name, workdir)
  generator = generator_lib.Generator(workdir)
  generator.bind_catalog(catalog, index)
  # A model that never saw a domain token (stage 1) is asked with the null domain (guidance
  # is moot).
  conditioned = generator.facts.conditioned
  emb = catalog.embeddings

  def samples(queries: catalog_lib.Queries, scale: np.ndarray | float,
              num_samples: int) -> np.ndarray:
    context = np.asarray(emb[queries.seeds], np.float32)
    domain = queries.domain if conditioned else np.full(len(queries), generator.num_domains)
    return generator.sample(context, np.ones(queries.seeds.shape, bool), domain, config.seed,
                            num_samples, scale, exclude_items=queries.seeds)

  scales = np.full(catalog.num_domains, generator.guidance_scale)
  knob = None
  if conditioned and len(config.guidance_grid):
    grid = [float(g) for g in config.guidance_grid]
    scales = baselines.tune_per_domain(
        catalog, oracle, grid,
        lambda q, g: oracle.search(samples(q, g, 1)[:, 0], q.seeds, oracle.k),
        f"{name} guidance scale", max_queries=config.guidance_tune_queries, seed=config.seed,
        purity_tolerance=config.guidance_purity_tolerance)
    knob = dict(zip(catalog.domains, scales.tolist()))

  # The last queries' samples: the gated and the ungated method answer a split from one draw.
  sampled = baselines.last_queries_memo(
      lambda queries: samples(queries, scales[queries.domain], config.num_samples))

  def retrieve(queries: catalog_lib.Queries, index: retrieval.Index, k: int) -> np.ndarray:
    return generator_lib.search_samples(index, sampled(queries), queries.seeds, k)

  if gate is None:
    return {name: baselines.Fitted(name, retrieve, knob=knob)}

  def retrieve_gated(queries: catalog_lib.Queries, index: retrieval.Index,
                     k: int) -> np.ndarray:
    seed_means = np.asarray(emb[queries.seeds], np.float32).mean(axis=1)
    queries_embedded, novel = gate.apply(index, seed_means, queries.domain, queries.seeds,
                                         sampled(queries))
    logging.info("%s: %d of %d seed sets novel, answered with the gate's fallback", name,
                 int(novel.sum()), len(novel))
    return generator_lib.search_samples(index, queries_embedded, queries.seeds, k)

  ungated = name + novelty.UNGATED_SUFFIX
  return {ungated: baselines.Fitted(ungated, retrieve, knob=knob),
          name: baselines.Fitted(name, retrieve_gated, knob=knob)}
