"""How ScaNN's build time and query time grow with the catalog, next to exact search.

Run from the repository root:

  python bench/scale.py                              # N = 10k, 100k, 1M, 10M; d = 64
  python bench/scale.py --sizes=10000,20000,50000 --queries=200 --plot=/tmp/scale.png
  python bench/scale.py --sizes=1000000,10000000 --sweep_leaves=5,10,19,60,190
  python bench/scale.py --sizes=1000000,10000000 --sweep_reorder=250,500,1000,2000

The catalogs are nested: the largest synthetic mixture (bench/common.py) is generated once and
each size takes its first N rows. The rows are drawn independently, so every prefix is a sample
of the same mixture, and the growth is not confounded by a new draw per size. The number of
mixture components stays fixed (`--clusters`), so clusters hold more items as N grows, as a
growing real catalog does.

For each N it measures:
- the build time of `retrieval.build_index(items, "scann")` with its default parameters
  (`retrieval.scann_params(N)`: ~sqrt(N) leaves, 6 % of them searched, 250 re-ranked);
- per-query search time of ScaNN and of `ExactIndex`, each on one batch of `--queries`
  queries spread over all cores (`parallel=True`);
- recall@k of ScaNN against `ExactIndex`;
- with `--sweep_leaves` / `--sweep_reorder`, the same for other numbers of searched leaves /
  exactly re-scored candidates on the same build of each N from 1M up
  (`ScannIndex.with_search`), so the default's choice can be judged against what fewer or
  more give;
- memory: the resident memory the index keeps (RSS after its build minus before) and the
  build's peak above its start (`getrusage`'s peak, when the build set a new one; sizes
  ascend, so the largest build's peak is always measured). The catalog itself (4 bytes x d x N,
  2.56 GB at 10M) is allocated before any build and is not counted. Small indexes can land in
  memory that earlier work freed and read near 0 MiB; the columns mean something from 1M up.

All searches are timed in one run, round-robin over every (N, index) pair (common.round_robin),
so each sees the same quiet and busy spells of a shared machine; the fastest call is reported.
Each build runs once (`--build_repeats` for more; the fastest is reported).

Output: a table, the log-log slopes (least-squares fit of log time against log N: 1 is
linear growth, 0.5 grows as sqrt(N)) as `loglog_slope_<what>=<x>` lines, and a log-log plot
(`--plot`, PNG; bench/out/ by default).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

import common
from modit_jax import retrieval


def _parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="10000,100000,1000000,10000000",
                      help="comma-separated catalog sizes N, ascending")
  parser.add_argument("--dim", type=int, default=64, help="embedding dimension")
  parser.add_argument("--clusters", type=int, default=3000, help="mixture components")
  parser.add_argument("--queries", type=int, default=1000, help="queries per search batch")
  parser.add_argument("--k", type=int, default=20, help="neighbours per query")
  parser.add_argument("--rounds", type=int, default=3,
                      help="timed search calls per (N, index), taken in turns")
  parser.add_argument("--build_repeats", type=int, default=1,
                      help="ScaNN builds per N; the fastest is reported")
  parser.add_argument("--sweep_leaves", default="",
                      help="comma-separated leaves_to_search values also timed (with their "
                           "recall) on each N >= 1M; empty: only the default")
  parser.add_argument("--sweep_reorder", default="",
                      help="comma-separated reorder values (exactly re-scored candidates) "
                           "also timed on each N >= 1M, at the default leaves")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "out",
                                                     "scale.png"),
                      help="where to write the log-log plot (PNG); empty: no plot")
  return parser.parse_args(argv)


def loglog_slope(sizes: list[int], seconds: list[float]) -> float:
  """The slope of the least-squares line through (log N, log seconds)."""
  if len(sizes) < 2:
    return float("nan")
  return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def write_plot(rows: list[dict], slopes: dict[str, float], path: str, title: str) -> None:
  """Two log-log panels: build time, and search time per query (ScaNN and exact)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # no display on the bench machines
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  sizes = [r["n"] for r in rows]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
  left.loglog(sizes, [r["build_s"] for r in rows], "o-",
              label=f"ScaNN build (slope {slopes['build']:.2f})")
  left.set_ylabel("build time (s)")
  right.loglog(sizes, [r["scann_s"] * 1e6 for r in rows], "o-",
               label=f"ScaNN (slope {slopes['scann_query']:.2f})")
  right.loglog(sizes, [r["exact_s"] * 1e6 for r in rows], "s--",
               label=f"exact (slope {slopes['exact_query']:.2f})")
  for r in rows:  # recall beside each ScaNN point: a time means little without it
    right.annotate(f"recall {r['recall']:.3f}", (r["n"], r["scann_s"] * 1e6),
                   textcoords="offset points", xytext=(4, -12), fontsize=7)
  right.set_ylabel("search time per query (µs), batched, all cores")
  for ax in (left, right):
    ax.set_xlabel("catalog items N")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str]) -> None:
  args = _parse_args(argv)
  sizes = sorted(int(s) for s in args.sizes.split(","))
  print(f"machine: {common.machine()}", flush=True)
  start = time.perf_counter()
  all_items = common.synthetic_items(sizes[-1], args.dim, args.clusters, args.seed)
  print(f"synthetic N={sizes[-1]:,} d={args.dim} clusters={args.clusters}: "
        f"{time.perf_counter() - start:.1f} s", flush=True)

  rows, searches = [], {}
  for n in sizes:
    items = all_items[:n]
    queries = common.near_queries(items, min(args.queries, n), args.seed)
    builds = []
    for _ in range(args.build_repeats):
      scann_index = None  # a repeat's earlier build is freed before this one is measured
      rss_before, peak_before = common.rss_bytes(), common.peak_rss_bytes()
      start = time.perf_counter()
      scann_index = retrieval.build_index(items, "scann")
      builds.append(time.perf_counter() - start)
    index_bytes = common.rss_bytes() - rss_before
    peak = common.peak_rss_bytes()
    build_peak_bytes = peak - rss_before if peak > peak_before else None
    exact_index = retrieval.build_index(items, "exact")
    print(f"N={n:,}: ScaNN built in {min(builds):.2f} s, keeps {index_bytes / 2**20:,.0f} MiB, "
          f"{json.dumps(scann_index.params)}", flush=True)
    # Default arguments bind this iteration's index and queries to the closures.
    searches[f"scann {n}"] = (
        lambda ix=scann_index, q=queries: ix.search(q, args.k, parallel=True))
    searches[f"exact {n}"] = (
        lambda ix=exact_index, q=queries: ix.search(q, args.k, parallel=True))
    if n >= 1_000_000 and "num_leaves" in scann_index.params:
      settings = [("leaves_to_search", int(x)) for x in args.sweep_leaves.split(",")
                  if x.strip() and int(x) <= scann_index.params["num_leaves"]]
      settings += [("reorder", int(x)) for x in args.sweep_reorder.split(",") if x.strip()]
      for name, value in settings:
        searches[f"sweep {n} {name} {value}"] = (
            lambda ix=scann_index.with_search(**{name: value}), q=queries:
            ix.search(q, args.k, parallel=True))
    rows.append({"n": n, "build_s": min(builds), "queries": queries.shape[0],
                 "params": scann_index.params, "index_mib": index_bytes / 2**20,
                 "build_peak_mib": None if build_peak_bytes is None else build_peak_bytes / 2**20})

  print(f"timing searches: {args.rounds} rounds over {len(searches)} (N, index) pairs; "
        f"{common.load()}", flush=True)
  times, results = common.round_robin(searches, args.rounds)
  for r in rows:
    n, num = r["n"], r["queries"]
    r["scann_s"], r["scann_median_s"] = (t / num for t in times[f"scann {n}"])
    r["exact_s"], r["exact_median_s"] = (t / num for t in times[f"exact {n}"])
    r["recall"] = common.recall(results[f"scann {n}"][0], results[f"exact {n}"][0])

  slopes = {
      "build": loglog_slope(sizes, [r["build_s"] for r in rows]),
      "scann_query": loglog_slope(sizes, [r["scann_s"] for r in rows]),
      "exact_query": loglog_slope(sizes, [r["exact_s"] for r in rows]),
  }
  print()
  print(f"ScaNN (default params) vs exact, d={args.dim}, k={args.k}, {args.clusters} "
        f"clusters; one batch of {args.queries} queries per search call, parallel=True")
  print(f"search: fastest of {args.rounds} round-robin calls (median in brackets); build: "
        f"fastest of {args.build_repeats}")
  print("| N | leaves (searched) | ScaNN build s | index MiB | build peak MiB | ScaNN µs/query "
        f"| exact µs/query | exact / ScaNN | recall@{args.k} |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    p = r["params"]
    leaves = (f"{p['num_leaves']} ({p['leaves_to_search']})" if "num_leaves" in p
              else p["algorithm"])
    peak = "—" if r["build_peak_mib"] is None else f"{r['build_peak_mib']:,.0f}"
    print(f"| {r['n']:,} | {leaves} | {r['build_s']:.2f} | {r['index_mib']:,.0f} | {peak} "
          f"| {r['scann_s'] * 1e6:.1f} ({r['scann_median_s'] * 1e6:.1f}) "
          f"| {r['exact_s'] * 1e6:.1f} ({r['exact_median_s'] * 1e6:.1f}) "
          f"| {r['exact_s'] / r['scann_s']:.1f}x | {r['recall']:.4f} |")
  print()
  if len(rows) > 1:
    print("local log-log slopes between consecutive sizes (build / ScaNN query / exact query):")
    for a, b in zip(rows, rows[1:]):
      local = [loglog_slope([a["n"], b["n"]], [a[key], b[key]])
               for key in ("build_s", "scann_s", "exact_s")]
      print(f"  {a['n']:,} -> {b['n']:,}: " + " / ".join(f"{s:.2f}" for s in local))
  sweep = [key for key in times if key.startswith("sweep ")]
  if sweep:
    print()
    print(f"other search settings on the same build (fastest of {args.rounds}; one batch of "
          f"{args.queries} queries):")
    print(f"| N | leaves searched (of) | items searched | reorder | ScaNN µs/query "
          f"| recall@{args.k} |")
    print("|---|---|---|---|---|---|")
    for key in sweep:
      _, n, name, value = key.split()
      row = next(r for r in rows if r["n"] == int(n))
      params = {**row["params"], name: int(value)}
      recall = common.recall(results[key][0], results[f"exact {n}"][0])
      default = " (default)" if params == row["params"] else ""
      print(f"| {int(n):,} | {params['leaves_to_search']} ({params['num_leaves']}) "
            f"| {params['leaves_to_search'] * int(n) / params['num_leaves']:,.0f} "
            f"| {params['reorder']}{default} | {times[key][0] / row['queries'] * 1e6:.1f} "
            f"| {recall:.4f} |")
  print(f"machine at the end: {common.load()}")
  if args.plot:
    write_plot(rows, slopes, args.plot,
               f"ScaNN (default params) vs exact, d={args.dim}, k={args.k}, "
               f"{args.queries} queries per batch\n{common.machine()}")
    print(f"plot: {args.plot}")
  for name, slope in slopes.items():
    print(f"loglog_slope_{name}={slope:.3f}")


if __name__ == "__main__":
  main(sys.argv[1:])
