"""ScaNN against exact search: build time, recall@k and queries per second.

Run from the repository root:

  python bench/retrieval.py                       # N = 100k and 1M, d = 64, synthetic
  python bench/retrieval.py --sizes=20000 --queries=500
  python bench/retrieval.py --dataset=out/default/dataset   # a catalog's embeddings

For each catalog size N it builds a `ScannIndex` (timed), takes `ExactIndex`'s top-k as the
truth, and times both indexes single-threaded (`parallel=False`) and parallel. Exact search
single-threaded also needs BLAS on one thread; numpy fixes its BLAS thread count when it is
first imported, so that measurement runs in a child process started with
OPENBLAS_NUM_THREADS=OMP_NUM_THREADS=MKL_NUM_THREADS=1. Every number comes from this run.

Synthetic data: a Gaussian mixture on the unit sphere (random unit centres, a per-cluster
spread, normalised), seeded; queries are items plus a little noise, normalised.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import common
from modit_jax import catalog as catalog_lib
from modit_jax import retrieval

_SINGLE_THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="100000,1000000",
                      help="comma-separated catalog sizes N (synthetic data only)")
  parser.add_argument("--dim", type=int, default=64, help="embedding dimension (synthetic)")
  parser.add_argument("--clusters", type=int, default=3000, help="mixture components")
  parser.add_argument("--queries", type=int, default=1000, help="number of queries")
  parser.add_argument("--k", type=int, default=20, help="neighbours per query")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed ScaNN runs per setting; the median is reported")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dataset", default=None,
                      help="catalog directory: use its embeddings instead of synthetic data")
  # Internal: the single-threaded exact measurement, run in a child process.
  parser.add_argument("--exact_worker", default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _exact_single_thread(items: np.ndarray, queries: np.ndarray, k: int,
                         workdir: str) -> tuple[float, np.ndarray]:
  """Times exact search with parallel=False and one BLAS thread, in a child process."""
  np.save(os.path.join(workdir, "items.npy"), items)
  np.save(os.path.join(workdir, "queries.npy"), queries)
  env = dict(os.environ, **{name: "1" for name in _SINGLE_THREAD_ENV})
  subprocess.run([sys.executable, os.path.abspath(__file__), f"--exact_worker={workdir}",
                  f"--k={k}"], env=env, check=True)
  with open(os.path.join(workdir, "time.json")) as f:
    seconds = json.load(f)["seconds"]
  return seconds, np.load(os.path.join(workdir, "ids.npy"))


def _exact_worker(workdir: str, k: int) -> None:
  items = np.load(os.path.join(workdir, "items.npy"))
  queries = np.load(os.path.join(workdir, "queries.npy"))
  index = retrieval.ExactIndex(items)
  index.search(queries[:8], k, parallel=False)  # warm-up
  start = time.perf_counter()
  ids, _ = index.search(queries, k, parallel=False)
  seconds = time.perf_counter() - start
  np.save(os.path.join(workdir, "ids.npy"), ids)
  with open(os.path.join(workdir, "time.json"), "w") as f:
    json.dump({"seconds": seconds}, f)


def bench_one(items: np.ndarray, queries: np.ndarray, args: argparse.Namespace) -> dict:
  """All measurements for one catalog."""
  n, k = items.shape[0], args.k
  num_queries = queries.shape[0]
  start = time.perf_counter()
  scann_index = retrieval.build_index(items, "scann")
  build_s = time.perf_counter() - start
  exact_index = retrieval.build_index(items, "exact")

  exact_par_s, (truth, _) = common.timed(lambda: exact_index.search(queries, k, parallel=True), 1)
  with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as workdir:
    exact_single_s, single_ids = _exact_single_thread(items, queries, k, workdir)
  if not np.array_equal(single_ids, truth):
    print(f"  note: single-threaded exact differs from parallel exact on "
          f"{(single_ids != truth).any(axis=1).sum()} queries (float ties)")

  scann_single_s, (ids_single, _) = common.timed(
      lambda: scann_index.search(queries, k, parallel=False), args.repeats)
  scann_par_s, (ids_par, _) = common.timed(
      lambda: scann_index.search(queries, k, parallel=True), args.repeats)
  if not np.array_equal(ids_single, ids_par):
    print("  note: ScaNN single-threaded and parallel ids differ")
  return {
      "n": n, "dim": items.shape[1], "build_s": build_s, "params": scann_index.params,
      "recall": common.recall(ids_par, truth),
      "scann_single_qps": num_queries / scann_single_s,
      "exact_single_qps": num_queries / exact_single_s,
      "scann_par_qps": num_queries / scann_par_s,
      "exact_par_qps": num_queries / exact_par_s,
  }


def print_table(rows: list[dict], args: argparse.Namespace, num_queries: int) -> None:
  print()
  print(f"ScaNN vs exact maximum dot product, k={args.k}, {num_queries} queries, "
        f"{os.cpu_count()} CPU cores")
  print("single = parallel=False (exact: also 1 BLAS thread, child process with "
        "OPENBLAS/OMP/MKL_NUM_THREADS=1); parallel = parallel=True (all cores)")
  print("ScaNN QPS: median of "
        f"{args.repeats} runs after a warm-up; exact QPS: one run after a warm-up")
  header = ("| N | d | ScaNN build s | recall@{k} | ScaNN QPS single | exact QPS single "
            "| speed-up single | ScaNN QPS parallel | exact QPS parallel | speed-up parallel |")
  print(header.format(k=args.k))
  print("|" + "---|" * (header.count("|") - 1))
  for r in rows:
    print(f"| {r['n']:,} | {r['dim']} | {r['build_s']:.1f} | {r['recall']:.4f} "
          f"| {r['scann_single_qps']:,.0f} | {r['exact_single_qps']:,.0f} "
          f"| {r['scann_single_qps'] / r['exact_single_qps']:.1f}x "
          f"| {r['scann_par_qps']:,.0f} | {r['exact_par_qps']:,.0f} "
          f"| {r['scann_par_qps'] / r['exact_par_qps']:.1f}x |")
  print()
  for r in rows:
    print(f"ScaNN params at N={r['n']:,}: {json.dumps(r['params'])}")


def main(argv: list[str]) -> None:
  args = _parse_args(argv)
  if args.exact_worker:
    _exact_worker(args.exact_worker, args.k)
    return
  catalogs = []
  if args.dataset:
    items = catalog_lib.load_catalog(args.dataset, mmap=True).embeddings
    catalogs.append((f"catalog {args.dataset}", lambda items=items: np.asarray(items)))
  else:
    for n in (int(s) for s in args.sizes.split(",")):
      catalogs.append((f"synthetic N={n:,} d={args.dim} clusters={args.clusters}",
                       lambda n=n: common.synthetic_items(n, args.dim, args.clusters, args.seed)))
  rows, num_queries = [], 0
  for name, make in catalogs:
    start = time.perf_counter()
    items = make()
    queries = common.near_queries(items, min(args.queries, items.shape[0]), args.seed)
    num_queries = queries.shape[0]
    print(f"{name}: data ready in {time.perf_counter() - start:.1f} s", flush=True)
    rows.append(bench_one(items, queries, args))
    print(f"  done: {json.dumps({k: v for k, v in rows[-1].items() if k != 'params'})}",
          flush=True)
  print_table(rows, args, num_queries)


if __name__ == "__main__":
  main(sys.argv[1:])
