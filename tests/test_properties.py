"""The synthetic world's property check (DESIGN.md section 4) passes and fails where it should."""

import numpy as np
import pytest

from modit_jax import evaluation
from modit_jax import properties

_DOMAINS = ("quality", "safety", "popularity", "length")
_ALPHA = (2.0, 1.5, 1.0, 0.5)   # quality and safety: the two largest; length: the hardest
_SPLITS = ("item_holdout", "pattern_holdout")
# A world with every property holding: (joint, purity, attr) per method, the same in every cell.
_GOOD = {"seed_centroid": (0.05, 0.95, 0.10), "global_attribute": (0.02, 0.05, 0.90),
         "centroid_global_shift": (0.60, 0.70, 0.80), "oracle_shift": (0.95, 0.96, 0.97)}


def _result(values=None, cell_override=None, bound_share=1.0):
  values = dict(_GOOD, **(values or {}))
  records = []
  for method, (joint, purity, attr) in values.items():
    for split in _SPLITS:
      for domain in _DOMAINS:
        j, p, a = (cell_override or {}).get((method, split, domain), (joint, purity, attr))
        records.append({"method": method, "split": split, "domain": domain, "joint@20": j,
                        "purity@20": p, "attr@20": a})
  n = 100
  bound = (np.arange(n) < bound_share * n).astype(float)
  scores = {"seed_centroid": {s: {"bound@20": bound} for s in _SPLITS}}
  return evaluation.Evaluation(records, {}, scores, {}, {}, {"splits": list(_SPLITS)})


def _holds(result):
  return [p.holds for p in properties.check(result, _ALPHA, _DOMAINS)]


def test_every_property_holds_on_a_good_world():
  assert _holds(_result()) == [True, True, True, True]


@pytest.mark.parametrize("broken, which", [
    # 1: one impure seed-centroid cell.
    (dict(cell_override={("seed_centroid", "pattern_holdout", "length"): (0.05, 0.7, 0.1)}), 0),
    # 1: the seed centroid already solves a cell.
    (dict(cell_override={("seed_centroid", "item_holdout", "quality"): (0.4, 0.95, 0.4)}), 0),
    # 2: the global attribute stays in the pattern.
    (dict(values={"global_attribute": (0.3, 0.5, 0.9)}), 1),
    # 2: not attribute-rich on one of the two largest-alpha domains (safety).
    (dict(cell_override={("global_attribute", "item_holdout", "safety"): (0.02, 0.05, 0.6)}), 1),
    # 3: too few solvable queries.
    (dict(bound_share=0.85), 2),
    # 4: a global shift nearly as good as the oracle on the hardest domain.
    (dict(values={"centroid_global_shift": (0.85, 0.9, 0.9)}), 3),
])
def test_each_property_fails_where_it_should(broken, which):
  holds = _holds(_result(**broken))
  assert holds[which] is False
  assert sum(holds) == 3  # only the broken one


def test_attr_on_a_low_alpha_domain_does_not_count_for_property_2():
  # Length has the smallest alpha: a poor global attribute there is allowed.
  result = _result(cell_override={("global_attribute", "item_holdout", "length"):
                                  (0.0, 0.05, 0.1)})
  assert _holds(result)[1] is True
