"""ScaNN against faiss-cpu (HNSW and IVF-PQ): queries per second at equal recall@k.

Run from the repository root (faiss-cpu is a bench-only extra: pip install -e '.[bench]'):

  python bench/faiss_compare.py                      # N = 1M, d = 64, 1000 queries
  python bench/faiss_compare.py --n=50000 --queries=500 --rounds=2

One synthetic catalog (bench/common.py: the Gaussian mixture of bench/retrieval.py, queries
near items), one set of queries, `ExactIndex` top-k as the truth. Every method is a family of
settings, built once and swept over its search-time knobs:

- ScaNN: `retrieval.build_index(items, "scann")`, the default build (`scann_params(N)`), then
  a sweep of the two search-time knobs `leaves_to_search` and `reorder`. These only change the
  arguments of each search call (`ScannIndex._search` passes them to ScaNN per call), so the
  sweep wraps the one built searcher in `ScannIndex`es with other params instead of rebuilding:
  a rebuild with those params would build the same tree and codes. The default setting is
  marked.
- faiss HNSW: `IndexHNSWFlat(d, M=32, METRIC_INNER_PRODUCT)`, efConstruction 200; sweep
  efSearch. It scores full float vectors, so it needs no re-ranking.
- faiss IVF-PQ: `IndexIVFPQ` over an `IndexFlatIP` coarse quantizer, nlist = 4 sqrt(N),
  m = 16 subquantizers of 8 bits (16 bytes per item, as ScaNN's 32 two-dimension blocks of
  4 bits), inner product; trained on min(N, 250k) sampled items (ScaNN's k-means sample size);
  sweep nprobe. PQ scores are approximate and ScaNN re-ranks its best 250 candidates exactly,
  so for a like-for-like comparison IVF-PQ is also run inside `IndexRefineFlat` (exact float
  re-ranking of the best `reorder` = k * k_factor PQ candidates), for each `--ivf_reorder`
  (0 = the raw PQ ranking). "IVF-PQ" in the equal-recall table is the fastest of all these.

Timing: every setting searches the whole query batch in one call, with all cores (ScaNN
`parallel=True`, faiss OpenMP on all threads) and on one thread (ScaNN `parallel=False`, faiss
`omp_set_num_threads(1)`). All (setting, threads) pairs are timed round-robin in one run
(common.round_robin), so they all see the same quiet and busy spells of a shared machine; QPS
is from the fastest call. faiss search knobs go in per-call `SearchParameters`, so the
interleaved calls cannot leave settings behind for each other.

Equal recall: for each target recall@k, each method's fastest setting that reaches it, and the
QPS ratios. The last lines are machine-readable: `scann_over_hnsw_qps@recall0.95=<x>` (all
cores) and `..._1thread=<x>`; `nan` where a method never reaches the target in its sweep.
"""

import argparse
import math
import sys
import time
from typing import Any, Callable

import numpy as np

import common
from modit_jax import retrieval

_TARGETS = (0.90, 0.95, 0.99)
_IVF_TRAIN_SAMPLE = 250_000  # as ScaNN's training_sample_size (retrieval._tree_ah_params)
_MODE_NAMES = {"all": "all cores", "1": "1 thread"}


def _parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=1_000_000, help="catalog size N")
  parser.add_argument("--dim", type=int, default=64, help="embedding dimension")
  parser.add_argument("--clusters", type=int, default=3000, help="mixture components")
  parser.add_argument("--queries", type=int, default=1000, help="queries (one batch)")
  parser.add_argument("--k", type=int, default=20, help="neighbours per query")
  parser.add_argument("--rounds", type=int, default=3,
                      help="timed calls per (setting, threads), taken in turns")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_single_thread", action="store_true",
                      help="time with all cores only")
  parser.add_argument("--scann_leaves", default="0.005,0.01,0.015,0.02,0.03,0.045,0.06,"
                      "0.09,0.12,0.18,0.25,0.35,0.5",
                      help="leaves_to_search values, as fractions of num_leaves")
  parser.add_argument("--scann_reorder", default="100,250,500",
                      help="reorder values (exactly re-ranked candidates)")
  parser.add_argument("--hnsw_m", type=int, default=32)
  parser.add_argument("--hnsw_ef_construction", type=int, default=200)
  parser.add_argument("--ef_search", default="20,32,48,64,96,128,192,256,384,512")
  parser.add_argument("--ivf_nlist", type=int, default=0, help="0: round(4 sqrt(N))")
  parser.add_argument("--ivf_m", type=int, default=16, help="PQ subquantizers")
  parser.add_argument("--ivf_nbits", type=int, default=8, help="bits per PQ code")
  parser.add_argument("--nprobe", default="1,2,4,8,16,32,64,128,256")
  parser.add_argument("--ivf_reorder", default="0,100,250",
                      help="PQ candidates re-ranked exactly (IndexRefineFlat); 0: none")
  return parser.parse_args(argv)


def _ints(spec: str) -> list[int]:
  return [int(s) for s in spec.split(",") if s]


