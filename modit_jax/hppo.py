"""Stage 4, HPPO: hybrid candidate pools, oracle labels, Pareto pairs, reference-anchored DPO.

DESIGN.md section 5.4. For a draw of training queries, a **hybrid candidate pool** of query
embeddings comes from several named policies (`POLICIES`): the current model at several
guidance scales and noise seeds, the frozen reference (SFT) model, the seed centroid, the
tail-centroid heuristic (the metric predictor's high-density tail of the seeds' latent cluster,
and extrapolations past it), interpolations, and relevance feedback (the seed centroid moved
toward the oracle's hits among its own retrieved train items, round after round). The online
oracle (train items only) labels every candidate with Joint@K and Purity@K. Pairs (winner, loser) of one query need
Joint(w) > Joint(l) + margin; the **Pareto filter** keeps a pair only if Purity(w) >= Purity(l).
The loss is Diffusion-DPO on those pairs with the frozen SFT parameters as the reference, plus
an SFT term toward each query's best candidate. The first `hppo.regress_steps` updates come
before any pool: the SFT term alone, toward every fit query's best candidate among those that
need no model (docs/hppo.md, "A regression phase").

Pools are rebuilt every `hppo.pool_every` steps from the current policy parameters; a pool is a
pure function of (config, rebuild index, the parameters at that step), so a run resumed from a
checkpoint at a rebuild step replays the same pools (the config requires checkpoints to fall on
rebuild steps). See docs/hppo.md for the choices made here.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import data
from modit_jax import diffusion
from modit_jax import engine
from modit_jax import errors
from modit_jax import evidence as evidence_lib
from modit_jax import memo
from modit_jax import oracle as oracle_lib
from modit_jax import query_split
from modit_jax import trajectories
from modit_jax import variants

POLICIES = ("policy", "reference", "seed_centroid", "global_shift", "tail_centroid",
            "interpolation", "feedback", "neighbourhood", "catalog_offset")
# The default pool, and the policies the candidate-policy ablation removes one at a time.
# `global_shift` is opt-in: on the development world it changed nothing measured (mean
# Joint@20 0.658 with and without it; docs/hppo.md, "Unseen patterns in the targets, and a
# longer regression"). `catalog_offset`, the neighbourhood offset's queries, is in the
# default pool with the catalog-offset model (docs/evidence.md, "The catalog around the seeds
# as evidence").
DEFAULT_POLICIES = tuple(p for p in POLICIES if p != "global_shift")
SFT_TARGETS = ("best", "winner")
# The policies whose candidates need the model: they enter the pools only, never the targets of
# the regression phase.
MODEL_POLICIES = ("policy", "reference", "interpolation")
# The policies whose candidates a query with hidden clusters may take as its target: those
# built without the clusters' train items (`hppo.hide_cluster_prob`).
UNSEEN_PATTERN_POLICIES = ("seed_centroid", "global_shift", "neighbourhood", "catalog_offset")
# The metrics key prefix of the share of a pool's queries whose best candidate is a policy's.
BEST_SHARE_KEY = "pool/best_share/"
_POOL_STREAM = 4
_PAIR_STREAM = 5
_HIDE_STREAM = 6


def default_config() -> ml_collections.ConfigDict:
  """The `config.hppo` fields (training.default_config embeds them)."""
  c = ml_collections.ConfigDict()
  c.policies = ",".join(DEFAULT_POLICIES)  # the candidate-policy ablation removes one
  # One on-policy sample per query, at a scale inside the range evaluation picks for SFT and
  # HPPO on train queries (4-12). More policy candidates (1, 4, 8, 16 x 2 noise seeds) lowered
  # the oracle's train-query Joint@20: samples far from the operating point are easy losers
  # that DPO spends its updates on (docs/hppo.md, "Policy share").
  c.policy_guidance = (6.0,)          # the last scale is also the interpolations' endpoint
  c.policy_noise_seeds = 1            # samples per guidance scale
  c.reference_guidance = (1.0, 8.0)
  # The `global_shift` policy: seed centroid + a * g_m, g_m the domain's global direction from
  # observed labels (the `centroid_global_shift` baseline's, whose tuned a is 0.8-1.0 on the
  # development world).
  c.global_steps = (0.5, 1.0, 1.5)
  c.tail_extrapolation = (1.0, 1.5, 2.0)  # seed centroid + a * (tail centroid - seed centroid)
  c.interpolation_weights = (0.5,)
  # Relevance feedback from the oracle (Rocchio): from the seed centroid, retrieve
  # `feedback_depth` train items, step to centroid + (mean of the oracle's hits among them -
  # mean of all of them); each further round starts from the last candidate.
  c.feedback_depth = 50
  c.feedback_rounds = 2
  # The `neighbourhood` policy: seed centroid + a * (mean of the oracle's positives among the
  # `neighbourhood_size` train items nearest it - mean of those items), a in
  # `neighbourhood_steps`: `local_shift` with the oracle's labels (local_shift_train_oracle),
  # the pool's strongest winners (mean train Joint@20 0.80 against the policy's 0.26-0.37 on
  # the development world; docs/hppo.md, "Winners the policy can follow").
  c.neighbourhood_size = 200
  c.neighbourhood_steps = (2.0, 4.0, 8.0)
  # The `catalog_offset` policy, the `neighbourhood_offset` baseline's query without labels:
  # seed centroid + a * g_m + b * (mean of the `offset_size` catalog items nearest the seeds'
  # mean - that mean), a in `offset_shifts`, b in `offset_steps` (the baseline's validation
  # knobs on the development world: 200 items, a 0.05-0.8, b 1-12).
  c.offset_size = 200
  c.offset_shifts = (0.0, 0.4, 0.8)
  c.offset_steps = (2.0, 6.0, 12.0)
  c.pool_queries = 256                # training queries per pool
  c.pool_every = 100                  # steps between pool rebuilds
  c.oracle_k = 20
  c.oracle_index_kind = "scann"
  # Joint(w) > Joint(l) + margin. A wide margin keeps the pairs whose winner is clearly better
  # (mostly the neighbourhood candidates); with the SFT term below, the policy then learns to
  # produce them (docs/hppo.md, "Winners the policy can follow").
  c.margin = 0.4
  c.pareto = True                     # keep a pair only if Purity(w) >= Purity(l)
  c.min_winner_purity = 0.0           # and, if > 0, only if Purity(w) >= this
  # The DPO temperature. Δ is a difference of per-example denoising errors (about 1 in target
  # units), so at 200 every pair saturates: implicit margins of 160-390, and the pairs the
  # policy still had wrong drove steps that undid the SFT term's (after 1,200 updates the fit
  # queries' oracle Joint@20 was 0.33, against 0.57 at β 0.001). At 2 the DPO term stays in
  # its active range and costs the SFT term nothing measured (docs/hppo.md, "One target per
  # query").
  c.beta = 2.0
  # + sft_weight * e_theta(target): a supervised pull toward the target below. DPO alone left
  # the policy where it was with winners at 0.9 in the pool; with this term (and the margin
  # above, and a higher rate) it moved toward them.
  c.sft_weight = 5.0
  # What the SFT term pulls toward: "best", each pair's query's best candidate in the pool
  # (highest Joint, then Purity), or "winner", the pair's own winner. A query's winners differ
  # (any candidate clearly above some loser wins a pair), so pulling toward all of them asks
  # for their average; the best is one target per query (docs/hppo.md, "One target per query").
  c.sft_target = "best"
  # Updates before the first pool that regress the policy on every fit query's best
  # policy-free candidate (the pool's candidates that need no model: centroids, feedback,
  # neighbourhood), with the SFT term alone; 0: none. A multiple of `pool_every`.
  c.regress_steps = 0
  # The share of the regression phase's fit queries whose seeds' latent clusters are hidden:
  # their neighbourhood candidates and neighbour evidence leave out those clusters' train items,
  # and their target is the best of the candidates built without them
  # (`UNSEEN_PATTERN_POLICIES`), the unseen-pattern case that pattern holdout asks about. Off:
  # with neighbour evidence it traded item holdout for pattern holdout at no mean gain
  # (docs/hppo.md, "Unseen patterns in the targets, and a longer regression").
  c.hide_cluster_prob = 0.0
  # Ask each fit query's seed set about every domain, not only its own
  # (`query_split.with_every_domain`): a (pattern, domain) pair no train query asks about
  # has no target otherwise, and the model answered such item-holdout queries below the seed
  # average on the real development catalog. Item holdout +0.02 to +0.06 Joint@20 there, +0.01
  # to +0.03 on the development world (docs/hppo.md, "Every domain of a fit seed set").
  c.every_domain = True
  return c


def uses_best_target(config: ml_collections.ConfigDict) -> bool:
  """Whether the SFT term pulls toward each query's best candidate (`hppo.sft_target`).

  A run config saved before the field existed pulled toward the pair's winner.
  """
  value = config.get("sft_target", "winner")
  if value not in SFT_TARGETS:
    raise errors.UserError(f"hppo.sft_target {value!r}: known {', '.join(SFT_TARGETS)}")
  return value == "best"


def regression_only(config: ml_collections.ConfigDict) -> bool:
  """Whether a run (its stage config) is the regression phase alone: it builds no pool."""
  return int(config.hppo.get("regress_steps", 0)) >= int(config.num_steps)


def policies_trained_on(config: ml_collections.ConfigDict) -> list[str]:
  """The policies whose candidates can reach a run's updates (its stage config).

  All of `hppo.policies`, less the model-sampled ones when the regression phase is the whole
  run (no pool is built).
  """
  names = parse_policies(config.hppo.policies)
  if regression_only(config):
    names = [p for p in names if p not in MODEL_POLICIES]
  return names


def parse_policies(value: str) -> list[str]:
  """The pool's policies from a comma-separated string; unknown names are an error."""
  names = variants.split(value)
  unknown = [p for p in names if p not in POLICIES]
  if unknown or not names:
    raise errors.UserError(f"hppo.policies {value!r}: unknown or empty; known: "
                           f"{', '.join(POLICIES)}")
  return [p for p in POLICIES if p in names]


