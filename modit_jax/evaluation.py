"""Evaluation: every method on the 8 cells, with CIs, paired significance and raw ids.

DESIGN.md section 6. A cell is (split, domain) for the two holdout protocols. For every method
the retrieved ids of every evaluation query are kept (`retrieved/<method>_<split>.npz`, ids
int32 [Q, max K], in the order of `queries_<split>.npz`) and all numbers in `results.json` and
`report.md` are computed from them and the dataset files alone, so anyone can recompute them.

Significance (modit_jax/stats.py, docs/statistics.md): every comparison of a method with a
reference is one family over the cells, tested one-sided in each direction, Holm-corrected;
a `+` (`-`) cell is a significant gain (loss): corrected p < 0.05 and the paired bootstrap
interval of the mean difference above (below) 0.

The reference named `strongest_baseline` is, per domain, the competitor (a non-oracle baseline)
with the best oracle Joint@20 on the validation queries (`query_split`), never chosen on an
evaluation cell; the choice only names a comparison row, it changes no method's numbers.
"""

import dataclasses
import json
import os
import time
from typing import Any, Sequence

from absl import logging
import ml_collections
import numpy as np

from modit_jax import baselines
from modit_jax import catalog as catalog_lib
from modit_jax import clusters
from modit_jax import errors
from modit_jax import evidence
from modit_jax import generative
from modit_jax import metric_predictor
from modit_jax import metrics
from modit_jax import novelty
from modit_jax import oracle as oracle_lib
from modit_jax import query_split
from modit_jax import retrieval
from modit_jax import run_dir
from modit_jax import stats
from modit_jax import variants

EVAL_SPLITS = ("item_holdout", "pattern_holdout")
STRONGEST_BASELINE = "strongest_baseline"
HEADLINE = "joint@20"
RETRIEVED_DIR = "retrieved"


