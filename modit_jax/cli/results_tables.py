r"""Prints the README's result tables from an evaluation's results.json (nothing is pasted).

  python -m modit_jax.cli.results_tables --results=out/default/eval/results.json \
      --methods=seed_centroid,centroid_global_shift,rerank,pretrained_gr,modit_sft,modit_hppo \
      --reference=strongest_baseline

Prints the 8-cell Joint@20 table (mean [95 % CI]; `+` / `-` a significant gain / loss against
`--reference`, as the evaluation tested it), the Purity@20 table, and the count of significant cells per
reference. With `--summary` instead of `--results`, one row per evaluation (a catalog, a pooled
protocol) of how one method fared, split by split:

  python -m modit_jax.cli.results_tables --summary=music=out/music/run/eval/results.json,\
cards=out/cards/run/eval/results.json --reference=strongest_baseline
"""

import json
from typing import Sequence

from absl import flags

from modit_jax import errors
from modit_jax import results_markdown
from modit_jax import report
from modit_jax.cli import app

_RESULTS = flags.DEFINE_string("results", None, "An evaluation's results.json.")
_SUMMARY = flags.DEFINE_list("summary", [], "NAME=RESULTS_JSON pairs: one summary row each, "
                             "instead of --results' tables.")
_SUMMARY_METHOD = flags.DEFINE_string("summary_method", "modit_hppo",
                                      "The method the --summary rows describe.")
_METHODS = flags.DEFINE_list("methods", [], "Methods to show, in order (default: all).")
_REFERENCE = flags.DEFINE_string("reference", "",
                                 "Mark significant gains over this reference; "
                                 "`strongest_baseline` is the per-domain strongest competitor.")


def _load(path: str) -> dict:
  """A results.json, or `UserError` saying why it is not one."""
  try:
    with open(path) as f:
      results = json.load(f)
    if not isinstance(results["records"], list):
      raise TypeError
  except OSError as e:
    raise errors.UserError(f"cannot read {path}: {e.strerror}") from None
  except (ValueError, KeyError, TypeError):
    raise errors.UserError(f"{path} is not an evaluation's results.json") from None
  return results


def _print_summary() -> None:
  """The --summary table: one row per NAME=RESULTS pair."""
  named = []
  for pair in _SUMMARY.value:
    name, sep, path = pair.partition("=")
    if not sep or not name or not path:
      raise errors.UserError(f"--summary takes NAME=RESULTS_JSON pairs, got {pair!r}")
    named.append((name, _load(path)))
  reference = _REFERENCE.value or "strongest_baseline"
  try:
    print(report.catalog_summary_table(named, _SUMMARY_METHOD.value, reference))
  except ValueError as e:
    raise errors.UserError(str(e)) from None


def main(argv: Sequence[str]) -> None:
  del argv
  if bool(_RESULTS.value) == bool(_SUMMARY.value):
    raise errors.UserError("give either --results (one evaluation's tables) or --summary "
                           "(a row per evaluation)")
  if _SUMMARY.value:
    _print_summary()
    return
  results = _load(_RESULTS.value)
  records = results["records"]
  if _METHODS.value:
    known = {r["method"] for r in records}
    missing = [m for m in _METHODS.value if m not in known]
    if missing:
      raise errors.UserError(f"{_RESULTS.value} has no method {', '.join(missing)}; it has "
                             f"{', '.join(sorted(known))}")
    order = {m: i for i, m in enumerate(_METHODS.value)}
    records = sorted((r for r in records if r["method"] in order),
                     key=lambda r: order[r["method"]])
  reference = _REFERENCE.value
  print("Joint@20, mean [95 % CI]" + (f"; `+` / `-`: significant gain / loss against "
                                       f"`{reference}`" if reference else "") + "\n")
  print(results_markdown.headline_table(records, reference or None))
  print("Purity@20\n")
  print(results_markdown.metric_table(records, "purity@20"))
  print(report.significance_summary(records, report.tested_references(results)))


if __name__ == "__main__":
  app.run(main)