# ----------------------------------------------------------------------------- pairs


def pareto_pairs(joint: np.ndarray, purity: np.ndarray, margin: float,
                 pareto: bool = True,
                 min_winner_purity: float = 0.0) -> tuple[np.ndarray, dict[str, int]]:
  """Preference pairs of candidates, per query.

  Args:
    joint: float [Q, C] oracle Joint@K of each candidate.
    purity: float [Q, C] oracle Purity@K.
    margin: a pair (w, l) needs joint[w] > joint[l] + margin.
    pareto: also require purity[w] >= purity[l] (the Pareto pair filter).
    min_winner_purity: also require purity[w] >= this (0: no floor).

  Returns:
    (int64 [P, 3] rows (query, winner, loser) in (query, winner, loser) order, counts):
    counts has `candidate_pairs` (unordered pairs of distinct candidates), `margin_pairs`
    (pairs passing the margin) and `kept_pairs` (after the Pareto filter and purity floor).
  """
  joint = np.asarray(joint, np.float64)
  purity = np.asarray(purity, np.float64)
  if joint.shape != purity.shape or joint.ndim != 2:
    raise ValueError(f"joint {joint.shape} and purity {purity.shape} must be equal [Q, C]")
  num_queries, num_candidates = joint.shape
  better = joint[:, :, None] > joint[:, None, :] + margin           # [Q, w, l]
  keep = better & (purity[:, :, None] >= purity[:, None, :]) if pareto else better
  if min_winner_purity > 0:
    keep &= purity[:, :, None] >= min_winner_purity
  pairs = np.argwhere(keep).astype(np.int64)
  counts = {"candidate_pairs": num_queries * num_candidates * (num_candidates - 1) // 2,
            "margin_pairs": int(better.sum()), "kept_pairs": len(pairs)}
  return pairs, counts


