"""The pipeline report: the 8-cell tables, a significance summary and plots, in one markdown file.

`write_pipeline_report` writes `OUT/report.md` and its PNG plots under `OUT/plots/` from the
parsed `results.json` of the evaluation and the `metrics.jsonl` of every training workdir.
Everything here is numpy, json and matplotlib on the host: no accelerator, no training state.
"""

import json
import math
import os
from typing import Any, Mapping, Sequence

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
import numpy as np

from modit_jax import engine
from modit_jax import evaluation
from modit_jax import results_markdown

PLOTS_DIR = "plots"
REPORT_FILE = "report.md"
JOINT_PLOT = "joint20_by_cell.png"
PURITY_ATTR_PLOT = "purity_vs_attr.png"
TRAINING_PLOT = "training_curves.png"
# HPPO may trade purity for joint gains, but never more than this below MO-DiT SFT in any cell.
PURITY_TOLERANCE = 0.02
PURITY_REFERENCE = "modit_sft"
# References that get their own `+` table, in this order, when they were tested.
PREFERRED_REFERENCES = (evaluation.STRONGEST_BASELINE, "modit_sft", "pretrained_gr",
                        "seed_centroid")
_DPI = 110

Record = Mapping[str, Any]


# ----------------------------------------------------------------------------- records


def _cells(records: Sequence[Record]) -> list[tuple[str, str]]:
  return list(dict.fromkeys((r["split"], r["domain"]) for r in records))


def _methods(records: Sequence[Record]) -> dict[str, bool]:
  """Method -> whether it is an oracle, in record order."""
  return {r["method"]: bool(r.get("oracle")) for r in records}


def _label(method: str, oracle: bool) -> str:
  return f"{method} (oracle)" if oracle else method


def _by_method_cell(records: Sequence[Record]) -> dict[tuple[str, str, str], Record]:
  return {(r["method"], r["split"], r["domain"]): r for r in records}


def tested_references(results: Mapping[str, Any]) -> list[str]:
  """Every reference some record was tested against, the preferred ones first."""
  tested = {ref for r in results.get("records") or [] for ref in r.get("vs", {})}
  preferred = [ref for ref in PREFERRED_REFERENCES if ref in tested]
  return preferred + sorted(tested - set(preferred))


def significance_counts(tests: Sequence[Mapping[str, Any]]) -> dict[str, int]:
  """Of one comparison's tested cells: how many are significant gains, losses, and in all."""
  return {"gains": sum(bool(t.get("significant_gain")) for t in tests),
          "losses": sum(bool(t.get("significant_loss")) for t in tests),
          "cells": len(tests)}


def count_text(counts: Mapping[str, int]) -> str:
  """`significance_counts` as a table cell: "gains+ losses− / cells"."""
  return f"{counts['gains']}+ {counts['losses']}− / {counts['cells']}"


def significance_summary(records: Sequence[Record], references: Sequence[str]) -> str:
  """Markdown table: per method, significant Joint@20 gains and losses per reference, and the
  purity gap.

  A column per reference counts the cells with a significant gain (`+`) and loss (`-`) over it,
  out of the cells tested against it (`results_markdown.SIGNIFICANCE_RULE`). When `modit_sft` was evaluated, a last column gives the minimum over
  cells of Purity@20 − modit_sft's Purity@20, its cell, and whether it stays within
  `PURITY_TOLERANCE` (HPPO's purity constraint).
  """
  by_key = _by_method_cell(records)
  cells = _cells(records)
  with_purity = any(r["method"] == PURITY_REFERENCE for r in records)
  header = ["method"] + [f"significant vs `{ref}`" for ref in references]
  if with_purity:
    header.append(f"min ΔPurity@20 vs `{PURITY_REFERENCE}` (cell)")
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for method, oracle in _methods(records).items():
    mine = [by_key[(method, *cell)] for cell in cells if (method, *cell) in by_key]
    row = [_label(method, oracle)]
    for ref in references:
      row.append(_counts_cell([r["vs"][ref] for r in mine if ref in r.get("vs", {})]))
    if with_purity:
      row.append(_purity_gap_text(_worst_purity_gap(mine, by_key, method)))
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def _worst_purity_gap(mine: Sequence[Record], by_key: Mapping[tuple[str, str, str], Record],
                      method: str) -> tuple[float, str] | None:
  """The worst-cell Purity@20 of `mine` minus the purity reference's, and that cell's name.

  None for the reference itself or when no cell of `mine` was evaluated for the reference.
  """
  if method == PURITY_REFERENCE:
    return None
  gaps = [(r["purity@20"] - by_key[(PURITY_REFERENCE, r["split"], r["domain"])]["purity@20"],
           f"{r['split']} / {r['domain']}")
          for r in mine if (PURITY_REFERENCE, r["split"], r["domain"]) in by_key]
  return min(gaps) if gaps else None


