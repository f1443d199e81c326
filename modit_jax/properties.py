"""The required properties of the synthetic world (DESIGN.md section 4), checked on an evaluation.

1. seed centroid: Purity@20 >= 0.8 and Joint@20 <= 0.35 on every cell;
2. global attribute: Purity@20 <= 0.25 on every cell, Attr@20 >= 0.7 on the two domains with
   the largest a_m;
3. Bound@20 = 1 for >= 90 % of evaluation queries;
4. centroid_global_shift at least 0.15 Joint@20 below oracle_shift on the hardest domain (the
   smallest a_m: its direction is the most pattern-specific), both tuned on validation queries.
"""

import dataclasses
from typing import Any, Sequence

import numpy as np

from modit_jax import evaluation as evaluation_lib
from modit_jax import results_markdown

METHODS = ("seed_centroid", "global_attribute", "centroid_global_shift", "oracle_shift")


@dataclasses.dataclass(frozen=True)
class Property:
  name: str
  measured: str
  required: str
  holds: bool


def check(result: evaluation_lib.Evaluation, alpha: Sequence[float],
          domains: Sequence[str]) -> list[Property]:
  """Checks the four properties on an evaluation that ran `METHODS` on the holdout splits."""
  by = {(r["method"], r["split"], r["domain"]): r for r in result.records}
  cells = [(s, d) for s in result.meta["splits"] for d in domains]

  def values(method: str, key: str, cell_domains: Sequence[str] = domains) -> np.ndarray:
    return np.array([by[(method, s, d)][key] for s, d in cells if d in cell_domains])

  out = []
  purity, joint = values("seed_centroid", "purity@20"), values("seed_centroid", "joint@20")
  out.append(Property("1. seed centroid: pure but not attribute-rich",
                      f"min Purity@20 {purity.min():.3f}, max Joint@20 {joint.max():.3f}",
                      "min Purity@20 >= 0.80, max Joint@20 <= 0.35",
                      bool(purity.min() >= 0.8 and joint.max() <= 0.35)))
  top_two = [domains[i] for i in np.argsort(-np.asarray(alpha), kind="stable")[:2]]
  purity = values("global_attribute", "purity@20")
  attr = values("global_attribute", "attr@20", top_two)
  out.append(Property("2. global attribute: attribute-rich but drifts",
                      f"max Purity@20 {purity.max():.3f}, min Attr@20 on {'/'.join(top_two)} "
                      f"{attr.min():.3f}",
                      "max Purity@20 <= 0.25, min Attr@20 >= 0.70",
                      bool(purity.max() <= 0.25 and attr.min() >= 0.7)))
  bound = np.concatenate([s["bound@20"] for s in result.scores["seed_centroid"].values()])
  share = float(np.mean(bound == 1.0))
  out.append(Property("3. Bound@20 = 1 (the cells are solvable)", f"{share:.1%} of queries",
                      ">= 90 %", share >= 0.9))
  gaps = []
  for d in domains:
    oracle = values("oracle_shift", "joint@20", [d])
    shift = values("centroid_global_shift", "joint@20", [d])
    gaps.append(float(oracle.mean() - shift.mean()))
  hardest = int(np.argmin(alpha))
  out.append(Property("4. a global shift is not enough",
                      f"oracle - global shift Joint@20 on {domains[hardest]} "
                      f"{gaps[hardest]:.3f} (all domains: "
                      + ", ".join(f"{d} {g:.3f}" for d, g in zip(domains, gaps)) + ")",
                      ">= 0.15 on the hardest domain", gaps[hardest] >= 0.15))
  return out


def table(properties: Sequence[Property]) -> str:
  """The property table in markdown."""
  lines = ["| property | measured | required | holds |", "|---|---|---|---|"]
  lines += [f"| {p.name} | {p.measured} | {p.required} | {'yes' if p.holds else 'NO'} |"
            for p in properties]
  return "\n".join(lines) + "\n"


def check_world(catalog: Any, world_config: Any) -> tuple[list[Property], str, str]:
  """Evaluates the property methods on a synthetic world and checks the properties.

  Args:
    catalog: the loaded world (`catalog.Catalog`).
    world_config: its `configs/synthetic.py` config (alpha, check_index_kind).

  Returns:
    (properties, their markdown table, the methods' 8-cell Joint@20 table).
  """
  check_config = evaluation_lib.default_config()
  check_config.methods = ",".join(METHODS)
  check_config.index_kind = check_config.oracle_index_kind = world_config.check_index_kind
  check_config.num_resamples = 1000  # the CIs are not part of the properties
  result = evaluation_lib.evaluate(catalog, check_config)
  found = check(result, world_config.alpha, catalog.domains)
  return found, table(found), results_markdown.headline_table(result.records)
