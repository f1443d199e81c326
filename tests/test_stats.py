"""Tests for modit_jax.stats."""

import json

import numpy as np
import pytest
import scipy.stats

from modit_jax import stats


def test_mean_ci_contains_mean_and_narrows_with_more_data():
  rng = np.random.default_rng(0)
  widths = []
  for n in (50, 2000):
    values = rng.normal(0.3, 1.0, n)
    mean, low, high = stats.mean_ci(values)
    assert all(isinstance(x, float) for x in (mean, low, high))
    assert mean == pytest.approx(values.mean())
    assert low < mean < high
    widths.append(high - low)
  assert widths[1] < widths[0] / 3  # Width shrinks like 1/sqrt(n): about 6x here.


def test_mean_ci_wider_at_higher_confidence():
  values = np.random.default_rng(1).random(100)
  _, low90, high90 = stats.mean_ci(values, confidence=0.9)
  _, low99, high99 = stats.mean_ci(values, confidence=0.99)
  assert low99 < low90 < high90 < high99


def test_mean_ci_coverage():
  rng = np.random.default_rng(2)
  true_mean, trials = 1.5, 200
  covered = 0
  for trial in range(trials):
    values = rng.normal(true_mean, 2.0, 200)
    _, low, high = stats.mean_ci(values, num_resamples=1000, seed=trial)
    covered += low <= true_mean <= high
  assert 0.90 * trials <= covered <= 0.99 * trials


def test_mean_ci_constant_values():
  assert stats.mean_ci(np.full(10, 0.25)) == (0.25, 0.25, 0.25)


def test_mean_ci_deterministic_for_a_seed():
  values = np.random.default_rng(3).random(300)
  assert stats.mean_ci(values, seed=7) == stats.mean_ci(values, seed=7)
  assert stats.mean_ci(values, seed=7) != stats.mean_ci(values, seed=8)


def test_paired_test_clear_shift():
  rng = np.random.default_rng(4)
  reference = rng.random(300)
  method = reference + 0.1 + 0.05 * rng.standard_normal(300)
  result = stats.paired_test(method, reference)
  assert set(result) == {"diff", "ci_low", "ci_high", "p_gain", "p_loss"}
  assert result["p_gain"] < 1e-3
  assert result["p_loss"] > 0.99
  assert result["ci_low"] < result["diff"] < result["ci_high"]
  assert result["ci_low"] > 0
  json.dumps(result)  # Plain Python values only.
  assert all(type(v) is float for v in result.values())


def test_paired_test_identical_arrays():
  values = np.random.default_rng(5).random(50)
  result = stats.paired_test(values, values.copy())
  assert result == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_gain": 1.0, "p_loss": 1.0}


def test_paired_test_swapping_arguments():
  rng = np.random.default_rng(6)
  a = rng.random(200)
  b = a + 0.02 * rng.standard_normal(200) + 0.01
  ab, ba = stats.paired_test(a, b, seed=3), stats.paired_test(b, a, seed=3)
  assert ba["diff"] == pytest.approx(-ab["diff"])
  assert ba["ci_low"] == pytest.approx(-ab["ci_high"])
  assert ba["ci_high"] == pytest.approx(-ab["ci_low"])
  assert ba["p_gain"] == pytest.approx(ab["p_loss"])
  assert ba["p_loss"] == pytest.approx(ab["p_gain"])