# ----------------------------------------------------------------------------- loss


def preference_drifts(apply_fn: Callable[..., jnp.ndarray], params: Any, reference: Any,
                      batch: Mapping[str, jax.Array], t: jax.Array, noise: jax.Array,
                      space: diffusion.TargetSpace
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-pair (e_θ(w) − e_ref(w), e_θ(l) − e_ref(l), e_θ(w)), each [B].

  Both members of a pair share t [B], noise [B, d] and the condition (`context`,
  `context_mask`, `domain` of the batch); `winner`, `loser` are unit embeddings [B, d]. The
  reference enters only through `stop_gradient`.
  """
  twice = lambda a: None if a is None else jnp.concatenate([a, a], axis=0)
  cond = diffusion.Condition(twice(batch["context"]), twice(batch["context_mask"]),
                             twice(batch["domain"]), twice(batch.get("evidence")))
  x0 = space.encode(jnp.concatenate([batch["winner"], batch["loser"]], axis=0), cond)
  # One call for winners and losers together: half the dispatches, the same numbers.
  e_policy = diffusion.denoising_error(apply_fn, params, x0, twice(t), twice(noise), cond)
  e_ref = jax.lax.stop_gradient(diffusion.denoising_error(
      apply_fn, reference, x0, twice(t), twice(noise), cond))
  drift_w, drift_l = jnp.split(e_policy - e_ref, 2)
  return drift_w, drift_l, jnp.split(e_policy, 2)[0]


def dpo_loss_fn(apply_fn: Callable[..., jnp.ndarray], space: diffusion.TargetSpace, beta: float,
                sft_weight: float = 0.0):
  """The engine's `loss_fn(params, batch, rng, reference)`: Diffusion-DPO on pairs.

  With e the per-example denoising error under one shared t and noise per pair,
  Δ = (e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l)) and the loss is
  mean(−log σ(−β Δ)) + sft_weight · mean(e_θ(s)); it is log 2 when θ = ref and sft_weight
  is 0. The SFT target s is the batch's `best` (the query's best candidate) when it has one,
  otherwise the winner w.
  """
  def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, reference: Any):
    shape = batch["best" if "best" in batch else "winner"].shape
    t_rng, noise_rng = jax.random.split(rng)
    t = jax.random.uniform(t_rng, (shape[0],), jnp.float32)
    noise = jax.random.normal(noise_rng, shape, jnp.float32)
    cond = diffusion.Condition(batch["context"], batch["context_mask"], batch["domain"],
                               batch.get("evidence"))

    def sft_error() -> jax.Array:
      # The SFT term's own target (the query's best candidate), under the pair's t and noise.
      return diffusion.denoising_error(apply_fn, params, space.encode(batch["best"], cond), t,
                                       noise, cond)

    if "winner" not in batch:
      # A batch of the regression phase (`hppo.regress_steps`): targets, no pairs. Its loss is
      # the SFT term alone, on the same scale as in the pair batches that follow.
      e_sft = sft_error()
      return sft_weight * jnp.mean(e_sft), {"sft_error": jnp.mean(e_sft)}
    drift_w, drift_l, e_sft = preference_drifts(apply_fn, params, reference, batch, t,
                                                noise, space)
    if "best" in batch and sft_weight:
      e_sft = sft_error()
    delta = drift_w - drift_l
    dpo = jnp.mean(-jax.nn.log_sigmoid(-beta * delta))
    loss = dpo + sft_weight * jnp.mean(e_sft)
    # The implicit reward margin of winners over losers, -beta * delta: 0 at the reference,
    # rising as the policy learns the pool's preferences.
    aux = {"dpo_loss": dpo, "implicit_accuracy": jnp.mean((delta < 0).astype(jnp.float32)),
           "implicit_margin": jnp.mean(-beta * delta),
           "winner_drift": jnp.mean(drift_w), "loser_drift": jnp.mean(drift_l)}
    return loss, aux

  return loss_fn


# ----------------------------------------------------------------------------- pools


@dataclasses.dataclass
class Pool:
  """One labelled candidate pool and its preference pairs."""
  queries: catalog_lib.Queries     # the training queries of this pool
  candidates: np.ndarray           # float32 [Q, C, d] unit query embeddings
  names: list[str]                 # [C] "<policy>:<variant>" of each candidate
  joint: np.ndarray                # float64 [Q, C]
  purity: np.ndarray               # float64 [Q, C]
  pairs: np.ndarray                # int64 [P, 3] (query, winner, loser)
  counts: dict[str, int]
  best: np.ndarray | None = None   # int64 [Q]: each query's best candidate (set by `build`)
  evidence: np.ndarray | None = None  # float32 [Q, E, d] for a model that reads evidence


@dataclasses.dataclass(frozen=True)
class _Candidates:
  """A pool's candidates and their oracle labels, before pairs and targets are drawn."""
  policies: tuple[str, ...]        # the policies whose candidates these are
  candidates: np.ndarray           # float32 [Q, C, d]
  names: list[str]                 # [C] "<policy>:<variant>"
  joint: np.ndarray                # float64 [Q, C]
  purity: np.ndarray               # float64 [Q, C]
  evidence: np.ndarray | None      # float32 [Q, E, d] or None

  def of(self, policies: Sequence[str]) -> "_Candidates":
    """The candidates of `policies` alone, in their order here (a subset of `self.policies`).

    A candidate depends on its own policy and the query only (each is labelled by its own
    search), so these are what a pool of `policies` alone would hold.
    """
    if tuple(policies) == self.policies:
      return self
    keep = np.array([n.split(":")[0] in policies for n in self.names])
    return _Candidates(tuple(policies), self.candidates[:, keep],
                       [n for n, k in zip(self.names, keep) if k], self.joint[:, keep],
                       self.purity[:, keep], self.evidence)