def default_config() -> ml_collections.ConfigDict:
  """The evaluation schema; `configs/evaluate.py` starts from it."""
  c = ml_collections.ConfigDict()
  # Comma-separated, so that `--config.methods=a,b` overrides it from the command line.
  c.methods = ",".join(baselines.REGISTRY)
  c.references = f"seed_centroid,{STRONGEST_BASELINE}"
  c.splits = ",".join(EVAL_SPLITS)
  c.ks = metrics.KS
  c.index_kind = "scann"          # the full-catalog index searched at evaluation
  c.oracle_k = 20                 # K of the train-only oracle that tunes the baselines' knobs
  c.oracle_index_kind = "scann"
  # Both ScaNN indexes search at least this share of their leaves: the serving default caps a
  # query at 60k items above 1M, which at 10M items cost the baselines 0.03-0.07 Joint@20
  # (oracle_shift 0.965 -> 0.914; docs/benchmarks.md). The same index up to 1M items.
  c.search_share = retrieval.LEAF_SHARE
  c.shift_grid = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0)
  c.rerank_pool_grid = (50, 100, 200, 400, 800)
  # local_shift: train items around the seed centroid whose labels give the direction, and the
  # step along it (the direction is a difference of means, not unit length).
  c.local_neighbourhood_grid = (50, 100, 200, 400, 800)
  c.local_shift_grid = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
  # neighbourhood_offset: catalog items around the seed centroid whose mean the seeds step
  # toward, and the step (a difference of means: 0.02-0.1 long on unit embeddings, hence steps
  # up to 32); the global shift beside it takes `shift_grid`. No step is always tried, so
  # where no step pays the method is the global shift itself, shift for shift.
  c.offset_neighbourhood_grid = (50, 100, 200, 400, 800)
  c.offset_step_grid = (1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
  # A domain takes a step only where the best of the ~600 step values beats the best of the 14
  # without one at this family-wise level (max-t sign flips over the validation queries; 1:
  # the one-standard-error rule alone). On the synthetic worlds the steps' p is at its floor;
  # on real catalogs a step picked at ~1.5-2 standard errors lost on both held-out splits
  # (docs/novelty.md, "A step must beat chance").
  c.offset_step_alpha = 0.05
  c.metric_predictor = metric_predictor.default_config()
  # Training workdirs of the generative methods (empty: not trained; the method is refused).
  # These are the pipeline's; any other name given a workdir (the pipeline adds one per run it
  # trains) is a generative method too.
  c.workdirs = ml_collections.ConfigDict({name: "" for name in generative.GENERATIVE_METHODS})
  c.num_samples = 1               # query embeddings sampled per query, searched and merged
  # Classifier-free guidance scales tried per domain on train queries (empty: training value).
  # 1.3-2x apart up to 64: anchored models (docs/diffusion.md) pick 24-96 on the default world,
  # where the grid's top used to be 16, and 1-4 on the real catalog (docs/decisions.md).
  c.guidance_grid = (1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)
  # Train queries the guidance is tuned on (0: all). Sampling every train query at every grid
  # value dominated evaluation time; 1000 (250 per domain) resolves the grid's differences.
  c.guidance_tune_queries = 1000
  # >= 0: only guidance scales whose train Purity@k is within this of the grid's best are
  # admitted (a pattern-preserving choice); < 0: the best train Joint@k, whatever its purity.
  c.guidance_purity_tolerance = -1.0
  # The novelty gate (modit_jax/novelty.py, docs/novelty.md): these generative methods answer
  # seed sets from a region with no train items with the tuned global shift; each is also
  # reported ungated as `<method>_no_gate`. Comma-separated; empty: no gate.
  # purity_tolerance >= 0: the fallback's shift per domain is the best validation Joint@k among
  # those whose validation Purity@k is within it of the grid's purest (a = 0, the seed average,
  # on the catalogs measured), trading Joint for purity; < 0: the global shift's own (default).
  # fallback: the baseline whose validation-tuned query a novel seed set gets, one of
  # novelty.FALLBACKS (docs/novelty.md, "The neighbourhood offset: a competitor, and the
  # fallback").
  c.novelty_gate = ml_collections.ConfigDict({
      "methods": "modit_hppo", "neighbours": novelty.NEIGHBOURS,
      "train_quantile": novelty.TRAIN_QUANTILE, "purity_tolerance": -1.0,
      "fallback": "neighbourhood_offset"})
  # > 0: every query (validation ones too) is asked with only its first `seed_limit` seeds;
  # the others become ordinary items (docs/robustness.md). 0: all seeds.
  c.seed_limit = 0
  c.num_resamples = 10_000
  c.seed = 0
  return c


def split_names(value: str, what: str, allow_empty: bool = False) -> list[str]:
  """Splits a comma-separated config string; refuses an empty list unless `allow_empty`."""
  names = variants.split(value)
  if not names and not allow_empty:
    raise errors.UserError(f"config.{what} is empty")
  return names


@dataclasses.dataclass
class Evaluation:
  """Everything an evaluation produced, in memory."""
  records: list[dict[str, Any]]
  retrieved: dict[str, dict[str, np.ndarray]]   # method -> split -> ids [Q, max K]
  scores: dict[str, dict[str, dict[str, np.ndarray]]]  # method -> split -> metric -> [Q]
  knobs: dict[str, Any]
  strongest_baseline: dict[str, str]   # domain -> competitor chosen on validation queries
  meta: dict[str, Any]


class TrainIndex:
  """The online oracle's train-item index behind `retrieval.Index.search`'s signature.

  A fitted method answers validation queries through it, scored by the oracle: how the
  strongest competitor is chosen without looking at an evaluation cell.
  """

  def __init__(self, oracle: oracle_lib.OnlineOracle):
    self._oracle = oracle

  def search(self, queries: np.ndarray, k: int,
             exclude: np.ndarray | None = None) -> tuple[np.ndarray, None]:
    return self._oracle.search(queries, exclude, k), None


def retrieve_all(catalog: catalog_lib.Catalog, methods: Sequence[str], splits: Sequence[str],
                 config: ml_collections.ConfigDict, index: retrieval.Index | None = None
                 ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any], dict[str, Any]]:
  """Fits every method (knobs on validation queries) and retrieves max(ks) ids for every split.

  `index`: an index over `catalog.embeddings` the caller holds (the pipeline's serving
  index), searched instead of building one when it is of `config.index_kind` (else one is
  built), and read for the models' catalog offsets when it is the default one.

  `meta["validation"][method][domain]` is a baseline's mean oracle Joint@k on the validation
  queries, what the strongest competitor is chosen by.
  """
  # A generative method is any name with a training workdir entry (the pipeline adds one per
  # run it trains); the others are baselines.
  known = tuple(baselines.REGISTRY) + tuple(m for m in config.workdirs
                                            if m not in baselines.REGISTRY)
  unknown = [m for m in methods if m not in known]
  if unknown:
    raise errors.UserError(
        f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; known: "
        f"{', '.join(known)}")
  for split in splits:
    if split not in catalog_lib.SPLITS:
      raise errors.UserError(f"unknown split {split!r}; known: {', '.join(catalog_lib.SPLITS)}")
  # Before the index is built: a missing model should not cost the user the index build.
  for name in methods:
    if name not in baselines.REGISTRY:
      generative.check_workdir(name, config.workdirs[name])
  k = max(config.ks)
  # The oracle's index first: its build copies the train rows out of the (memory-mapped)
  # catalog and ScaNN copies them again, and that transient peak is smaller without the
  # catalog's index already held (bench/large_world.py measures the step's memory).
  oracle = oracle_lib.OnlineOracle(catalog, config.oracle_k, config.oracle_index_kind,
                                   config.search_share)
  start = time.perf_counter()
  held = index if index is not None and index.num_items == catalog.num_items else None
  reused = held is not None and held.kind == config.index_kind
  if not reused:
    index = retrieval.build_index(np.asarray(catalog.embeddings), config.index_kind)
  # The models' catalog offsets read an index as built (the neighbourhoods they were trained
  # on when it is the default one, `evidence.offset_index`): the caller's, else this one. The
  # methods' answers are searched with more leaves.
  offsets_index = held if held is not None else index
  index = retrieval.searching_leaf_share(index, config.search_share)
  meta = {"index": {"kind": index.kind, "params": index.params, "reused": reused,
                    "build_seconds": round(time.perf_counter() - start, 2)},
          "validation": {}}
  # Without train queries nothing is tuned or chosen; methods with no knob still answer.
  validation = (query_split.validation_queries(catalog) if len(catalog.queries["train"]) >= 2
                else None)
  gated = split_names(config.novelty_gate.methods, "novelty_gate.methods", allow_empty=True)
  not_generative = [m for m in gated if m in baselines.REGISTRY]
  if not_generative:
    raise errors.UserError(f"novelty_gate.methods names baseline(s) {', '.join(not_generative)}"
                           ": the gate stands in front of a generative model")
  retrieved, knobs, fitted_baselines = {}, {}, {}
  gate = None
  for name in methods:
    start = time.perf_counter()
    if name in baselines.REGISTRY:
      if name not in fitted_baselines:  # the gate may have fitted its fallback already
        fitted_baselines[name] = baselines.fit(name, catalog, oracle, config, index)
      answers = {name: fitted_baselines[name]}
    else:
      if name in gated and gate is None:
        gate = _novelty_gate(catalog, oracle, config, fitted_baselines, index, splits, gated,
                             meta)
      answers = generative.fit(name, config.workdirs[name], catalog, oracle, config,
                               gate=gate if name in gated else None, index=offsets_index)
    if validation is not None and name in baselines.REGISTRY:
      joint = oracle.score_ids(answers[name].retrieve(validation, TrainIndex(oracle), oracle.k),
                               validation)[f"joint@{oracle.k}"]
      meta["validation"][name] = {
          d: float(joint[validation.domain == m].mean())
          for m, d in enumerate(catalog.domains) if np.any(validation.domain == m)}
    for answer, fitted in answers.items():
      retrieved[answer] = {s: fitted.retrieve(catalog.queries[s], index, k).astype(np.int32)
                           for s in splits}
      knobs[answer] = fitted.knob
    logging.info("%s: fitted and retrieved in %.1f s%s", name, time.perf_counter() - start,
                 f" (knob {answers[name].knob})" if answers[name].knob else "")
  return retrieved, knobs, meta


