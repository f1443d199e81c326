"""Tests for modit_jax.stats."""

import json

import numpy as np
import pytest

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
  assert set(result) == {"diff", "ci_low", "ci_high", "p", "p_bootstrap", "significant_gain"}
  assert result["p"] < 1e-3
  assert 0 < result["p_bootstrap"] < 1e-3  # Never exactly 0 thanks to the +1 correction.
  assert result["significant_gain"] is True
  assert result["ci_low"] < result["diff"] < result["ci_high"]
  assert result["ci_low"] > 0
  json.dumps(result)  # Plain Python values only.
  assert all(type(v) is float for k, v in result.items() if k != "significant_gain")


def test_paired_test_identical_arrays():
  values = np.random.default_rng(5).random(50)
  result = stats.paired_test(values, values.copy())
  assert result == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": 1.0, "p_bootstrap": 1.0,
                    "significant_gain": False}


def test_paired_test_swapping_arguments():
  rng = np.random.default_rng(6)
  a = rng.random(200)
  b = a + 0.02 * rng.standard_normal(200) + 0.01
  ab, ba = stats.paired_test(a, b, seed=3), stats.paired_test(b, a, seed=3)
  assert ba["diff"] == pytest.approx(-ab["diff"])
  assert ba["ci_low"] == pytest.approx(-ab["ci_high"])
  assert ba["ci_high"] == pytest.approx(-ab["ci_low"])
  assert ba["p"] == pytest.approx(ab["p"])
  assert ba["p_bootstrap"] == pytest.approx(ab["p_bootstrap"])


def test_negative_shift_is_never_a_significant_gain():
  rng = np.random.default_rng(7)
  for trial in range(5):
    reference = rng.random(100)
    method = reference - 0.1 - 0.05 * rng.random(100)
    result = stats.paired_test(method, reference, seed=trial)
    assert result["p"] < 1e-3
    assert result["diff"] < 0
    assert result["significant_gain"] is False


def test_paired_test_deterministic_for_a_seed():
  rng = np.random.default_rng(8)
  a, b = rng.random(120), rng.random(120)
  assert stats.paired_test(a, b, seed=1) == stats.paired_test(a, b, seed=1)


def test_resampling_in_chunks_is_seamless(monkeypatch):
  # Many chunks (here 25 resamples each) must match a single big draw.
  values = np.random.default_rng(9).random(1000)
  whole = stats.mean_ci(values, num_resamples=500, seed=2)
  monkeypatch.setattr(stats, "_MAX_CHUNK_ELEMENTS", 25_000)
  assert stats.mean_ci(values, num_resamples=500, seed=2) == whole


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
