"""Process-level memos of deterministic computations, keyed by the content of their inputs.

One pipeline asks for the same expensive, deterministic result many times over: the same
train items indexed for the online oracle of every HPPO run, the rule and the evaluation; the
same metric predictor trained for the data path and for `rerank`; the same fit/validation
split; the same policy-free HPPO targets in each candidate-policy ablation. A `Memo` keeps the
last few results of one such computation, keyed by a `digest` of everything the result depends
on (array contents, not object identities: each run loads its own catalog). A hit returns what
the computation would have returned, so nothing a run computes changes; only the time does.
"""

import hashlib
import json
from typing import Any, Callable, Generic, TypeVar

from absl import logging
import numpy as np

T = TypeVar("T")

_MEMOS: list["Memo[Any]"] = []
# Rows hashed at a time by `rows_digest` (16 MB at d = 64): a memory-mapped catalog is read
# in pieces instead of copied whole.
_ROWS_PER_CHUNK = 1 << 16


def digest(*parts: Any) -> bytes:
  """sha256 of `parts`: numpy arrays (dtype, shape and bytes), bytes (another digest), or
  JSON-serialisable values."""
  h = hashlib.sha256()
  for part in parts:
    if isinstance(part, np.ndarray):
      array = np.ascontiguousarray(part)
      h.update(f"array {array.dtype.str} {array.shape}".encode())
      h.update(array.data)
    elif isinstance(part, bytes):
      h.update(b"bytes " + part)
    else:
      h.update(b"json " + json.dumps(part, sort_keys=True, default=str).encode())
    h.update(b"\x00")  # parts stay apart: ("ab", "c") differs from ("a", "bc")
  return h.digest()


def rows_digest(array: np.ndarray, rows: np.ndarray) -> bytes:
  """`digest` of `array[rows]` as float32, read a chunk of rows at a time."""
  rows = np.asarray(rows)
  h = hashlib.sha256(f"rows {rows.shape} of {array.shape[1:]}".encode())
  for start in range(0, len(rows), _ROWS_PER_CHUNK):
    h.update(np.ascontiguousarray(array[rows[start:start + _ROWS_PER_CHUNK]], np.float32).data)
  return h.digest()


class Memo(Generic[T]):
  """The last `kept` results of one computation, by key; the oldest is dropped first."""

  def __init__(self, name: str, kept: int):
    self.name = name
    self._kept = int(kept)
    self._results: dict[bytes, T] = {}
    self.hits = 0
    self.misses = 0
    _MEMOS.append(self)

  def get(self, key: bytes, compute: Callable[[], T],
          accept: Callable[[T], bool] = lambda value: True) -> T:
    """The result stored under `key` if `accept` takes it, else `compute()`, stored."""
    if key in self._results and accept(self._results[key]):
      self.hits += 1
      logging.info("%s: the result computed earlier in this process for the same inputs",
                   self.name)
      return self._results[key]
    self._results.pop(key, None)
    self.misses += 1
    value = compute()
    if len(self._results) >= self._kept:
      del self._results[next(iter(self._results))]
    self._results[key] = value
    return value

  def clear(self) -> None:
    self._results.clear()
    self.hits = self.misses = 0


def clear_all() -> None:
  """Forgets every memo's results (tests that count computations start from here)."""
  for memo in _MEMOS:
    memo.clear()