def _purity_gap_text(worst: tuple[float, str] | None) -> str:
  """`_worst_purity_gap` as a table cell, with the verdict of HPPO's purity constraint."""
  if worst is None:
    return "—"
  gap, cell = worst
  # The slack absorbs float error: a gap of exactly the tolerance is allowed.
  verdict = "ok" if gap >= -PURITY_TOLERANCE - 1e-9 else f"more than {PURITY_TOLERANCE} below"
  return f"{gap:+.3f} ({cell}), {verdict}"


def _counts_cell(tests: Sequence[Mapping[str, Any]]) -> str:
  """A comparison's tested cells counted as a table cell; "—" when none was tested."""
  return count_text(significance_counts(tests)) if tests else "—"


# The simple methods a `catalog_summary_table` row also counts cells against.
SUMMARY_ALSO = ("seed_centroid", "centroid_global_shift", "neighbourhood_offset")


def catalog_summary_table(named_results: Sequence[tuple[str, Mapping[str, Any]]],
                          method: str, reference: str,
                          also: Sequence[str] = SUMMARY_ALSO) -> str:
  """Markdown table: one row per evaluation of how `method` fared against `reference`.

  Per split: the significant gains and losses over `reference` and the mean Joint@20
  difference over the split's cells; then the cells against each of `also` (all splits), the
  share of seed sets the novelty gate answered per split, and the purity gap to `modit_sft`.
  Raises `ValueError` naming an evaluation that lacks `method` or never tested it against
  `reference`.
  """
  splits = list(dict.fromkeys(r["split"] for _, results in named_results
                              for r in results["records"]))
  header = (["catalog"] + [f"{split} vs `{reference}` (mean ΔJoint@20)" for split in splits]
            + [f"vs `{ref}`" for ref in also] + ["gate took (" + " / ".join(splits) + ")",
               f"min ΔPurity@20 vs `{PURITY_REFERENCE}`"])
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for name, results in named_results:
    records = results["records"]
    mine = [r for r in records if r["method"] == method]
    if not mine or not any(reference in r.get("vs", {}) for r in mine):
      raise ValueError(f"{name}: no {method} records tested against {reference}")
    row = [name]
    for split in splits:
      tests = [r["vs"][reference] for r in mine
               if r["split"] == split and reference in r.get("vs", {})]
      row.append(f"{count_text(significance_counts(tests))} "
                 f"({np.mean([t['diff'] for t in tests]):+.3f})" if tests else "—")
    for ref in also:
      row.append(_counts_cell([r["vs"][ref] for r in mine if ref in r.get("vs", {})]))
    gate = results.get("novelty_gate") or {}
    shares = gate.get("novel_share", {}) if method in gate.get("methods", ()) else {}
    row.append(" / ".join(f"{shares[s]:.0%}" if s in shares else "—" for s in splits)
               if shares else "no gate")
    worst = _worst_purity_gap(mine, _by_method_cell(records), method)
    row.append("—" if worst is None else f"{worst[0]:+.3f}")
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _colors(methods: Sequence[str]) -> dict[str, Any]:
  """A distinct colour per method: tab20's ten dark shades first, then its ten light ones."""
  cmap = colormaps["tab20"]
  order = list(range(0, 20, 2)) + list(range(1, 20, 2))
  return {m: cmap(order[i % 20]) for i, m in enumerate(methods)}