class Setting:
  """One searchable configuration of one method."""

  def __init__(self, method: str, name: str, search: Callable[[np.ndarray, int, bool], Any],
               default: bool = False):
    """`search(queries, k, all_threads)` returns int ids [Q, k] (-1: none found)."""
    self.method, self.name, self.search, self.default = method, name, search, default


def scann_settings(items: np.ndarray, args: argparse.Namespace) -> tuple[list[Setting], float]:
  """The default ScaNN index and its search-knob sweep; and the build seconds."""
  start = time.perf_counter()
  base = retrieval.build_index(items, "scann")
  build_s = time.perf_counter() - start
  params = base.params
  print(f"ScaNN build {build_s:.1f} s: {params}", flush=True)
  if params["algorithm"] != "tree_ah":
    raise SystemExit(f"N={items.shape[0]} is below ScaNN's brute-force threshold: "
                     f"nothing to sweep")
  num_leaves = params["num_leaves"]
  leaves = sorted({min(num_leaves, max(1, round(float(f) * num_leaves)))
                   for f in args.scann_leaves.split(",")} | {params["leaves_to_search"]})
  reorders = sorted(set(_ints(args.scann_reorder)) | {params["reorder"]})
  settings = []
  for l in leaves:
    for r in reorders:
      # Same searcher, other per-call knobs (see the module docstring).
      index = retrieval.ScannIndex(
          base._searcher,  # pylint: disable=protected-access
          base.num_items, base.dim, dict(params, leaves_to_search=l, reorder=r))
      settings.append(Setting(
          "ScaNN", f"leaves={l}/{num_leaves} reorder={r}",
          lambda q, k, par, ix=index: ix.search(q, k, parallel=par)[0],
          default=(l, r) == (params["leaves_to_search"], params["reorder"])))
  return settings, build_s


def _faiss_search(faiss: Any, index: Any, make_params: Callable[[], Any]):
  """search(queries, k, all_threads) for a faiss index with per-call search parameters."""
  threads = faiss.omp_get_max_threads()

  def search(queries: np.ndarray, k: int, all_threads: bool) -> np.ndarray:
    faiss.omp_set_num_threads(threads if all_threads else 1)
    return index.search(queries, k, params=make_params())[1]

  return search