def _novelty_gate(catalog: catalog_lib.Catalog, oracle: oracle_lib.OnlineOracle,
                  config: ml_collections.ConfigDict, fitted: dict[str, baselines.Fitted],
                  index: retrieval.Index, splits: Sequence[str], gated: list[str],
                  meta: dict[str, Any]) -> novelty.Gate:
  """The gate whose fallback is the `novelty_gate.fallback` baseline as tuned on validation
  queries (purity-constrained when `novelty_gate.purity_tolerance` >= 0); records it in
  `meta`."""
  tolerance = float(config.novelty_gate.purity_tolerance)
  name = config.novelty_gate.fallback
  if name not in novelty.FALLBACKS:
    raise errors.UserError(f"novelty_gate.fallback must be one of {', '.join(novelty.FALLBACKS)}"
                           f", got {name!r}")
  if tolerance < 0:  # the reported baseline itself, fitted once for its row and the gate
    if name not in fitted:
      fitted[name] = baselines.fit(name, catalog, oracle, config, index)
    chosen = fitted[name]
  elif name == "centroid_global_shift":  # a purity-constrained twin; the report's row is not
    chosen = baselines.fit_global_shift(catalog, oracle, config.shift_grid, tolerance)
  else:
    chosen = baselines.fit_neighbourhood_offset(
        catalog, oracle, index, config.offset_neighbourhood_grid, config.shift_grid,
        config.offset_step_grid, tolerance, config.offset_step_alpha)
  if name == "centroid_global_shift":
    shifts, offsets = chosen.knob, None
  else:
    shifts = {d: v["shift"] for d, v in chosen.knob.items()}
    offsets = {d: (v["neighbours"], v["step"]) for d, v in chosen.knob.items()}
  gate = novelty.Gate.for_catalog(catalog, shifts, index,
                                  config.novelty_gate.neighbours,
                                  config.novelty_gate.train_quantile, offsets)
  novel = {}
  for split in splits:
    q = catalog.queries[split]
    if not len(q):  # no share to report (and no false warning of a gate that caught 0 %)
      continue
    centroids = evidence.seed_centroids(catalog.embeddings, q.seeds)
    novel[split] = float(gate.novel(index, centroids, q.seeds).mean())
  logging.info("novelty gate: share of novel seed sets per split %s", novel)
  for method in gated:
    if warning := novelty.miss_warning(novel, method, name):
      logging.warning("%s", warning)
  meta[novelty.JSON_KEY] = {"methods": gated, "novel_share": novel, "gate": gate.to_json(),
                            "fallback": name, "purity_tolerance": tolerance}
  return gate