def test_one_sided_p_values_match_scipy_on_fixed_inputs():
  # Fixed differences with ties and zeros; scipy's exact/normal choice is its own.
  method = np.array([0.30, 0.10, 0.25, 0.00, 0.40, 0.35, 0.05, 0.20, 0.15, 0.50, 0.45, 0.30])
  reference = np.array([0.10, 0.15, 0.05, 0.00, 0.20, 0.10, 0.10, 0.05, 0.20, 0.10, 0.05, 0.35])
  result = stats.paired_test(method, reference, num_resamples=100)
  diffs = method - reference
  assert result["p_gain"] == pytest.approx(
      scipy.stats.wilcoxon(diffs, alternative="greater").pvalue, rel=1e-12)
  assert result["p_loss"] == pytest.approx(
      scipy.stats.wilcoxon(diffs, alternative="less").pvalue, rel=1e-12)
  # Hand check: the one-sided p-values split the two-sided one.
  two_sided = scipy.stats.wilcoxon(diffs).pvalue
  assert min(result["p_gain"], result["p_loss"]) == pytest.approx(two_sided / 2, rel=1e-9)


def test_mostly_worse_queries_are_not_a_gain_even_with_a_higher_mean():
  # 80 % of queries a little worse, 20 % much better: the mean rises, the method is not better
  # for most queries. A two-sided test with the direction read off the mean called this a gain.
  rng = np.random.default_rng(10)
  n = 250
  reference = rng.uniform(0.3, 0.7, n)
  worse = rng.random(n) < 0.8
  method = np.where(worse, reference - 0.02, reference + 0.3)
  result = stats.paired_test(method, reference)
  assert result["diff"] > 0 and result["ci_low"] > 0
  assert scipy.stats.wilcoxon(method - reference).pvalue < 0.05  # the old verdict's input
  assert result["p_gain"] > 0.5
  verdict = stats.correct_family([result])[0]
  assert not verdict["significant_gain"]
  # Nor a loss: the interval of the mean difference is above 0.
  assert not verdict["significant_loss"]


def test_holm_matches_a_hand_computed_example():
  p = [0.01, 0.04, 0.03, 0.005]
  # Sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06.
  np.testing.assert_allclose(stats.holm(p), [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])
  np.testing.assert_allclose(stats.holm([0.2]), [0.2])


def test_holm_rejects_like_the_step_down_procedure():
  rng = np.random.default_rng(11)
  for _ in range(50):
    p = rng.random(8) ** 3
    order = np.argsort(p)
    rejected = np.zeros(8, bool)
    for i, j in enumerate(order):  # reject while p_(i) < alpha / (n - i)
      if p[j] >= 0.05 / (8 - i):
        break
      rejected[j] = True
    np.testing.assert_array_equal(stats.holm(p) < 0.05, rejected)


def test_correct_family_needs_both_the_corrected_p_and_the_interval():
  rng = np.random.default_rng(12)
  reference = rng.random(300)
  gain = stats.paired_test(reference + 0.05 + 0.02 * rng.standard_normal(300), reference)
  loss = stats.paired_test(reference - 0.05 + 0.02 * rng.standard_normal(300), reference)
  borderline = dict(gain, p_gain=0.03)   # alone below 0.05, not after x2
  verdicts = stats.correct_family([gain, loss, borderline])
  assert [v["significant_gain"] for v in verdicts] == [True, False, False]
  assert [v["significant_loss"] for v in verdicts] == [False, True, False]
  assert verdicts[2]["p_gain_holm"] == pytest.approx(0.03 * 2)
  # A tiny p with an interval that straddles 0 is no verdict.
  straddle = dict(gain, ci_low=-0.01)
  assert not stats.correct_family([straddle])[0]["significant_gain"]


def test_negative_shift_is_never_a_significant_gain():
  rng = np.random.default_rng(7)
  for trial in range(5):
    reference = rng.random(100)
    method = reference - 0.1 - 0.05 * rng.random(100)
    result = stats.paired_test(method, reference, seed=trial)
    assert result["p_loss"] < 1e-3
    assert result["diff"] < 0
    verdict = stats.correct_family([result])[0]
    assert verdict["significant_gain"] is False
    assert verdict["significant_loss"] is True


def test_paired_test_deterministic_for_a_seed():
  rng = np.random.default_rng(8)
  a, b = rng.random(120), rng.random(120)
  assert stats.paired_test(a, b, seed=1) == stats.paired_test(a, b, seed=1)


