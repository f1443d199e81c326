"""Evaluation: every method on the 8 cells, with CIs, paired significance and raw ids.

DESIGN.md section 6. A cell is (split, domain) for the two holdout protocols. For every method
the retrieved ids of every evaluation query are kept (`retrieved/<method>_<split>.npz`, ids
int32 [Q, max K], in the order of `queries_<split>.npz`) and all numbers in `results.json` and
`report.md` are computed from them and the dataset files alone, so anyone can recompute them.

The reference named `strongest_baseline` resolves to the non-oracle baseline with the highest
mean Joint@20 over all evaluated queries; the choice only names a comparison row, it changes
no method's numbers.
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
from modit_jax import generative
from modit_jax import metric_predictor
from modit_jax import metrics
from modit_jax import oracle as oracle_lib
from modit_jax import retrieval
from modit_jax import stats
from modit_jax import training

EVAL_SPLITS = ("item_holdout", "pattern_holdout")
STRONGEST_BASELINE = "strongest_baseline"
HEADLINE = "joint@20"
RETRIEVED_DIR = "retrieved"


def default_config() -> ml_collections.ConfigDict:
  """The evaluation schema; `configs/evaluate.py` starts from it."""
  c = ml_collections.ConfigDict()
  # Comma-separated, so that `--config.methods=a,b` overrides it from the command line.
  c.methods = ",".join(baselines.BASELINES)
  c.references = f"seed_centroid,{STRONGEST_BASELINE}"
  c.splits = ",".join(EVAL_SPLITS)
  c.ks = metrics.KS
  c.index_kind = "scann"          # the full-catalog index searched at evaluation
  c.oracle_k = 20                 # K of the train-only oracle that tunes the baselines' knobs
  c.oracle_index_kind = "scann"
  c.shift_grid = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0)
  c.rerank_pool_grid = (50, 100, 200, 400, 800)
  c.metric_predictor = metric_predictor.default_config()
  # Training workdirs of the generative methods (empty: not trained; the method is refused).
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
  c.num_resamples = 10_000
  c.seed = 0
  return c


def split_names(value: str, what: str) -> list[str]:
  """Splits a comma-separated config string; refuses an empty list."""
  names = [n.strip() for n in str(value).split(",") if n.strip()]
  if not names:
    raise errors.UserError(f"config.{what} is empty")
  return names


@dataclasses.dataclass
class Evaluation:
  """Everything an evaluation produced, in memory."""
  records: list[dict[str, Any]]
  retrieved: dict[str, dict[str, np.ndarray]]   # method -> split -> ids [Q, max K]
  scores: dict[str, dict[str, dict[str, np.ndarray]]]  # method -> split -> metric -> [Q]
  knobs: dict[str, Any]
  strongest_baseline: str | None
  meta: dict[str, Any]


def retrieve_all(catalog: catalog_lib.Catalog, methods: Sequence[str], splits: Sequence[str],
                 config: ml_collections.ConfigDict
                 ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any], dict[str, Any]]:
  """Fits every method (knobs on train queries) and retrieves max(ks) ids for every split."""
  known = baselines.BASELINES + generative.GENERATIVE_METHODS
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
    if name in generative.GENERATIVE_METHODS:
      generative.check_workdir(name, config.workdirs[name])
  k = max(config.ks)
  start = time.perf_counter()
  index = retrieval.build_index(np.asarray(catalog.embeddings), config.index_kind)
  meta = {"index": {"kind": index.kind, "params": index.params,
                    "build_seconds": round(time.perf_counter() - start, 2)}}
  oracle = None
  retrieved, knobs = {}, {}
  for name in methods:
    start = time.perf_counter()
    if oracle is None and name not in ("seed_centroid", "global_attribute"):
      oracle = oracle_lib.OnlineOracle(catalog, config.oracle_k, config.oracle_index_kind)
    if name in generative.GENERATIVE_METHODS:
      fitted = generative.fit(name, config.workdirs[name], catalog, oracle, config)
    else:
      fitted = baselines.fit(name, catalog, oracle, config)
    retrieved[name] = {s: fitted.retrieve(catalog.queries[s], index, k).astype(np.int32)
                       for s in splits}
    knobs[name] = fitted.knob
    logging.info("%s: fitted and retrieved in %.1f s%s", name, time.perf_counter() - start,
                 f" (knob {fitted.knob})" if fitted.knob else "")
  return retrieved, knobs, meta


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


def strongest_baseline(scores: dict[str, dict[str, dict[str, np.ndarray]]]) -> str | None:
  """The non-oracle baseline with the highest mean Joint@20 over all evaluated queries."""
  best, best_mean = None, -1.0
  for name, by_split in scores.items():
    if name not in baselines.BASELINES or name in baselines.ORACLE_METHODS:
      continue
    mean = float(np.concatenate([s[HEADLINE] for s in by_split.values()]).mean())
    if mean > best_mean:
      best, best_mean = name, mean
  return best


def summarize(catalog: catalog_lib.Catalog,
              scores: dict[str, dict[str, dict[str, np.ndarray]]],
              references: Sequence[str], ks: Sequence[int], num_resamples: int,
              seed: int) -> tuple[list[dict[str, Any]], str | None]:
  """One record per method x split x domain, with CIs and paired tests against references."""
  strongest = strongest_baseline(scores)
  resolved = []
  for ref in references:
    name = strongest if ref == STRONGEST_BASELINE else ref
    if name is None or name not in scores:
      logging.warning("reference %s is not among the evaluated methods; skipped", ref)
    elif name not in resolved:
      resolved.append(name)
  records = []
  for name, by_split in scores.items():
    for split, per_query in by_split.items():
      domains = catalog.queries[split].domain
      for m, domain in enumerate(catalog.domains):
        rows = domains == m
        n = int(rows.sum())
        if n == 0:
          logging.warning("no %s queries for domain %s; cell skipped", split, domain)
          continue
        record = {"method": name, "split": split, "domain": domain, "n": n,
                  "oracle": name in baselines.ORACLE_METHODS}
        for key in sorted(per_query, key=_metric_order):
          record[key] = float(per_query[key][rows].mean())
        _, low, high = stats.mean_ci(per_query[HEADLINE][rows], num_resamples=num_resamples,
                                     seed=seed)
        record[f"{HEADLINE}_ci"] = [low, high]
        record["vs"] = {}
        for ref in resolved:
          if ref == name:
            continue
          test = stats.paired_test(per_query[HEADLINE][rows], scores[ref][split][HEADLINE][rows],
                                   num_resamples=num_resamples, seed=seed)
          record["vs"][ref] = {key: test[key] for key in (
              "diff", "ci_low", "ci_high", "p", "p_bootstrap", "significant_gain")}
        records.append(record)
  return records, strongest


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
    workdir = config.workdirs.get(name, "") if name in generative.GENERATIVE_METHODS else ""
    path = os.path.join(workdir, training.DIAGNOSTICS_FILE) if workdir else ""
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


def evaluate(catalog: catalog_lib.Catalog, config: ml_collections.ConfigDict) -> Evaluation:
  """Runs the configured methods on the configured splits and summarises them."""
  methods = split_names(config.methods, "methods")
  splits = split_names(config.splits, "splits")
  references = split_names(config.references, "references")
  if 20 not in tuple(config.ks):
    raise errors.UserError(f"config.ks must include 20 (the headline K), got {config.ks}")
  retrieved, knobs, meta = retrieve_all(catalog, methods, splits, config)
  scores = score_all(catalog, retrieved, config.ks)
  records, strongest = summarize(catalog, scores, references, config.ks, config.num_resamples,
                                 config.seed)
  meta.update({"methods": methods, "splits": splits, "references": references,
               "ks": list(config.ks), "data_diagnostics": data_diagnostics(catalog, methods,
                                                                           config)})
  return Evaluation(records, retrieved, scores, knobs, strongest, meta)


def write(evaluation: Evaluation, workdir: str | os.PathLike, dataset: str) -> None:
  """Writes results.json, report.md and retrieved/<method>_<split>.npz under workdir."""
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
  with open(os.path.join(root, "report.md"), "w") as f:
    f.write(report_markdown(evaluation, dataset))


def _label(record: dict[str, Any]) -> str:
  return f"{record['method']} (oracle)" if record["oracle"] else record["method"]


def headline_table(records: Sequence[dict[str, Any]], significance_vs: str | None = None) -> str:
  """The 8-cell markdown table: Joint@20 mean [95 % CI] per method per cell.

  A `+` marks a significant gain (p < 0.05, positive mean difference) over `significance_vs`.
  """
  def cell(r: dict[str, Any]) -> str:
    low, high = r[f"{HEADLINE}_ci"]
    mark = ("+" if significance_vs and r["vs"].get(significance_vs, {}).get("significant_gain")
            else "")
    return f"{r[HEADLINE]:.3f} [{low:.3f}, {high:.3f}]{mark}"
  return _cell_table(records, cell)


def metric_table(records: Sequence[dict[str, Any]], metric: str) -> str:
  """The 8-cell markdown table of one metric's mean (e.g. `purity@20`) per method per cell."""
  return _cell_table(records, lambda r: f"{r[metric]:.3f}")


