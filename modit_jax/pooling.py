"""Pools the evaluations of several worlds into one set of 8 cells (the protocol's numbers).

Each world is a catalog directory and the directory of its finished evaluation (results.json
and the retrieved ids; in a pipeline's OUT, `dataset/` and `eval/`). Per-query metrics
are recomputed from the retrieved ids and each world's own dataset, concatenated cell by cell
over the worlds, and summarised exactly as one evaluation is (`evaluation.summarize`: CIs, and
one-sided tests Holm-corrected over the cells). The strongest competitor per domain is chosen
on the worlds' validation queries (their mean validation Joint), never on a pooled cell.

Beside the pooled verdicts, the result keeps what one world alone says: per world and method,
the significant gains and losses against each reference, and the spread of the cell means.
"""

import json
import os
from typing import Any, Sequence

import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import evaluation
from modit_jax import novelty
from modit_jax import report

HEADLINE = evaluation.HEADLINE


def _load_world(dataset: str, eval_dir: str) -> tuple[catalog_lib.Catalog, dict[str, Any],
                                                      dict[str, dict[str, np.ndarray]]]:
  """(catalog, results.json, retrieved ids method -> split -> [Q, K]) of one world."""
  results_path = os.path.join(eval_dir, "results.json")
  if not os.path.isfile(results_path):
    raise errors.UserError(f"{eval_dir} holds no finished evaluation ({results_path} is "
                           "missing)")
  with open(results_path) as f:
    results = json.load(f)
  # An evaluation that asked with fewer seeds is rescored with the same seeds.
  catalog = catalog_lib.with_first_seeds(catalog_lib.load_catalog(dataset),
                                         results.get("seed_limit", 0))
  retrieved = {}
  for method in results["methods"]:
    retrieved[method] = {}
    for split in results["splits"]:
      path = os.path.join(eval_dir, evaluation.RETRIEVED_DIR, f"{method}_{split}.npz")
      with np.load(path) as saved:
        retrieved[method][split] = saved["ids"]
  return catalog, results, retrieved


def pool(worlds: dict[str, tuple[str, str]], references: Sequence[str], num_resamples: int,
         seed: int) -> dict[str, Any]:
  """The pooled results (the format of an evaluation's results.json, plus `per_world`).

  Args:
    worlds: world name -> (its catalog directory, its evaluation directory).
    references: the references every method is tested against (`strongest_baseline` allowed).
    num_resamples, seed: of the bootstrap.

  Returns:
    A JSON-serialisable dict: `records` (pooled, one per method x cell), `strongest_baseline`
    (domain -> competitor), `validation` (mean over worlds), `per_world` (name -> counts of
    significant cells and cell means), `worlds`, `methods`, `splits`.
  """
  if not worlds:
    raise errors.UserError("pooling needs at least one world")
  scores: dict[str, dict[str, dict[str, list[np.ndarray]]]] = {}
  domains_by_split: dict[str, list[np.ndarray]] = {}
  validation: dict[str, dict[str, list[float]]] = {}
  per_world: dict[str, Any] = {}
  gates: list[dict[str, Any]] = []
  domain_names = methods = splits = ks = None
  for world, (dataset, eval_dir) in worlds.items():
    catalog, results, retrieved = _load_world(dataset, eval_dir)
    if domain_names is None:
      domain_names, methods, splits, ks = (catalog.domains, results["methods"],
                                           results["splits"], results["ks"])
    elif (catalog.domains, results["methods"], results["splits"]) != (domain_names, methods,
                                                                      splits):
      raise errors.UserError(f"world {world} ({eval_dir}) was evaluated on other domains, methods "
                             "or splits than the first world; pooled cells need the same ones")
    for method, by_split in evaluation.score_all(catalog, retrieved, ks).items():
      for split, metrics in by_split.items():
        for key, values in metrics.items():
          scores.setdefault(method, {}).setdefault(split, {}).setdefault(key, []).append(values)
    for split in splits:
      domains_by_split.setdefault(split, []).append(catalog.queries[split].domain)
    for method, by_domain in results.get("validation", {}).items():
      for domain, joint in by_domain.items():
        validation.setdefault(method, {}).setdefault(domain, []).append(joint)
    per_world[world] = _world_summary(results)
    if results.get(novelty.JSON_KEY):
      gates.append(results[novelty.JSON_KEY])
  pooled_scores = {m: {s: {k: np.concatenate(v) for k, v in metrics.items()}
                       for s, metrics in by_split.items()} for m, by_split in scores.items()}
  pooled_domains = {s: np.concatenate(v) for s, v in domains_by_split.items()}
  mean_validation = {m: {d: float(np.mean(v)) for d, v in by_domain.items()}
                     for m, by_domain in validation.items()}
  strongest = evaluation.strongest_per_domain(mean_validation)
  records = evaluation.summarize(domain_names, pooled_domains, pooled_scores, references,
                                 strongest, num_resamples, seed)
  pooled = {"worlds": {w: {"dataset": d, "eval": e} for w, (d, e) in worlds.items()},
            "methods": methods, "splits": splits, "ks": ks,
            "references": list(references), "strongest_baseline": strongest,
            "validation": mean_validation, "records": records, "per_world": per_world}
  if gates:
    # The gate's rule (each world's own directions and shifts stay in its results.json) and
    # the share of seed sets it answered, over the pooled queries (equal queries per world;
    # a world whose split had no queries records no share for it).
    shared = list(dict.fromkeys(split for g in gates for split in g["novel_share"]))
    pooled[novelty.JSON_KEY] = {
        "methods": gates[0]["methods"],
        "novel_share": {split: float(np.mean([g["novel_share"][split] for g in gates
                                              if split in g["novel_share"]]))
                        for split in shared},
        "gate": _pooled_gate_rule([g["gate"] for g in gates]),
        "fallback": gates[0].get("fallback", "centroid_global_shift"),
        "purity_tolerance": gates[0].get("purity_tolerance", -1.0)}
  return pooled