def test_resampling_in_chunks_is_seamless(monkeypatch):
  # Many chunks (here 25 resamples each) must match a single big draw, which is kept for
  # the next values of the same size and seed (`_resample_rows`): each call, first or not,
  # gives what a fresh draw gives.
  rng = np.random.default_rng(9)
  values, others = rng.random(1000), rng.random(1000)
  whole = [stats.mean_ci(v, num_resamples=500, seed=2) for v in (values, others, values)]
  monkeypatch.setattr(stats, "_MAX_CHUNK_ELEMENTS", 25_000)
  assert [stats.mean_ci(v, num_resamples=500, seed=2) for v in (values, others, values)] == whole
  assert whole[0] != whole[1] and whole[0] == whole[2]


@pytest.mark.parametrize("values, message", [
    (np.ones((3, 2)), "1-D"),
    (np.ones(1), "at least 2"),
    (np.array([0.1, np.nan, 0.3]), "non-finite"),
    (np.array([0.1, np.inf]), "non-finite"),
    (np.array(["a", "b"]), "real-valued"),
])
def test_rejects_bad_values(values, message):
  with pytest.raises(ValueError, match=message):
    stats.mean_ci(values)
  with pytest.raises(ValueError, match=message):
    stats.paired_test(values, values)


def test_rejects_bad_parameters():
  values = np.arange(5.0)
  with pytest.raises(ValueError, match="same queries"):
    stats.paired_test(values, values[:4])
  with pytest.raises(ValueError, match="confidence"):
    stats.mean_ci(values, confidence=1.0)
  with pytest.raises(ValueError, match="num_resamples"):
    stats.paired_test(values, values, num_resamples=0)


def _noise_grid(rng: np.random.Generator, candidates: int, queries: int) -> np.ndarray:
  """Differences of correlated candidates that are no better than the reference."""
  shared = rng.normal(size=(1, queries))
  return 0.5 * shared + rng.normal(size=(candidates, queries))


def test_max_t_gain_holds_its_level_where_the_best_of_many_would_not():
  rng = np.random.default_rng(3)
  trials, family_wise, best_alone = 200, 0, 0
  for trial in range(trials):
    diffs = _noise_grid(rng, candidates=40, queries=60)
    t, p = stats.max_t_gain(diffs, num_resamples=400, seed=trial)
    family_wise += p <= 0.05
    best_alone += scipy.stats.ttest_1samp(diffs[np.argmax(diffs.mean(1))], 0.0,
                                          alternative="greater").pvalue <= 0.05
  # The corrected test rejects about 5 % of pure-noise grids; the best value's own t-test, which
  # ignores that it was picked out of 40, rejects most of them.
  assert family_wise <= 0.10 * trials
  assert best_alone >= 0.40 * trials


def test_max_t_gain_finds_a_real_gain_and_counts_copies_once():
  rng = np.random.default_rng(4)
  diffs = _noise_grid(rng, candidates=30, queries=80)
  diffs[7] += 0.8  # one candidate truly better
  t, p = stats.max_t_gain(diffs, num_resamples=1000)
  assert p == pytest.approx(1 / 1001) and t > 4
  # Copies of one candidate are one try, not many: the same t and p as the candidate alone.
  one = rng.normal(0.2, 1.0, size=(1, 50))
  assert stats.max_t_gain(np.repeat(one, 25, axis=0)) == pytest.approx(stats.max_t_gain(one))


def test_max_t_gain_of_no_difference_is_no_evidence():
  assert stats.max_t_gain(np.zeros((5, 10))) == (0.0, 1.0)


@pytest.mark.parametrize("diffs", [np.zeros(10), np.zeros((3, 1)), np.full((2, 4), np.nan)])
def test_max_t_gain_rejects_bad_shapes_and_values(diffs):
  with pytest.raises(ValueError):
    stats.max_t_gain(diffs)