def _cell_table(records: Sequence[dict[str, Any]], cell: Any) -> str:
  cells = list(dict.fromkeys((r["split"], r["domain"]) for r in records))
  methods = list(dict.fromkeys(_label(r) for r in records))
  by_key = {(_label(r), r["split"], r["domain"]): r for r in records}
  lines = ["| method | " + " | ".join(f"{s} / {d}" for s, d in cells) + " |",
           "|---" * (len(cells) + 1) + "|"]
  for method in methods:
    row = [cell(by_key[(method, split, domain)]) if (method, split, domain) in by_key else ""
           for split, domain in cells]
    lines.append(f"| {method} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def report_markdown(evaluation: Evaluation, dataset: str) -> str:
  """The human-readable report: headline table, then every cell in detail."""
  records = evaluation.records
  refs = list(dict.fromkeys(ref for r in records for ref in r["vs"]))
  index = evaluation.meta["index"]
  out = ["# Evaluation report", "",
         f"Dataset: `{os.path.abspath(dataset)}`. Index: {index['kind']} "
         f"({json.dumps(index['params'])}). Strongest non-oracle baseline: "
         f"`{evaluation.strongest_baseline}`.", "",
         "## Joint@20, mean [95 % bootstrap CI], per cell (split / domain)", ""]
  sig_ref = evaluation.strongest_baseline if evaluation.strongest_baseline in refs else (
      refs[0] if refs else None)
  if sig_ref:
    out += [f"`+`: significant gain over `{sig_ref}` (paired Wilcoxon p < 0.05, positive mean "
            f"difference).", ""]
  out += [headline_table(records, sig_ref), "## Every cell", ""]
  header = ("| method | n | Joint@10 | Joint@20 [95 % CI] | Joint@50 | Purity@20 | Attr@20 | "
            "Bound@20 | " + " | ".join(f"vs {ref}: diff [CI], p" for ref in refs) + " |")
  for split, domain in dict.fromkeys((r["split"], r["domain"]) for r in records):
    out += [f"### {split} / {domain}", "", header, "|---" * (8 + len(refs)) + "|"]
    for r in records:
      if (r["split"], r["domain"]) != (split, domain):
        continue
      low, high = r[f"{HEADLINE}_ci"]
      vs = []
      for ref in refs:
        t = r["vs"].get(ref)
        vs.append("" if t is None else
                  f"{t['diff']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], p={t['p']:.2g}"
                  + (" +" if t["significant_gain"] else ""))
      out.append(f"| {_label(r)} | {r['n']} | {r.get('joint@10', float('nan')):.3f} | "
                 f"{r[HEADLINE]:.3f} [{low:.3f}, {high:.3f}] | "
                 f"{r.get('joint@50', float('nan')):.3f} | {r['purity@20']:.3f} | "
                 f"{r['attr@20']:.3f} | {r['bound@20']:.3f} | " + " | ".join(vs) + " |")
    out.append("")
  diagnostics = evaluation.meta.get("data_diagnostics") or {}
  if diagnostics:
    domains = list(next(iter(diagnostics.values()))["predictor"])
    out += ["## Data path of stages 2-3: metric-predictor validation and latent clusters", "",
            "Predictor: held-out AUC / ECE per domain (observed labels, split by item). "
            "Clusters: agreement with the hidden true patterns over train items "
            "(evaluation-only).", "",
            "| workdir of | " + " | ".join(f"AUC / ECE {d}" for d in domains)
            + " | clusters | NMI | purity |", "|---" * (len(domains) + 4) + "|"]
    for name, dg in diagnostics.items():
      cells = [f"{dg['predictor'][d]['auc']:.3f} / {dg['predictor'][d]['ece']:.3f}"
               for d in domains]
      out.append(f"| {name} | " + " | ".join(cells) + f" | {dg['num_clusters']} | "
                 f"{dg['cluster_nmi']:.3f} | {dg['cluster_purity']:.3f} |")
    out.append("")
  knobs = {k: v for k, v in evaluation.knobs.items() if v}
  if knobs:
    out += ["## Knobs chosen on train queries (online oracle over train items)", ""]
    out += [f"- `{name}`: {json.dumps(v)}" for name, v in knobs.items()]
    out.append("")
  return "\n".join(out)