def score_all(catalog: catalog_lib.Catalog, retrieved: dict[str, dict[str, np.ndarray]],
              ks: Sequence[int]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
  """Per-query metrics of every method and split, from the ids and the dataset alone."""
  counts = metrics.pattern_attribute_counts(catalog.patterns, catalog.attributes)
  out = {}
  for name, by_split in retrieved.items():
    out[name] = {}
    for split, ids in by_split.items():
      q = catalog.queries[split]
      out[name][split] = metrics.retrieval_metrics(ids, q.seeds, q.pattern, q.domain,
                                                   catalog.patterns, catalog.attributes, ks=ks,
                                                   counts=counts)
  return out


def strongest_per_domain(validation: dict[str, dict[str, float]]) -> dict[str, str]:
  """Domain -> the competitor with the best validation Joint (oracle methods excluded).

  Chosen on validation queries only, so the choice never looks at an evaluation cell; ties go
  to the earlier method in `baselines.REGISTRY`.
  """
  out, best = {}, {}
  for name, baseline in baselines.REGISTRY.items():
    if baseline.yardstick or name not in validation:
      continue
    for domain, joint in validation[name].items():
      if domain not in best or joint > best[domain]:
        out[domain], best[domain] = name, joint
  return out


def summarize(domain_names: Sequence[str], domains_by_split: dict[str, np.ndarray],
              scores: dict[str, dict[str, dict[str, np.ndarray]]],
              references: Sequence[str], strongest: dict[str, str], num_resamples: int,
              seed: int) -> list[dict[str, Any]]:
  """One record per method x split x domain, with CIs and tests against references.

  `domains_by_split[split]` is the domain id of each scored query (the rows of `scores`).
  Each comparison (method vs reference) is a family over the cells; `stats.correct_family`
  Holm-corrects its one-sided tests and marks significant gains and losses. The reference
  `strongest_baseline` is, in each cell, `strongest[domain]` (named in the test's `against`).
  """
  for ref in references:
    if ref != STRONGEST_BASELINE and ref not in scores:
      logging.warning("reference %s is not among the evaluated methods; skipped", ref)
  references = [ref for ref in dict.fromkeys(references)
                if ref in scores or (ref == STRONGEST_BASELINE and strongest)]
  records = []
  for name, by_split in scores.items():
    for split, per_query in by_split.items():
      domains = domains_by_split[split]
      for m, domain in enumerate(domain_names):
        rows = domains == m
        n = int(rows.sum())
        if n == 0:
          logging.warning("no %s queries for domain %s; cell skipped", split, domain)
          continue
        record = {"method": name, "split": split, "domain": domain, "n": n,
                  "oracle": name in baselines.REGISTRY and baselines.REGISTRY[name].yardstick}
        for key in sorted(per_query, key=_metric_order):
          record[key] = float(per_query[key][rows].mean())
        _, low, high = stats.mean_ci(per_query[HEADLINE][rows], num_resamples=num_resamples,
                                     seed=seed)
        record[f"{HEADLINE}_ci"] = [low, high]
        record["vs"] = {}
        for ref in references:
          against = strongest.get(domain) if ref == STRONGEST_BASELINE else ref
          if against is None or against == name or against not in scores:
            continue
          test = stats.paired_test(per_query[HEADLINE][rows],
                                   scores[against][split][HEADLINE][rows],
                                   num_resamples=num_resamples, seed=seed)
          record["vs"][ref] = {**test, "against": against}
        records.append(record)
  # Each comparison's cells are one family: Holm over them, per direction.
  for name in scores:
    mine = [r for r in records if r["method"] == name]
    for ref in references:
      tested = [r for r in mine if ref in r["vs"]]
      for r, verdict in zip(tested, stats.correct_family([r["vs"][ref] for r in tested])):
        r["vs"][ref] = verdict
  return records


def _metric_order(key: str) -> tuple[int, int]:
  name, k = key.split("@")
  return (("joint", "purity", "attr", "bound").index(name), int(k))


def data_diagnostics(catalog: catalog_lib.Catalog, methods: Sequence[str],
                     config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Per trained workdir of stages 2-3: metric-predictor validation and cluster agreement.

  The agreement of the latent clusters with the hidden true patterns (NMI, purity) is an
  evaluation-only diagnostic: training saved its cluster assignment, evaluation reads the truth.
  """
  out = {}
  for name in methods:
    workdir = "" if name in baselines.REGISTRY else config.workdirs.get(name, "")
    path = os.path.join(workdir, run_dir.DIAGNOSTICS_FILE) if workdir else ""
    if not path or not os.path.isfile(path):
      continue
    saved = np.load(path)
    agreement = clusters.agreement(saved["assign"],
                                   np.asarray(catalog.patterns)[saved["train_items"]])
    out[name] = {
        "cluster_nmi": agreement["nmi"], "cluster_purity": agreement["purity"],
        "num_clusters": int(saved["assign"].max()) + 1,
        "predictor": {d: {"auc": float(a), "ece": float(e), "n_heldout": int(n)}
                      for d, a, e, n in zip(catalog.domains, saved["predictor_auc"],
                                            saved["predictor_ece"], saved["predictor_n"])}}
  return out


def evaluate(catalog: catalog_lib.Catalog, config: ml_collections.ConfigDict,
             index: retrieval.Index | None = None) -> Evaluation:
  """Runs the configured methods on the configured splits and summarises them.

  `index`: the caller's index over `catalog.embeddings`, searched when it is of
  `config.index_kind` (`retrieve_all`); None: built.
  """
  methods = split_names(config.methods, "methods")
  splits = split_names(config.splits, "splits")
  references = split_names(config.references, "references")
  if 20 not in tuple(config.ks):
    raise errors.UserError(f"config.ks must include 20 (the headline K), got {config.ks}")
  seed_limit = int(config.get("seed_limit", 0))
  catalog = catalog_lib.with_first_seeds(catalog, seed_limit)
  retrieved, knobs, meta = retrieve_all(catalog, methods, splits, config, index)
  scores = score_all(catalog, retrieved, config.ks)
  strongest = strongest_per_domain(meta["validation"])
  records = summarize(catalog.domains, {s: catalog.queries[s].domain for s in splits}, scores,
                      references, strongest, config.num_resamples, config.seed)
  # The ungated twins of gated methods are methods of the results too.
  # Whoever rescores the saved ids from the dataset (pooling) must cut the seeds alike.
  meta.update({"methods": list(retrieved), "splits": splits, "references": references,
               "ks": list(config.ks), "seed_limit": seed_limit,
               "data_diagnostics": data_diagnostics(catalog, methods, config)})
  return Evaluation(records, retrieved, scores, knobs, strongest, meta)


def write(evaluation: Evaluation, workdir: str | os.PathLike, dataset: str) -> dict[str, Any]:
  """Writes results.json and retrieved/<method>_<split>.npz under workdir; returns the results.

  The returned dict is what results.json holds; `results_markdown.write_evaluation_report`
  renders it as report.md.
  """
  root = os.fspath(workdir)
  os.makedirs(os.path.join(root, RETRIEVED_DIR), exist_ok=True)
  for name, by_split in evaluation.retrieved.items():
    for split, ids in by_split.items():
      catalog_lib.save_npz(os.path.join(root, RETRIEVED_DIR, f"{name}_{split}.npz"), ids=ids)
  results = {"dataset": os.path.abspath(dataset), "strongest_baseline":
             evaluation.strongest_baseline, "knobs": evaluation.knobs, **evaluation.meta,
             "records": evaluation.records}
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
    f.write("\n")
  return results