# The regression phase's policy-free candidates of the last run, by everything they depend on
# but the pool's policies: each candidate-policy ablation of a pipeline leaves one policy out
# of the main run's pool, and takes its candidates from the main run's (6 s a run at 12,000
# fit queries, and as long again for the oracle's labels).
_POLICY_FREE: memo.Memo[_Candidates] = memo.Memo("hppo_policy_free", kept=1)


class CandidatePools:
  """Builds the hybrid candidate pools of HPPO for training queries.

  Reads only what training may read: train queries (whose seeds are train items), the metric
  predictor's density over train items and their latent clusters (`source`), and the oracle's
  labels (train items only).
  """

  def __init__(self, catalog: catalog_lib.Catalog, source: trajectories.TrajectorySource,
               oracle: oracle_lib.OnlineOracle, apply_fn: Callable[..., jnp.ndarray],
               reference_params: Any, config: ml_collections.ConfigDict, null_domain: int,
               space: diffusion.TargetSpace, temperature: float = 1.0,
               evidence: evidence_lib.NeighbourEvidence | None = None):
    self._config = config
    self._evidence = evidence  # for a model that reads evidence
    self._hppo = config.hppo
    self._policies = parse_policies(self._hppo.policies)
    # The regression targets' policies: those whose candidates need no model.
    self._policy_free = tuple(p for p in self._policies if p not in MODEL_POLICIES)
    if len(catalog.queries["train"]) == 0:
      raise errors.UserError("HPPO needs train queries; queries_train.npz is empty")
    # Only the fit slice: the validation queries choose knobs and never train (query_split).
    self._queries = query_split.fit_queries(catalog)
    if self._hppo.get("every_domain", False):  # absent from run configs saved before it
      self._queries = query_split.with_every_domain(self._queries, catalog.num_domains)
    self._catalog = catalog
    self.embeddings = catalog.embeddings
    self._source = source
    self._oracle = oracle
    self._reference = reference_params
    # The SFT stage's tail centroids (context size 1: only the centroids are used).
    self._tail_centroids = trajectories.TailCentroidTargets(
        source, 1, float(config.sft.tail_fraction), config.sft.low_fraction, null_domain,
        config.seed)
    self._row_of = np.full(catalog.num_items, -1, np.int64)
    self._row_of[source.train_items] = np.arange(len(source.train_items))
    # The latent cluster of each train item by catalog id (-1 elsewhere): what a query hides.
    self._group_of = np.full(catalog.num_items, -1, np.int64)
    self._group_of[source.train_items] = source.assign
    self._hide_prob = float(self._hppo.get("hide_cluster_prob", 0.0))  # in [0, 1]: stage check
    self._global = (evidence_lib.global_directions(catalog)
                    if {"global_shift", "catalog_offset"} & set(self._policies) else None)
    # The whole catalog's embeddings, unlabelled (DESIGN section 2: training reads all
    # embeddings), searched for the `catalog_offset` policy in the index the model's own
    # catalog offsets search, so both read the same neighbourhoods.
    self._catalog_index = None
    if "catalog_offset" in self._policies:
      held = None if evidence is None else evidence.catalog_index
      self._catalog_index = held if held is not None else evidence_lib.offset_index(
          catalog.embeddings)
    self._pool_size = min(int(self._hppo.pool_queries), len(self._queries))
    self._sample = jax.jit(functools.partial(
        diffusion.sample_rows, apply=apply_fn, dim=catalog.dim,
        num_steps=int(config.diffusion.sample_steps), null_domain=null_domain, space=space,
        temperature=temperature))

  def _draw(self, pool_index: int) -> catalog_lib.Queries:
    rng = np.random.default_rng([self._config.seed, _POOL_STREAM, pool_index])
    return self._queries.take(
        np.sort(rng.choice(len(self._queries), self._pool_size, replace=False)))

  def _seed_clusters(self, queries: catalog_lib.Queries) -> np.ndarray:
    """int64 [Q, seeds]: the latent cluster of each seed."""
    rows = self._row_of[queries.seeds]
    if np.any(rows < 0):
      raise errors.UserError("a training query has a seed that is not a train item")
    return np.asarray(self._source.assign[rows], np.int64)

  def _tail(self, queries: catalog_lib.Queries) -> np.ndarray:
    """The tail centroid of each query's latent cluster (its seeds' majority) for its domain."""
    majority = [np.bincount(c).argmax() for c in self._seed_clusters(queries)]
    return np.stack([self._tail_centroids.tail_centroid(int(c), int(m))
                     for c, m in zip(majority, queries.domain)])

  def _model(self, params: Any, queries: catalog_lib.Queries, evidence: np.ndarray | None,
             scales: Sequence[float], num_noise: int, pool_index: int,
             stream: int) -> tuple[list[np.ndarray], list[str]]:
    """Samples of `params` at each guidance scale and noise seed: (embeddings, names)."""
    # The pool's rows are split over the local devices (see Generator.sample).
    rows, replicated = engine.local_row_shardings(len(queries))
    context, mask, domain, evidence = jax.device_put(
        (np.asarray(self.embeddings[queries.seeds], np.float32),
         np.ones(queries.seeds.shape, bool), queries.domain.astype(np.int32), evidence), rows)
    params = jax.device_put(params, replicated)
    out, names = [], []
    for scale in scales:
      for n in range(num_noise):
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
            jax.random.PRNGKey(self._config.seed), stream), pool_index), n)
        g = jax.device_put(np.full(len(queries), float(scale), np.float32), rows)
        out.append(np.asarray(self._sample(params, context, mask, domain, g,
                                           jax.device_put(rng, replicated), evidence)))
        names.append(f"g{scale:g}/n{n}")
    return out, names

  def _feedback(self, start: np.ndarray, queries: catalog_lib.Queries) -> list[np.ndarray]:
    """Rocchio relevance-feedback candidates from `start` [Q, d], one per round.

    A query with no hit in a round keeps its candidate (there is nothing to move toward).
    """
    depth = int(self._hppo.feedback_depth)
    current = evidence_lib.normalize(np.asarray(start, np.float32))
    out = []
    for _ in range(int(self._hppo.feedback_rounds)):
      ids = self._oracle.search(current, queries.seeds, depth)
      hits = self._oracle.item_hits(ids, queries)
      emb = np.asarray(self.embeddings[ids], np.float32)             # [Q, depth, d]
      num_hits = hits.sum(axis=1, keepdims=True)
      hit_mean = (emb * hits[..., None]).sum(axis=1) / np.maximum(num_hits, 1)
      step = np.where(num_hits > 0, hit_mean - emb.mean(axis=1), 0.0)
      current = evidence_lib.normalize(current + step)
      out.append(current)
    return out

  def build(self, params: Any, pool_index: int) -> Pool:
    """The labelled pool `pool_index` with the current policy `params` (host or device)."""
    return self._build(params, self._draw(pool_index), pool_index)

  def build_policy_free(self) -> Pool:
    """Every fit query with the candidates that need no model, labelled; no pairs.

    The targets of the regression phase (`hppo.regress_steps`): its `best` is each query's
    best candidate among the centroids, feedback and neighbourhood candidates.
    """
    queries = self._queries
    rng = np.random.default_rng([self._config.seed, _POOL_STREAM, _HIDE_STREAM])
    # A pattern spans several latent clusters (k-means is finer than patterns), so hiding the
    # seeds' majority cluster would leave the pattern's other train items in the neighbourhood:
    # every cluster a seed falls in is hidden.
    hide = rng.random(len(queries)) < self._hide_prob
    hidden = np.sort(np.where(hide[:, None], self._seed_clusters(queries), -1), axis=1)
    # Each cluster once per query (-1 for a repeat): the searches below skip a group per column.
    hidden[:, 1:][hidden[:, 1:] == hidden[:, :-1]] = -1
    found = _POLICY_FREE.get(
        self._policy_free_key(), lambda: self._candidates(None, queries, -1, hidden),
        accept=lambda c: set(self._policy_free) <= set(c.policies))
    return self._pool(queries, found.of(self._policy_free), -1, hidden)

  def _policy_free_key(self) -> bytes:
    """What the policy-free candidates depend on besides the policies: the config (less
    `hppo.policies`), the catalog's embeddings, item split and train-side truth (the
    oracle's), the fit queries, and the data path (train items, latent clusters, density)."""
    config = self._config.to_dict()
    config["hppo"] = {k: v for k, v in config["hppo"].items() if k != "policies"}
    catalog, source = self._catalog, self._source
    return memo.digest(config, memo.rows_digest(catalog.embeddings, np.arange(catalog.num_items)),
                       np.asarray(catalog.item_split), np.asarray(catalog.patterns),
                       np.asarray(catalog.attributes), np.asarray(catalog.observed),
                       self._queries.seeds, self._queries.pattern,
                       self._queries.domain, np.asarray(source.train_items),
                       np.asarray(source.assign), np.asarray(source.density))

  def _build(self, params: Any, queries: catalog_lib.Queries, pool_index: int) -> Pool:
    """The labelled pool of `queries` with the model's candidates from `params`."""
    hidden = np.full((len(queries), 1), -1, np.int64)
    return self._pool(queries, self._candidates(params, queries, pool_index, hidden),
                      pool_index, hidden, with_model=True)

  def _candidates(self, params: Any, queries: catalog_lib.Queries, pool_index: int,
                  hidden: np.ndarray) -> _Candidates:
    """The candidates of `queries`, labelled; `params` None: only those that need no model.

    `hidden` int [Q, g]: latent clusters per query to hide (-1: none), see
    `hide_cluster_prob`.
    """
    hppo = self._hppo
    with_model = params is not None
    if with_model and np.any(hidden >= 0):
      raise ValueError("only the regression targets hide clusters: the model's candidates "
                       "would read the hidden cluster's evidence")
    centroid = evidence_lib.seed_centroids(self.embeddings, queries.seeds)
    tail = self._tail(queries)
    evidence = None
    if self._evidence is not None:
      # Seeds are train items: they are excluded from their own neighbourhood.
      evidence = self._evidence(np.asarray(self.embeddings[queries.seeds], np.float32),
                                np.ones(queries.seeds.shape, bool), queries.domain,
                                exclude_items=queries.seeds,
                                exclude_group=hidden if np.any(hidden >= 0) else None)
    candidates: list[np.ndarray] = []
    names: list[str] = []

    def add(policy_name: str, embeddings: list[np.ndarray], variants: list[str]) -> None:
      if policy_name in self._policies:
        candidates.extend(evidence_lib.normalize(e) for e in embeddings)
        names.extend(f"{policy_name}:{v}" for v in variants)

    if with_model:
      policy, policy_names = self._model(params, queries, evidence, hppo.policy_guidance,
                                         int(hppo.policy_noise_seeds), pool_index, 0)
      add("policy", policy, policy_names)
    if with_model and "reference" in self._policies:
      ref, ref_names = self._model(self._reference, queries, evidence,
                                   hppo.reference_guidance, 1,
                                   pool_index, 1)
      add("reference", ref, ref_names)
    add("seed_centroid", [centroid], ["mean"])
    if self._global is not None:
      steps = [float(a) for a in hppo.global_steps]
      direction = self._global[queries.domain]
      add("global_shift", [centroid + a * direction for a in steps], [f"a{a:g}" for a in steps])
    add("tail_centroid", [centroid + a * (tail - centroid) for a in hppo.tail_extrapolation],
        [f"a{a:g}" for a in hppo.tail_extrapolation])
    # Interpolations toward the policy's sample at the last `policy_guidance` scale, from either
    # heuristic anchor.
    if with_model:
      top = policy[(len(hppo.policy_guidance) - 1) * int(hppo.policy_noise_seeds)]
      weights = list(hppo.interpolation_weights)
      add("interpolation",
          [(1 - w) * anchor + w * top for anchor in (centroid, tail) for w in weights],
          [f"{a}{w:g}" for a in ("centroid", "tail") for w in weights])
    if "feedback" in self._policies:
      add("feedback", self._feedback(centroid, queries),
          [f"r{r + 1}" for r in range(int(hppo.feedback_rounds))])
    if "neighbourhood" in self._policies:
      size = int(hppo.neighbourhood_size)
      contrast = oracle_lib.local_directions(self._catalog, self._oracle, queries, [size],
                                             oracle_labels=True,
                                             hidden=(self._group_of, hidden))[size]
      steps = [float(a) for a in hppo.neighbourhood_steps]
      add("neighbourhood", [centroid + a * contrast for a in steps], [f"a{a:g}" for a in steps])
    if self._catalog_index is not None:
      size = int(hppo.offset_size)
      means = np.asarray(self.embeddings[queries.seeds], np.float32).mean(axis=1)
      offset = evidence_lib.catalog_offsets(self.embeddings, self._catalog_index, means,
                                            queries.seeds, [size])[size]
      direction = self._global[queries.domain]
      grid = [(float(a), float(b)) for a in hppo.offset_shifts for b in hppo.offset_steps]
      add("catalog_offset", [centroid + a * direction + b * offset for a, b in grid],
          [f"a{a:g}b{b:g}" for a, b in grid])
    self._check_enough(len(candidates))
    stacked = np.stack(candidates, axis=1).astype(np.float32)  # [Q, C, d]
    num_q, num_c = stacked.shape[:2]
    flat = queries.take(np.repeat(np.arange(num_q), num_c))  # row q * num_c + c
    scores = self._oracle.score(stacked.reshape(num_q * num_c, -1), flat)
    k = self._oracle.k
    policies = tuple(self._policies) if with_model else self._policy_free
    return _Candidates(policies, stacked, names, scores[f"joint@{k}"].reshape(num_q, num_c),
                       scores[f"purity@{k}"].reshape(num_q, num_c), evidence)

  def _check_enough(self, num_candidates: int) -> None:
    if num_candidates < 2:
      raise errors.UserError(f"hppo.policies={self._hppo.policies!r} gives {num_candidates} "
                             "candidate per query; pairs need at least 2")

  def _pool(self, queries: catalog_lib.Queries, found: _Candidates, pool_index: int,
            hidden: np.ndarray, with_model: bool = False) -> Pool:
    """The pool of labelled candidates `found`: its pairs and each query's best candidate."""
    hppo = self._hppo
    names, joint, purity = found.names, found.joint, found.purity
    self._check_enough(len(names))
    pairs, counts = pareto_pairs(joint, purity, float(hppo.margin), bool(hppo.pareto),
                                 float(hppo.min_winner_purity))
    if with_model and not len(pairs):
      raise errors.UserError(
          f"HPPO pool {pool_index} has no preference pair after the margin "
          f"{hppo.margin} and Pareto filter: lower hppo.margin or add policies")
    # Highest Joint, ties broken by Purity (lexsort's last key is the primary one). A query
    # with a hidden cluster chooses among the candidates built without that cluster.
    allowed = np.array([n.split(":")[0] in UNSEEN_PATTERN_POLICIES for n in names])
    if np.any(hidden >= 0) and not allowed.any():
      raise errors.UserError(
          f"hppo.hide_cluster_prob > 0 needs one of the policies "
          f"{', '.join(UNSEEN_PATTERN_POLICIES)} in hppo.policies={hppo.policies!r}")
    eligible = ~np.any(hidden >= 0, axis=1)[:, None] | allowed[None, :]
    best = np.lexsort((purity, np.where(eligible, joint, -np.inf)), axis=1)[:, -1]
    counts["hidden_queries"] = int(np.sum(np.any(hidden >= 0, axis=1)))
    return Pool(queries, found.candidates, names, joint, purity, pairs, counts, best=best,
                evidence=found.evidence)