def hnsw_settings(faiss: Any, items: np.ndarray,
                  args: argparse.Namespace) -> tuple[list[Setting], float]:
  """faiss HNSWFlat (inner product) and its efSearch sweep; and the build seconds."""
  start = time.perf_counter()
  index = faiss.IndexHNSWFlat(items.shape[1], args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
  index.hnsw.efConstruction = args.hnsw_ef_construction
  index.add(items)
  build_s = time.perf_counter() - start
  print(f"faiss HNSW build {build_s:.1f} s: M={args.hnsw_m} "
        f"efConstruction={args.hnsw_ef_construction}", flush=True)
  return [Setting("HNSW", f"efSearch={ef}", _faiss_search(
      faiss, index, lambda ef=ef: faiss.SearchParametersHNSW(efSearch=ef)))
          for ef in _ints(args.ef_search) if ef >= args.k], build_s


def ivfpq_settings(faiss: Any, items: np.ndarray,
                   args: argparse.Namespace) -> tuple[list[Setting], float]:
  """faiss IVF-PQ (inner product), raw and re-ranked, swept over nprobe; and build seconds."""
  n, d = items.shape
  nlist = args.ivf_nlist or round(4 * math.sqrt(n))
  start = time.perf_counter()
  quantizer = faiss.IndexFlatIP(d)
  ivfpq = faiss.IndexIVFPQ(quantizer, d, nlist, args.ivf_m, args.ivf_nbits,
                           faiss.METRIC_INNER_PRODUCT)
  rng = np.random.default_rng(args.seed + 2)
  sample = np.sort(rng.choice(n, size=min(n, _IVF_TRAIN_SAMPLE), replace=False))
  ivfpq.train(items[sample])
  # Adding through the refine index fills both the PQ codes and the exact float copy.
  refine = faiss.IndexRefineFlat(ivfpq)
  refine.add(items)
  build_s = time.perf_counter() - start
  print(f"faiss IVF-PQ build {build_s:.1f} s: nlist={nlist} m={args.ivf_m} "
        f"nbits={args.ivf_nbits}, trained on {sample.size:,} items (+ exact float copy for "
        f"re-ranking)", flush=True)
  settings = []
  for reorder in _ints(args.ivf_reorder):
    for nprobe in _ints(args.nprobe):
      if nprobe > nlist:
        continue
      if reorder:
        make = (lambda p=nprobe, f=reorder / args.k: faiss.IndexRefineSearchParameters(
            k_factor=f, base_index_params=faiss.SearchParametersIVF(nprobe=p)))
        index, name = refine, f"nprobe={nprobe} reorder={reorder}"
      else:
        make = lambda p=nprobe: faiss.SearchParametersIVF(nprobe=p)
        index, name = ivfpq, f"nprobe={nprobe} no re-rank"
      settings.append(Setting("IVF-PQ", name, _faiss_search(faiss, index, make)))
  return settings, build_s


def fastest_at(rows: list[dict], method: str, target: float, qps_key: str) -> dict | None:
  """The highest-QPS row of `method` with recall >= target, or None."""
  ok = [r for r in rows if r["method"] == method and r["recall"] >= target]
  return max(ok, key=lambda r: r[qps_key]) if ok else None


def main(argv: list[str]) -> None:
  args = _parse_args(argv)
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("faiss is not installed, so there is nothing to compare ScaNN with: skipping. "
          "Install the bench extra: pip install -e '.[bench]' (faiss-cpu==1.15.1).")
    return
  print(f"machine: {common.machine()}", flush=True)
  print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads", flush=True)
  start = time.perf_counter()
  items = common.synthetic_items(args.n, args.dim, args.clusters, args.seed)
  queries = common.near_queries(items, min(args.queries, args.n), args.seed)
  num_queries = queries.shape[0]
  print(f"synthetic N={args.n:,} d={args.dim} clusters={args.clusters}, {num_queries} queries: "
        f"{time.perf_counter() - start:.1f} s", flush=True)
  truth, _ = retrieval.ExactIndex(items).search(queries, args.k, parallel=True)

  scann, scann_build_s = scann_settings(items, args)
  hnsw, hnsw_build_s = hnsw_settings(faiss, items, args)
  ivf, ivf_build_s = ivfpq_settings(faiss, items, args)
  settings = scann + hnsw + ivf
  modes = [("all", True)] + ([] if args.no_single_thread else [("1", False)])
  fns = {(i, mode): (lambda s=s, par=par: s.search(queries, args.k, par))
         for i, s in enumerate(settings) for mode, par in modes}
  print(f"timing {len(fns)} (setting, threads) pairs, {args.rounds} rounds; {common.load()}",
        flush=True)
  times, results = common.round_robin(fns, args.rounds)

  rows = []
  for i, s in enumerate(settings):
    row = {"method": s.method, "name": s.name, "default": s.default,
           "recall": common.recall(np.asarray(results[(i, "all")]), truth)}
    for mode, _ in modes:
      row[f"qps_{mode}"] = num_queries / times[(i, mode)][0]
      row[f"qps_{mode}_median"] = num_queries / times[(i, mode)][1]
    rows.append(row)

  print()
  print(f"N={args.n:,} d={args.dim} k={args.k}, {num_queries} queries per call; QPS from the "
        f"fastest of {args.rounds} round-robin calls (median in brackets)")
  print(f"build: ScaNN {scann_build_s:.1f} s, HNSW {hnsw_build_s:.1f} s, "
        f"IVF-PQ {ivf_build_s:.1f} s")
  header = f"| method | setting | recall@{args.k} | QPS all cores |"
  if len(modes) > 1:
    header += " QPS 1 thread |"
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  for r in rows:  # in sweep order: each knob ascending
    line = (f"| {r['method']} | {r['name']}{' (default)' if r['default'] else ''} "
            f"| {r['recall']:.4f} | {r['qps_all']:,.0f} ({r['qps_all_median']:,.0f}) |")
    if len(modes) > 1:
      line += f" {r['qps_1']:,.0f} ({r['qps_1_median']:,.0f}) |"
    print(line)

  print()
  default = next(r for r in rows if r["default"])
  qps = ", ".join(f"{default[f'qps_{mode}']:,.0f} QPS ({_MODE_NAMES[mode]})" for mode, _ in modes)
  print(f"ScaNN default ({default['name']}): recall@{args.k} {default['recall']:.4f}, {qps}")
  print("Equal recall: each method's fastest setting reaching the target recall")
  summary = []
  for mode, _ in modes:
    key, suffix = f"qps_{mode}", "" if mode == "all" else "_1thread"
    print(f"threads: {_MODE_NAMES[mode]}")
    print(f"| target recall@{args.k} | ScaNN | HNSW | IVF-PQ | ScaNN/HNSW | ScaNN/IVF-PQ |")
    print("|---|---|---|---|---|---|")
    for target in _TARGETS:
      best = {m: fastest_at(rows, m, target, key) for m in ("ScaNN", "HNSW", "IVF-PQ")}
      cell = lambda r: (f"{r[key]:,.0f} QPS ({r['name']}, {r['recall']:.3f})" if r
                        else "not reached")
      ratio = {m: (best["ScaNN"][key] / best[m][key] if best["ScaNN"] and best[m]
                   else float("nan")) for m in ("HNSW", "IVF-PQ")}
      print(f"| {target:.2f} | {cell(best['ScaNN'])} | {cell(best['HNSW'])} "
            f"| {cell(best['IVF-PQ'])} | {ratio['HNSW']:.2f} | {ratio['IVF-PQ']:.2f} |")
      summary.append(f"scann_over_hnsw_qps@recall{target:.2f}{suffix}={ratio['HNSW']:.3f}")
      summary.append(f"scann_over_ivfpq_qps@recall{target:.2f}{suffix}={ratio['IVF-PQ']:.3f}")
    print()
  print(f"machine at the end: {common.load()}")
  print("\n".join(summary))


if __name__ == "__main__":
  main(sys.argv[1:])