def _save(fig: Figure, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=_DPI, bbox_inches="tight")


def plot_joint_by_cell(records: Sequence[Record], path: str) -> None:
  """Grouped bars of Joint@20 per cell (groups) and method (bars), with 95 % CI error bars."""
  cells = _cells(records)
  methods = _methods(records)
  colors = _colors(list(methods))
  by_key = _by_method_cell(records)
  width = 0.8 / len(methods)
  fig = Figure(figsize=(min(24.0, max(8.0, 0.16 * len(cells) * len(methods) + 3)), 5.4))
  ax = fig.subplots()
  for i, (method, oracle) in enumerate(methods.items()):
    xs, means, errs = [], [], [[], []]
    for c, cell in enumerate(cells):
      r = by_key.get((method, *cell))
      if r is None:
        continue
      low, high = r["joint@20_ci"]
      xs.append(c - 0.4 + (i + 0.5) * width)
      means.append(r["joint@20"])
      errs[0].append(max(0.0, r["joint@20"] - low))
      errs[1].append(max(0.0, high - r["joint@20"]))
    ax.bar(xs, means, width, yerr=errs, color=colors[method], label=_label(method, oracle),
           hatch="//" if oracle else None, edgecolor="black" if oracle else "none",
           linewidth=0.5, error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "0.25"})
  ax.set_xticks(range(len(cells)), [f"{s}/{d}" for s, d in cells], rotation=20, ha="right")
  ax.set_ylabel("Joint@20 (mean, 95 % CI)")
  ax.set_title("Joint@20 per cell (split/domain)")
  ax.set_ylim(bottom=0)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="method")
  _save(fig, path)


def plot_purity_attr(records: Sequence[Record], path: str) -> None:
  """The Purity@20 vs Attr@20 plane: per method its mean over cells, and faint per-cell points."""
  methods = _methods(records)
  colors = _colors(list(methods))
  fig = Figure(figsize=(8.0, 6.4))
  ax = fig.subplots()
  for method, oracle in methods.items():
    mine = [r for r in records if r["method"] == method]
    attr = np.array([r["attr@20"] for r in mine])
    purity = np.array([r["purity@20"] for r in mine])
    ax.scatter(attr, purity, s=14, color=colors[method], alpha=0.3, linewidths=0)
    ax.scatter(attr.mean(), purity.mean(), s=70, color=colors[method], marker="D" if oracle
               else "o", edgecolors="black", linewidths=0.6, label=_label(method, oracle),
               zorder=3)
    ax.annotate(method, (attr.mean(), purity.mean()), xytext=(5, 4), textcoords="offset points",
                fontsize="x-small")
  # Joint@20 <= min(Purity, Attr): the diagonal separates purity-limited from attribute-limited.
  ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=0.8)
  # Zoomed to the points: methods often differ by a few hundredths on a [0, 1] scale.
  attr = np.array([r["attr@20"] for r in records])
  purity = np.array([r["purity@20"] for r in records])
  ax.set_xlim(max(0.0, attr.min() - 0.05), min(1.02, attr.max() + 0.05))
  ax.set_ylim(max(0.0, purity.min() - 0.05), min(1.02, purity.max() + 0.05))
  ax.set_xlabel("Attr@20 (share of the top 20 positive for the domain)")
  ax.set_ylabel("Purity@20 (share of the top 20 in the seeds' pattern)")
  ax.set_title("Purity vs attribute trade-off (large: mean over cells; faint: each cell)")
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="method")
  _save(fig, path)


