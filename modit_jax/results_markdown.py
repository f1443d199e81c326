"""Markdown of an evaluation's results (what results.json holds): its tables and report.md.

Rendering only: every function reads the results dict or its records (`evaluation.write`
returns it; `json.load` of results.json gives the same), so a report can be rendered again
from the file alone. The pipeline report (`report`) and the binaries print these tables.
"""

import json
import os
from typing import Any, Sequence

from modit_jax import evaluation
from modit_jax import novelty


# How a `+` / `-` is decided, for report legends.
SIGNIFICANCE_RULE = ("one-sided paired Wilcoxon, Holm-corrected over the cells, p < 0.05, and "
                     "the paired bootstrap 95 % CI of the mean difference on the same side of 0")


def strongest_text(strongest: dict[str, str] | None) -> str:
  """`domain: method` pairs of the per-domain strongest competitor, for report text."""
  return ", ".join(f"{d}: `{n}`" for d, n in (strongest or {}).items()) or "none"


def gate_text(results: dict[str, Any]) -> str:
  """What the novelty gate did in an evaluation, for report text; "" when there was none."""
  gate = results.get(novelty.JSON_KEY)
  if not gate:
    return ""
  names = gate["methods"]
  shares = ", ".join(f"{split} {share:.1%}" for split, share in gate["novel_share"].items())
  saved = gate["gate"]
  if "threshold" in saved:
    under = f"a share of train items under {saved['threshold']:.3f}"
  elif "thresholds" in saved:  # pooled worlds: each read its own from its train queries
    under = ("a share of train items under their world's threshold ("
             + ", ".join(f"{t:.3f}" for t in saved["thresholds"]) + ")")
  else:  # an evaluation saved before the threshold was read from the train queries
    under = f"under {saved['share_ratio']:g} x the catalog's train share"
  tolerance = gate.get("purity_tolerance", -1.0)
  # An evaluation saved before the fallback could be chosen fell back on the global shift.
  offset = gate.get("fallback", "centroid_global_shift") == "neighbourhood_offset"
  fallback = ("the `neighbourhood_offset` query (the global shift plus a step toward the "
              "seeds' catalog neighbourhood)" if offset else "the global shift")
  fallback = (f"{fallback} as tuned on validation queries" if tolerance < 0 else
              f"{fallback} tuned among settings whose validation purity is within "
              f"{tolerance:g} of the purest on the grid")
  text = (f"Novelty gate (docs/novelty.md): {', '.join(f'`{m}`' for m in names)} answered "
          f"the seed sets whose {saved['neighbours']} nearest catalog items hold {under} "
          f"with {fallback} "
          f"({shares} of the seed sets); "
          + ", ".join(f"`{m}{novelty.UNGATED_SUFFIX}`" for m in names)
          + " is the model alone.")
  warnings = [novelty.miss_warning(gate["novel_share"], m,
                                   gate.get("fallback", "centroid_global_shift")) for m in names]
  return text + "".join(f" **Warning**: {w}." for w in warnings if w)


def _label(record: dict[str, Any]) -> str:
  return f"{record['method']} (oracle)" if record["oracle"] else record["method"]


def significance_mark(test: dict[str, Any] | None) -> str:
  """`+` for a significant gain, `-` for a significant loss, "" otherwise."""
  if not test:
    return ""
  return "+" if test.get("significant_gain") else "-" if test.get("significant_loss") else ""


def headline_table(records: Sequence[dict[str, Any]], significance_vs: str | None = None) -> str:
  """The 8-cell markdown table: Joint@20 mean [95 % CI] per method per cell.

  `+` (`-`) marks a significant gain (loss) over `significance_vs`, Holm-corrected over the
  cells (module docstring).
  """
  def cell(r: dict[str, Any]) -> str:
    low, high = r[f"{evaluation.HEADLINE}_ci"]
    mark = significance_mark(r["vs"].get(significance_vs)) if significance_vs else ""
    return f"{r[evaluation.HEADLINE]:.3f} [{low:.3f}, {high:.3f}]{mark}"
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


def evaluation_report(results: dict[str, Any]) -> str:
  """The evaluation's report.md: headline table, then every cell in detail."""
  records = results["records"]
  refs = list(dict.fromkeys(ref for r in records for ref in r["vs"]))
  index = results["index"]
  out = ["# Evaluation report", "",
         f"Dataset: `{results['dataset']}`. Index: {index['kind']} "
         f"({json.dumps(index['params'])}). Strongest competitor per domain (validation "
         f"queries): {strongest_text(results['strongest_baseline'])}.", ""]
  if results.get("seed_limit"):
    out += [f"Every query was asked with only its first {results['seed_limit']} seeds "
            "(`seed_limit`); the others were ordinary catalog items.", ""]
  gate = gate_text(results)
  if gate:
    out += [gate, ""]
  out += ["## Joint@20, mean [95 % bootstrap CI], per cell (split / domain)", ""]
  sig_ref = evaluation.STRONGEST_BASELINE if evaluation.STRONGEST_BASELINE in refs else (refs[0] if refs else None)
  if sig_ref:
    out += [f"`+` / `-`: significant gain / loss against `{sig_ref}` ({SIGNIFICANCE_RULE}).",
            ""]
  out += [headline_table(records, sig_ref), "## Every cell", ""]
  header = ("| method | n | Joint@10 | Joint@20 [95 % CI] | Joint@50 | Purity@20 | Attr@20 | "
            "Bound@20 | " + " | ".join(f"vs {ref}: diff [CI], Holm p" for ref in refs) + " |")
  for split, domain in dict.fromkeys((r["split"], r["domain"]) for r in records):
    out += [f"### {split} / {domain}", "", header, "|---" * (8 + len(refs)) + "|"]
    for r in records:
      if (r["split"], r["domain"]) != (split, domain):
        continue
      low, high = r[f"{evaluation.HEADLINE}_ci"]
      vs = []
      for ref in refs:
        t = r["vs"].get(ref)
        vs.append("" if t is None else
                  f"{t['diff']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}], "
                  f"p+={t['p_gain_holm']:.2g} p-={t['p_loss_holm']:.2g}"
                  + (f" ({t['against']})" if ref == evaluation.STRONGEST_BASELINE else "")
                  + (f" {significance_mark(t)}" if significance_mark(t) else ""))
      out.append(f"| {_label(r)} | {r['n']} | {r.get('joint@10', float('nan')):.3f} | "
                 f"{r[evaluation.HEADLINE]:.3f} [{low:.3f}, {high:.3f}] | "
                 f"{r.get('joint@50', float('nan')):.3f} | {r['purity@20']:.3f} | "
                 f"{r['attr@20']:.3f} | {r['bound@20']:.3f} | " + " | ".join(vs) + " |")
    out.append("")
  diagnostics = results.get("data_diagnostics") or {}
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
  knobs = {k: v for k, v in results["knobs"].items() if v}
  if knobs:
    out += ["## Knobs chosen on validation queries (online oracle over train items)", ""]
    out += [f"- `{name}`: {json.dumps(v)}" for name, v in knobs.items()]
    out.append("")
  return "\n".join(out)


def write_evaluation_report(workdir: str | os.PathLike, results: dict[str, Any]) -> str:
  """Writes `workdir/report.md` from the results; returns its path."""
  path = os.path.join(os.fspath(workdir), "report.md")
  with open(path, "w") as f:
    f.write(evaluation_report(results))
  return path
