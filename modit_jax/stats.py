"""Confidence intervals and paired significance tests over per-query metrics (DESIGN.md §6).

A comparison of a method with a reference spans a family of cells (the 8 split x domain cells).
`paired_test` gives, per cell, the paired bootstrap interval of the mean difference and the
one-sided Wilcoxon signed-rank p-values in both directions; `correct_family` Holm-corrects each
direction over the family's cells and marks a cell a significant gain only when the corrected
one-sided p < 0.05 AND the interval lies above 0 (a significant loss: below 0). The one-sided
rank test is what stops a method that makes most queries a little worse and a few much better
from counting as a gain because its mean went up (docs/statistics.md).

Intervals use the percentile bootstrap of the mean. Resamples are drawn as integer index matrices
in chunks of bounded size, so memory stays at a few tens of MB whatever the number of queries
and resamples, and no Python loop runs over individual resamples. Results are deterministic for
a given seed.
"""

import functools
from typing import Any, Sequence

import numpy as np
import scipy.stats

# A cell counts as a significant gain (loss) below this Holm-corrected one-sided p-value.
SIGNIFICANCE_LEVEL = 0.05

# At most this many resampled indices are held at once (int64: 32 MB).
_MAX_CHUNK_ELEMENTS = 1 << 22


def mean_ci(values: np.ndarray, confidence: float = 0.95, num_resamples: int = 10_000,
            seed: int = 0) -> tuple[float, float, float]:
  """Mean and percentile-bootstrap confidence interval of the mean.

  Args:
    values: float [n] per-query values, n >= 2, all finite.
    confidence: coverage of the interval, in (0, 1).
    num_resamples: number of bootstrap resamples.
    seed: seed of the resampling; the same seed gives the same interval.

  Returns:
    (mean, low, high) as Python floats.

  Raises:
    ValueError: on invalid values or parameters.
  """
  values = _check_values(values, "values")
  num_resamples = _check_params(confidence, num_resamples)
  means = _bootstrap_means(values, num_resamples, seed)
  low, high = _percentile_interval(means, confidence)
  return float(values.mean()), low, high