def _finite(metrics: Mapping[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
  """The steps and values of `key` where it was logged (NaN marks steps without it)."""
  values = metrics.get(key)
  if values is None:
    return np.zeros(0, np.int64), np.zeros(0)
  keep = np.isfinite(values)
  return metrics["step"][keep], values[keep]


def _plot_stage(ax: Axes, stage: str, metrics: Mapping[str, np.ndarray]) -> None:
  """Loss (and DPO loss) on the left axis; HPPO's fractions on a right axis when logged."""
  lines = []
  for key, style in (("loss", "-"), ("dpo_loss", "--")):
    steps, values = _finite(metrics, key)
    if len(steps):
      lines += ax.plot(steps, values, style, linewidth=1.0, label=key)
  losses = np.concatenate([_finite(metrics, k)[1] for k in ("loss", "dpo_loss")])
  if len(losses) and (losses > 0).all():
    ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(stage)
  ax.grid(alpha=0.3)
  acc_steps, accuracy = _finite(metrics, "implicit_accuracy")
  kept_steps, kept = _finite(metrics, "pool/kept_pairs")
  _, candidates = _finite(metrics, "pool/candidate_pairs")
  if len(acc_steps) or len(kept_steps):
    twin = ax.twinx()
    if len(acc_steps):
      lines += twin.plot(acc_steps, accuracy, color="tab:green", linewidth=1.0,
                         label="implicit_accuracy")
    # Pool records carry both counts; as a share they fit the accuracy's [0, 1] axis.
    if len(kept_steps) and len(candidates) == len(kept):
      lines += twin.step(kept_steps, kept / np.maximum(candidates, 1), where="post",
                         color="tab:purple", marker=".", linewidth=1.0,
                         label="pool kept / candidate pairs")
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("fraction")
  if lines:
    ax.legend(lines, [line.get_label() for line in lines], fontsize="x-small", loc="best")


def plot_training(metrics_by_stage: Mapping[str, Mapping[str, np.ndarray]], path: str) -> None:
  """One panel per stage (two columns) of its training curves, into one PNG."""
  stages = list(metrics_by_stage)
  if not stages:
    raise ValueError("no stage metrics to plot")
  ncols = min(2, len(stages))
  nrows = math.ceil(len(stages) / ncols)
  fig = Figure(figsize=(6.4 * ncols, 3.6 * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, stage in zip(axes, stages):
    _plot_stage(ax, stage, metrics_by_stage[stage])
  for ax in axes[len(stages):]:
    ax.set_visible(False)
  _save(fig, path)


# ----------------------------------------------------------------------------- metrics


def load_metrics(workdir: str) -> dict[str, np.ndarray]:
  """Reads `workdir/metrics.jsonl` into sorted int64 `step` and one float64 array per key.

  Records of the same step are merged in file order, so a resumed run's repeat of a step keeps
  its last value of each key, while a step's pool record and training record both survive. A
  key missing at a step is NaN there.

  Raises:
    FileNotFoundError: `workdir` has no metrics file.
  """
  by_step: dict[int, dict[str, float]] = {}
  with open(os.path.join(workdir, engine.METRICS_FILE), encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        # A run killed mid-write leaves a truncated last line; the rest is still good.
        continue
      if not isinstance(record, dict) or "step" not in record:
        continue
      values = {k: float(v) for k, v in record.items()
                if k != "step" and isinstance(v, (int, float))}
      by_step.setdefault(int(record["step"]), {}).update(values)
  steps = sorted(by_step)
  keys = list(dict.fromkeys(k for s in steps for k in by_step[s]))
  out = {"step": np.array(steps, np.int64)}
  for key in keys:
    out[key] = np.array([by_step[s].get(key, np.nan) for s in steps], np.float64)
  return out


# ----------------------------------------------------------------------------- report


def _tables(results: Mapping[str, Any]) -> list[str]:
  """The 8-cell table once per tested reference of interest (once unmarked if none)."""
  refs = [ref for ref in tested_references(results) if ref in PREFERRED_REFERENCES]
  out = []
  for ref in refs or [None]:
    out += ["### Joint@20, mean [95 % bootstrap CI]" + (f", `+` vs `{ref}`" if ref else ""), ""]
    if ref:
      strongest = (" (per domain, chosen on validation queries: "
                   f"{results_markdown.strongest_text(results.get('strongest_baseline'))})"
                   if ref == evaluation.STRONGEST_BASELINE else "")
      out += [f"`+` / `-`: significant gain / loss against `{ref}`{strongest}; "
              f"{results_markdown.SIGNIFICANCE_RULE}.", ""]
    out.append(results_markdown.headline_table(results["records"], ref))
  return out


def _training_section(stage_workdirs: Mapping[str, str], plots: str) -> list[str]:
  """Loads every stage's metrics, plots those that have any, and notes the others."""
  if not stage_workdirs:
    return []
  metrics_by_stage, missing = {}, []
  for stage, workdir in stage_workdirs.items():
    try:
      metrics = load_metrics(workdir)
    except FileNotFoundError:
      missing.append(f"- `{stage}`: no `{engine.METRICS_FILE}` in `{workdir}`; skipped.")
      continue
    if not len(metrics["step"]):
      missing.append(f"- `{stage}`: `{engine.METRICS_FILE}` in `{workdir}` has no records; "
                     "skipped.")
      continue
    metrics_by_stage[stage] = metrics
  out = ["## Training curves", ""]
  if metrics_by_stage:
    plot_training(metrics_by_stage, os.path.join(plots, TRAINING_PLOT))
    out += [f"![training curves]({PLOTS_DIR}/{TRAINING_PLOT})", ""]
    for stage, metrics in metrics_by_stage.items():
      _, loss = _finite(metrics, "loss")
      out.append(f"- `{stage}`: last step {int(metrics['step'][-1])}"
                 + (f", final loss {loss[-1]:.4g}" if len(loss) else ""))
    out.append("")
  return out + missing + ([""] if missing else [])


def write_pipeline_report(out_dir: str, results: Mapping[str, Any],
                          stage_workdirs: Mapping[str, str], *, title: str,
                          notes: Sequence[str] = (), sections: Sequence[str] = ()) -> str:
  """Writes `out_dir/report.md` and its plots under `out_dir/plots/`; returns the report path.

  `sections` (markdown) go after the significance summary, before the plots.
  """
  plots = os.path.join(out_dir, PLOTS_DIR)
  os.makedirs(plots, exist_ok=True)
  records = list(results.get("records") or [])
  out = [f"# {title}", ""]
  out += [f"- {note}" for note in notes] + ([""] if notes else [])
  if results.get("dataset"):
    out += [f"Dataset: `{results['dataset']}`. Strongest competitor per domain (validation "
            f"queries): {results_markdown.strongest_text(results.get('strongest_baseline'))}.", ""]
  gate = results_markdown.gate_text(results)
  if gate:
    out += [gate, ""]
  out += ["## Headline: Joint@20 on the cells (split / domain)", ""]
  if records:
    out += _tables(results)
    out += ["## Significant cells", "",
            f"Cells with a significant Joint@20 gain (+) and loss (−), out of the cells tested "
            f"({results_markdown.SIGNIFICANCE_RULE}). The purity column: "
            f"the worst cell's Purity@20 minus `{PURITY_REFERENCE}`'s (HPPO must stay within "
            f"−{PURITY_TOLERANCE}).", "",
            significance_summary(records, tested_references(results)), *sections,
            "## Plots", ""]
    plot_joint_by_cell(records, os.path.join(plots, JOINT_PLOT))
    plot_purity_attr(records, os.path.join(plots, PURITY_ATTR_PLOT))
    out += [f"![Joint@20 per cell]({PLOTS_DIR}/{JOINT_PLOT})", "",
            f"![Purity@20 vs Attr@20]({PLOTS_DIR}/{PURITY_ATTR_PLOT})", ""]
  else:
    out += ["No evaluation records.", ""]
  out += _training_section(stage_workdirs, plots)
  path = os.path.join(out_dir, REPORT_FILE)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(out))
  return path