def _pooled_gate_rule(saved: list[dict[str, Any]]) -> dict[str, Any]:
  """The worlds' gate rule: the neighbours, and each world's threshold (or the old ratio)."""
  if "threshold" in saved[0]:
    return {"neighbours": saved[0]["neighbours"],
            "thresholds": [float(g["threshold"]) for g in saved]}
  return {key: saved[0][key] for key in ("neighbours", "share_ratio")}


def _world_summary(results: dict[str, Any]) -> dict[str, Any]:
  """Per method: significant gains / losses per reference, and the Joint@20 cell means."""
  tests: dict[str, dict[str, list[dict[str, Any]]]] = {}
  cells: dict[str, dict[str, float]] = {}
  for r in results["records"]:
    cells.setdefault(r["method"], {})[f"{r['split']} / {r['domain']}"] = r[HEADLINE]
    for ref, test in r["vs"].items():
      tests.setdefault(r["method"], {}).setdefault(ref, []).append(test)
  return {method: {"cells": by_cell,
                   "vs": {ref: report.significance_counts(t)
                          for ref, t in tests.get(method, {}).items()}}
          for method, by_cell in cells.items()}


def per_world_table(pooled: dict[str, Any], reference: str) -> str:
  """Markdown: per method, each world's significant gains+ losses− against `reference`."""
  worlds = list(pooled["per_world"])
  lines = ["| method | " + " | ".join(f"world {w}" for w in worlds) + " |",
           "|---" * (len(worlds) + 1) + "|"]
  for method in pooled["methods"]:
    row = []
    for world in worlds:
      counts = pooled["per_world"][world].get(method, {}).get("vs", {}).get(reference)
      row.append(report.count_text(counts) if counts else "—")
    lines.append(f"| {method} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def spread_table(pooled: dict[str, Any]) -> str:
  """Markdown: per method and cell, the lowest and highest world's Joint@20 mean."""
  worlds = list(pooled["per_world"])
  cells = list(dict.fromkeys(f"{r['split']} / {r['domain']}" for r in pooled["records"]))
  lines = ["| method | " + " | ".join(cells) + " |", "|---" * (len(cells) + 1) + "|"]
  for method in pooled["methods"]:
    row = []
    for cell in cells:
      means = [pooled["per_world"][w][method]["cells"][cell] for w in worlds
               if cell in pooled["per_world"][w].get(method, {}).get("cells", {})]
      row.append(f"{min(means):.3f}–{max(means):.3f}" if means else "")
    lines.append(f"| {method} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def gap_closed(records: Sequence[dict[str, Any]], low: str = "seed_centroid",
               high: str = "oracle_shift") -> dict[str, float]:
  """Per method: the share of the Joint@20 gap from `low` to `high` it closes.

  (mean over cells of the method - of `low`) / (mean over cells of `high` - of `low`), over
  the cells where all three were evaluated; empty when `low` or `high` is missing.
  """
  by_key = {(r["method"], r["split"], r["domain"]): r[HEADLINE] for r in records}
  cells = sorted({(s, d) for m, s, d in by_key if (low, s, d) in by_key and (high, s, d)
                  in by_key})
  if not cells:
    return {}
  base = np.mean([by_key[(low, *c)] for c in cells])
  top = np.mean([by_key[(high, *c)] for c in cells])
  if top <= base:
    return {}
  out = {}
  for method in dict.fromkeys(m for m, _, _ in by_key):
    if all((method, *c) in by_key for c in cells):
      out[method] = float((np.mean([by_key[(method, *c)] for c in cells]) - base) / (top - base))
  return out
