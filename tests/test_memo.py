"""Tests for modit_jax/memo.py: content keys and the memo's keep/accept rules."""

import numpy as np

from modit_jax import memo


def test_digest_tells_contents_types_and_boundaries_apart():
  a = np.arange(6, dtype=np.float32)
  assert memo.digest(a) == memo.digest(a.copy())
  assert memo.digest(a) != memo.digest(a.astype(np.float64))  # same values, other bytes
  assert memo.digest(a) != memo.digest(a.reshape(2, 3))
  assert memo.digest("ab", "c") != memo.digest("a", "bc")
  assert memo.digest({"x": 1, "y": 2}) == memo.digest({"y": 2, "x": 1})
  assert memo.digest(b"\x01") != memo.digest([1])


def test_rows_digest_reads_rows_not_arrays():
  """The same rows in the same order, from a subset or the whole array, chunk by chunk."""
  rng = np.random.default_rng(0)
  full = rng.normal(size=(50, 4)).astype(np.float32)
  rows = np.array([3, 7, 8, 40])
  assert memo.rows_digest(full, rows) == memo.rows_digest(full[rows], np.arange(4))
  assert memo.rows_digest(full, rows) != memo.rows_digest(full, rows[::-1])
  moved = full.copy()
  moved[40, 0] += 1e-6
  assert memo.rows_digest(full, rows) != memo.rows_digest(moved, rows)
  assert memo.rows_digest(moved, rows[:3]) == memo.rows_digest(full, rows[:3])


def test_memo_keeps_the_last_results_and_recomputes_what_it_does_not_accept():
  kept = memo.Memo("test", kept=2)
  calls = []
  compute = lambda value: lambda: calls.append(value) or value
  assert kept.get(b"a", compute(1)) == 1
  assert kept.get(b"a", compute(2)) == 1 and calls == [1]
  kept.get(b"b", compute(3))
  kept.get(b"c", compute(4))  # drops a, the oldest
  assert kept.get(b"a", compute(5)) == 5 and calls == [1, 3, 4, 5]
  assert kept.get(b"a", compute(6), accept=lambda v: v > 5) == 6
  assert kept.get(b"a", compute(7), accept=lambda v: v > 5) == 6
  assert (kept.hits, kept.misses) == (2, 5)
  memo.clear_all()
  assert kept.get(b"a", compute(8)) == 8
