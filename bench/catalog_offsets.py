"""The catalog offsets a model reads: exact search against the catalog's default index.

Run from the repository root:

  python bench/catalog_offsets.py                              # N = 100k, d = 64, synthetic
  python bench/catalog_offsets.py --dataset=out/default/dataset   # a catalog's train queries
  python bench/catalog_offsets.py --sizes=20000 --rounds=3

`evidence.catalog_offsets` gives, per neighbourhood size n, the mean of the n catalog items
nearest a seed set's mean minus that mean (the default model reads n = 200 and 800, and HPPO's
`catalog_offset` candidates and the `neighbourhood_offset` baseline the same vectors). SFT
computes them for every training example and serving for every seed set, so their cost is
paid per example. The bench times, round-robin in one run, `catalog_offsets` over an
`ExactIndex` and over `evidence.offset_index` (the catalog's default index: ScaNN above 2,000
items, what training, evaluation and serving search), on batches of 256 seed sets, and prints
the ratio, the recall of the n_max-item neighbourhoods against exact search, and how far the
approximate offsets are from the exact ones (|approx - exact| / |exact|, median and 95th
percentile over seed sets, per size).

Seed sets: synthetic data (bench/common.py's Gaussian mixture) takes an item and its 7
nearest neighbours (exact); `--dataset` takes the catalog's train queries' seeds.
"""

import argparse
import time

import numpy as np

import common
from modit_jax import catalog as catalog_lib
from modit_jax import evidence
from modit_jax import retrieval

_BATCH = 256


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="100000", help="comma-separated catalog sizes N")
  parser.add_argument("--dim", type=int, default=64, help="embedding dimension (synthetic)")
  parser.add_argument("--clusters", type=int, default=3000, help="mixture components")
  parser.add_argument("--seed_sets", type=int, default=1024, help="seed sets per timed call")
  parser.add_argument("--offsets", default="200,800", help="neighbourhood sizes n")
  parser.add_argument("--rounds", type=int, default=3, help="timed calls per index")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dataset", default=None,
                      help="catalog directory: its embeddings and train queries' seeds")
  return parser.parse_args(argv)


def _seed_sets(items: np.ndarray, num: int, seed: int) -> np.ndarray:
  """int [num, 8]: a random item and its 7 nearest neighbours (exact) per seed set."""
  picks = np.random.default_rng(seed).choice(len(items), size=num, replace=False)
  near, _ = retrieval.ExactIndex(items).search(items[picks], 8)
  return near.astype(np.int64)


def _offsets_by_batch(items: np.ndarray, index: retrieval.Index, seeds: np.ndarray,
                      sizes: list[int]) -> dict[int, np.ndarray]:
  """`catalog_offsets` on batches of 256 seed sets, as SFT's data loader calls it."""
  parts = [evidence.catalog_offsets(items, index, items[seeds[s:s + _BATCH]].mean(axis=1),
                                    seeds[s:s + _BATCH], sizes)
           for s in range(0, len(seeds), _BATCH)]
  return {n: np.concatenate([p[n] for p in parts]) for n in sizes}


def bench_one(name: str, items: np.ndarray, seeds: np.ndarray, args: argparse.Namespace) -> None:
  sizes = sorted(int(n) for n in args.offsets.split(","))
  start = time.perf_counter()
  default = evidence.offset_index(items)
  build_s = time.perf_counter() - start
  indexes = {"exact": retrieval.ExactIndex(items), "default index": default}
  fns = {what: (lambda ix=ix: _offsets_by_batch(items, ix, seeds, sizes))
         for what, ix in indexes.items()}
  times, results = common.round_robin(fns, args.rounds)
  means = items[seeds].mean(axis=1)
  found = [indexes[w].search(means, sizes[-1], exclude=seeds)[0] for w in indexes]
  print(f"\n{name}: N={len(items):,}, d={items.shape[1]}, {len(seeds)} seed sets of "
        f"{seeds.shape[1]}, offsets n={sizes}; default index {default.kind} "
        f"{default.params} (build {build_s:.1f} s)")
  print("| search | seed sets/s | vs exact |")
  print("|---|---|---|")
  for what in indexes:
    fast, median = times[what]
    print(f"| {what} | {len(seeds) / fast:,.0f} ({len(seeds) / median:,.0f}) "
          f"| {times['exact'][0] / fast:.2f}x |")
  print(f"recall of the {sizes[-1]} nearest: {common.recall(found[1], found[0]):.3f}")
  for n in sizes:
    exact, approx = results["exact"][n], results["default index"][n]
    error = np.linalg.norm(approx - exact, axis=1) / np.maximum(
        np.linalg.norm(exact, axis=1), 1e-12)
    print(f"offset n={n}: |approx - exact| / |exact| median {np.median(error):.4f}, "
          f"95th percentile {np.percentile(error, 95):.4f}")


def main() -> None:
  args = _parse_args()
  print(f"machine: {common.machine()}", flush=True)
  if args.dataset:
    catalog = catalog_lib.load_catalog(args.dataset)
    seeds = np.asarray(catalog.queries["train"].seeds, np.int64)[:args.seed_sets]
    bench_one(args.dataset, np.asarray(catalog.embeddings, np.float32), seeds, args)
  else:
    for n in (int(s) for s in args.sizes.split(",")):
      items = common.synthetic_items(n, args.dim, args.clusters, args.seed)
      bench_one("synthetic", items, _seed_sets(items, args.seed_sets, args.seed), args)
  print(f"machine at the end: {common.load()}")


if __name__ == "__main__":
  main()