def paired_test(method: np.ndarray, reference: np.ndarray, num_resamples: int = 10_000,
                seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
  """Paired comparison of two methods scored on the same queries, in one cell.

  Args:
    method: float [n] per-query metric of the method under test.
    reference: float [n] per-query metric of the reference, same queries in the same order.
    num_resamples: number of bootstrap resamples.
    seed: seed of the resampling; the same seed gives the same result.
    confidence: coverage of the interval on the mean difference, in (0, 1).

  Returns:
    A JSON-serialisable dict of Python floats:
      diff: mean(method - reference);
      ci_low, ci_high: paired percentile-bootstrap interval of the mean difference;
      p_gain: one-sided Wilcoxon signed-rank p-value for method > reference (zero differences
        discarded; 1.0 when every difference is zero);
      p_loss: the same for method < reference.
    Uncorrected: `correct_family` turns the tests of a comparison's cells into verdicts.

  Raises:
    ValueError: on invalid inputs or parameters.
  """
  method = _check_values(method, "method")
  reference = _check_values(reference, "reference")
  if method.shape != reference.shape:
    raise ValueError(f"method and reference must be paired over the same queries; got "
                     f"{method.shape[0]} and {reference.shape[0]} values.")
  num_resamples = _check_params(confidence, num_resamples)
  diffs = method - reference
  # Resampling the differences resamples whole queries, which keeps the pairing.
  means = _bootstrap_means(diffs, num_resamples, seed)
  low, high = _percentile_interval(means, confidence)
  return {"diff": float(diffs.mean()), "ci_low": low, "ci_high": high,
          "p_gain": _wilcoxon(diffs, "greater"), "p_loss": _wilcoxon(diffs, "less")}


def holm(p_values: Sequence[float]) -> np.ndarray:
  """Holm step-down adjusted p-values (float64 [n]), in the input order.

  The i-th smallest of n p-values is multiplied by n - i (i from 0), made non-decreasing in
  that order, and capped at 1; rejecting where the adjusted p < alpha controls the
  family-wise error rate at alpha.
  """
  p = np.asarray(p_values, np.float64)
  if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
    raise ValueError(f"p-values must be a 1-D array in [0, 1], got {p_values!r}")
  order = np.argsort(p, kind="stable")
  scaled = p[order] * (len(p) - np.arange(len(p)))
  adjusted = np.empty_like(p)
  adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
  return adjusted


def correct_family(tests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Verdicts for the cells of one comparison (method vs reference), from `paired_test`s.

  Returns new dicts with `p_gain_holm` and `p_loss_holm` (each direction Holm-corrected over
  the family) and `significant_gain` (corrected p_gain < 0.05 and ci_low > 0) and
  `significant_loss` (corrected p_loss < 0.05 and ci_high < 0) added.
  """
  if not tests:
    return []
  gain = holm([t["p_gain"] for t in tests])
  loss = holm([t["p_loss"] for t in tests])
  return [{**t, "p_gain_holm": float(g), "p_loss_holm": float(l),
           "significant_gain": bool(g < SIGNIFICANCE_LEVEL and t["ci_low"] > 0),
           "significant_loss": bool(l < SIGNIFICANCE_LEVEL and t["ci_high"] < 0)}
          for t, g, l in zip(tests, gain, loss)]


def max_t_gain(differences: np.ndarray, num_resamples: int = 4_000,
               seed: int = 0) -> tuple[float, float]:
  """Whether any of several candidates beats a reference, corrected for how many were tried.

  differences: float [G, n], candidate g's per-query metric minus the reference's, on the same
  n queries. Returns (t, p): the largest paired t statistic over the G candidates and its
  one-sided family-wise p-value under the null that no candidate differs from the reference,
  by the max-t sign-flip test (Westfall and Young): each query's whole row of differences has
  its sign flipped at random, which keeps the candidates' correlation, so a grid of hundreds of
  near-identical values is not penalised as hundreds of independent tries. Deterministic for a
  given seed; p is never below 1 / (num_resamples + 1).

  Raises:
    ValueError: on invalid inputs or parameters.
  """
  diffs = np.asarray(differences, np.float64)
  if diffs.ndim != 2 or diffs.shape[0] < 1 or diffs.shape[1] < 2:
    raise ValueError(f"differences must be [candidates >= 1, queries >= 2], got shape "
                     f"{diffs.shape}.")
  if not np.all(np.isfinite(diffs)):
    raise ValueError("differences hold non-finite values (NaN or inf).")
  num_resamples = _check_params(0.5, num_resamples)
  n = diffs.shape[1]
  sum_squares = (diffs ** 2).sum(axis=1)                           # [G], the same under flips

  def t_max(means: np.ndarray) -> np.ndarray:
    """Largest t over candidates for rows of means [..., G]; 0 where a candidate never differs."""
    variance = np.maximum(sum_squares - n * means ** 2, 0.0) / (n - 1)
    se = np.sqrt(variance / n)
    return np.where(se > 0, means / np.where(se > 0, se, 1.0), 0.0).max(axis=-1)

  observed = float(t_max(diffs.mean(axis=1)))
  rng = np.random.default_rng(seed)
  exceed = 0
  chunk = max(1, _MAX_CHUNK_ELEMENTS // max(n, diffs.shape[0]))
  for start in range(0, num_resamples, chunk):
    signs = rng.choice(np.array([-1.0, 1.0]), size=(min(chunk, num_resamples - start), n))
    exceed += int((t_max(signs @ diffs.T / n) >= observed).sum())
  return observed, (1 + exceed) / (1 + num_resamples)


def _wilcoxon(diffs: np.ndarray, alternative: str) -> float:
  """One-sided Wilcoxon signed-rank p-value of the paired differences."""
  if not np.any(diffs):
    # scipy cannot rank an all-zero sample; no difference is no evidence of one.
    return 1.0
  p = float(scipy.stats.wilcoxon(diffs, alternative=alternative).pvalue)
  return p if np.isfinite(p) else 1.0


@functools.lru_cache(maxsize=4)
def _resample_rows(n: int, num_resamples: int, seed: int) -> np.ndarray:
  """The resamples' row indices, int64 [B, n], read-only: what `_bootstrap_means` draws.

  An evaluation bootstraps thousands of cells of the same size with the same seed, so it
  draws the same indices every time; drawing them was three quarters of the bootstrap's time.
  """
  idx = np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))
  idx.flags.writeable = False
  return idx


def _bootstrap_means(values: np.ndarray, num_resamples: int, seed: int) -> np.ndarray:
  """Means of `num_resamples` resamples (with replacement) of `values`, float64 [B]."""
  n = values.shape[0]
  if num_resamples * n <= _MAX_CHUNK_ELEMENTS:
    # One chunk below: the same draw, kept for the next call of this size and seed.
    return values[_resample_rows(n, num_resamples, seed)].mean(axis=1)
  rng = np.random.default_rng(seed)
  chunk = max(1, _MAX_CHUNK_ELEMENTS // n)
  means = np.empty(num_resamples, np.float64)
  for start in range(0, num_resamples, chunk):
    stop = min(start + chunk, num_resamples)
    idx = rng.integers(0, n, size=(stop - start, n))
    means[start:stop] = values[idx].mean(axis=1)
  return means


def _percentile_interval(means: np.ndarray, confidence: float) -> tuple[float, float]:
  alpha = 1.0 - confidence
  low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return float(low), float(high)


def _check_values(values: np.ndarray, name: str) -> np.ndarray:
  arr = np.asarray(values)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array of per-query values, got shape {arr.shape}.")
  if arr.shape[0] < 2:
    raise ValueError(f"{name} needs at least 2 values, got {arr.shape[0]}.")
  if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
          or arr.dtype == bool):
    raise ValueError(f"{name} must be real-valued, got dtype {arr.dtype}.")
  arr = arr.astype(np.float64)
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} holds {np.count_nonzero(~np.isfinite(arr))} non-finite "
                     "values (NaN or inf).")
  return arr


def _check_params(confidence: float, num_resamples: int) -> int:
  """Validates the shared parameters; returns num_resamples as an int."""
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
  if isinstance(num_resamples, bool) or int(num_resamples) != num_resamples or num_resamples < 1:
    raise ValueError(f"num_resamples must be a positive integer, got {num_resamples}.")
  return int(num_resamples)