class PairBatches:
  """The engine hooks of HPPO: `before_step` rebuilds the pool, `__call__` gives pair batches."""

  def __init__(self, pools: CandidatePools, config: ml_collections.ConfigDict):
    self._best = uses_best_target(config.hppo)
    self._pools = pools
    self._every = int(config.hppo.pool_every)
    self._seed = int(config.seed)
    self._regress_steps = int(config.hppo.get("regress_steps", 0))
    self._pool: Pool | None = None
    self._pool_index = -1
    self._targets: Pool | None = None  # the regression phase's, built once

  def _regressing(self, step: int) -> bool:
    return step < self._regress_steps

  def before_step(self, step: int, state: Any) -> dict[str, float] | None:
    """Builds what the batches of `step` draw from, when it is not built yet.

    During the regression phase: the targets, once. After it: the pool from the policy at
    `step`, when `step` starts a new pool period.
    """
    if self._regressing(step):
      if self._targets is not None:
        return None
      self._targets = pool = self._pools.build_policy_free()
      index = -1
    else:
      index = step // self._every
      if index == self._pool_index:
        return None
      pool = self._pools.build(engine.host_copy(state.params), index)
      self._pool, self._pool_index = pool, index
    policy_of = np.array([name.split(":")[0] for name in pool.names])
    # The policy of each query's best candidate as `build` chose it (ties on Joint broken by
    # Purity), the one the SFT term pulls toward.
    best = policy_of[pool.best]
    scalars = {f"pool/{k}": float(v) for k, v in pool.counts.items()}
    scalars["pool/best_joint"] = float(pool.joint.max(axis=1).mean())
    for policy in dict.fromkeys(policy_of):
      # Per policy: its candidates' mean Joint, and the share of queries it wins outright.
      scalars[f"pool/mean_joint/{policy}"] = float(pool.joint[:, policy_of == policy].mean())
      scalars[BEST_SHARE_KEY + policy] = float(np.mean(best == policy))
    logging.info(
        "HPPO %s at step %d: %d queries x %d candidates; pairs %d -> %d (margin) -> %d "
        "(Pareto); mean best Joint %.3f; mean Joint per policy %s",
        "regression targets" if index < 0 else f"pool {index}", step,
        *pool.joint.shape, pool.counts["candidate_pairs"], pool.counts["margin_pairs"],
        pool.counts["kept_pairs"], scalars["pool/best_joint"],
        {k.rsplit("/", 1)[1]: round(v, 3) for k, v in scalars.items()
         if k.startswith("pool/mean_joint/")})
    return scalars

  def __call__(self, step: int, process_index: int, process_count: int,
               batch_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self._seed, _PAIR_STREAM, step])
    if self._regressing(step):
      pool = self._targets
      if pool is None:
        raise RuntimeError("HPPO batch requested before its targets were built")
      # Targets without pairs: the loss is the SFT term's alone (dpo_loss_fn).
      query = rng.integers(0, len(pool.queries), size=batch_size)
      query = query[data.process_slice(batch_size, process_index, process_count)]
      return self._batch(pool, query, best=pool.best[query])
    pool = self._pool
    if pool is None or self._pool_index != step // self._every:
      raise RuntimeError("HPPO batch requested before its pool was built (call before_step)")
    rows = pool.pairs[rng.integers(0, len(pool.pairs), size=batch_size)]
    rows = rows[data.process_slice(batch_size, process_index, process_count)]
    query, winner, loser = rows.T
    return self._batch(pool, query, winner=winner, loser=loser,
                       best=pool.best[query] if self._best else None)

  def _batch(self, pool: Pool, query: np.ndarray, **candidates: np.ndarray | None
             ) -> dict[str, np.ndarray]:
    """The condition of each row of `query`, and the candidates named by `candidates`."""
    seeds = pool.queries.seeds[query]
    batch = {"context": np.asarray(self._pools.embeddings[seeds], np.float32),
             "context_mask": np.ones(seeds.shape, bool),
             "domain": pool.queries.domain[query].astype(np.int32)}
    batch.update({name: pool.candidates[query, column]
                  for name, column in candidates.items() if column is not None})
    if pool.evidence is not None:
      batch["evidence"] = pool.evidence[query]
    return batch
