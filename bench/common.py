"""Helpers shared by the retrieval benches: synthetic data, recall, timing, the machine.

The scripts in bench/ import this as `common` (Python puts a script's own directory first on
`sys.path`, so `python bench/<name>.py` from the repository root finds it).
"""

import collections
import os
import resource
import time
from typing import Any, Callable

import numpy as np

_GEN_CHUNK = 1 << 18  # rows generated at a time, to keep float64 temporaries small


def _unit(x: np.ndarray) -> np.ndarray:
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_items(num_items: int, dim: int, clusters: int, seed: int) -> np.ndarray:
  """A seeded Gaussian mixture on the unit sphere, float32 [num_items, dim]."""
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(clusters, dim)))
  # Per-dimension spread 0.03-0.08: offsets of norm ~0.25-0.65, so clusters are distinct but
  # each one holds a spread of neighbours at varied distances.
  spread = rng.uniform(0.03, 0.08, size=clusters).astype(np.float32)
  items = np.empty((num_items, dim), np.float32)
  for start in range(0, num_items, _GEN_CHUNK):
    stop = min(start + _GEN_CHUNK, num_items)
    which = rng.integers(0, clusters, stop - start)
    noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
    items[start:stop] = _unit(centres[which] + spread[which, None] * noise)
  return items


def near_queries(items: np.ndarray, num_queries: int, seed: int) -> np.ndarray:
  """Queries near random items: item + N(0, 0.03^2) per dimension, normalised."""
  rng = np.random.default_rng(seed + 1)
  picks = rng.choice(items.shape[0], size=num_queries, replace=False)
  noise = rng.standard_normal((num_queries, items.shape[1]), dtype=np.float32)
  return _unit(items[picks] + 0.03 * noise)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean share of each row of `truth` that appears in the same row of `found`."""
  hits = (found[:, :, None] == truth[:, None, :]).any(axis=1)
  return float(hits.mean())


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
  """Median wall time of `repeats` calls after one warm-up call, and the last result."""
  result = fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), result


def round_robin(fns: dict[str, Callable[[], Any]],
                rounds: int) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
  """Times functions that return host data, taking turns; for ratios on a shared machine.

  Each function gets one untimed call (warm-up, compilation), then `rounds` timed calls. Every
  round calls each function once, and the order rotates from round to round, so all of them
  see the same quiet and busy spells of a shared machine and none always runs after the same
  one. Other jobs only ever add time, so the fastest call is the best estimate of the cost.
  (bench/train_step.py does the same for calls that return JAX arrays.)

  Args:
    fns: name -> function of no arguments; it must return only when its work is done.
    rounds: timed calls per function, >= 1.

  Returns:
    ({name: (fastest, median) seconds per call}, {name: result of its last call}).
  """
  results = {name: fn() for name, fn in fns.items()}
  names = list(fns)
  times = collections.defaultdict(list)
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      results[name] = fns[name]()
      times[name].append(time.perf_counter() - start)
  return {name: (min(t), float(np.median(t))) for name, t in times.items()}, results


def machine() -> str:
  """The CPU model, its core counts, its vector extensions and the load average, in words."""
  model, flags = "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown CPU":
          model = value.strip()
        elif key.strip() == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  # The flags say more than the model name on VMs, which often report a generic "Xeon".
  extensions = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return (f"{model}, {os.cpu_count()} logical CPUs ({usable} usable by this process), "
          f"{'/'.join(extensions) or 'no AVX2'}; {load()}")


def rss_bytes() -> int:
  """This process's resident memory now (Linux /proc; 0 where it cannot be read)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return 0


def peak_rss_bytes() -> int:
  """This process's peak resident memory so far (`getrusage`: KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load() -> str:
  """The 1/5/15-minute load averages, in words: other jobs slow every measurement."""
  try:
    one, five, fifteen = os.getloadavg()
  except OSError:
    return "load average unknown"
  return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min)"
