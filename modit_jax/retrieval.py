"""Maximum-dot-product search over the catalog: ScaNN, and an exact fallback to measure it.

This is the only module that imports `scann`. Everything else sees the small `Index`
interface: `search(queries, k, exclude)` returns the ids and scores of the k best items per
query, best first, with the excluded ids (the seeds) removed.

- `ExactIndex`: brute-force dot products in numpy; the ground truth for ScaNN's recall.
- `ScannIndex`: ScaNN tree + asymmetric hashing + exact re-ranking (see `scann_params`).

An index is saved as a directory holding `index.json` (format, kind, num_items, dim, params)
plus the backend's files; every path inside it is relative, so the directory can be moved.
"""

import abc
import concurrent.futures
import json
import math
import os
import re
import time
from typing import Any, NamedTuple

from absl import logging
from google.protobuf import text_format
import numpy as np

from modit_jax import errors
from modit_jax import memo

FORMAT = "modit-index/1"
META_FILE = "index.json"
KINDS = ("scann", "exact")

_EMBEDDINGS_FILE = "embeddings.npy"
_SCANN_ASSETS = "scann_assets.pbtxt"
# ExactIndex scores queries in blocks so its scratch memory stays under this many bytes;
# per query and item it holds a float32 score, a float32 partitioned copy and a bool mask.
_SCRATCH_BYTES = 256 << 20
_SCRATCH_PER_SCORE = 9
# Rows checked at a time when validating a (possibly memory-mapped) embedding matrix.
_CHECK_ROWS = 1 << 18
# Below this many items partitioning makes no sense (a handful of tiny leaves), so ScaNN
# scores every item exactly; that is also exact, so small test catalogs get exact answers.
_BRUTE_FORCE_BELOW = 2000
# The share of the leaves a default ScaNN query searches between the bounds below (and an
# evaluation's at every size, `evaluation.search_share`).
LEAF_SHARE = 0.06
# The fewest items (in expectation: leaves x mean leaf size) a default ScaNN query scores: what
# 6 % of the leaves are at 100k items (19 of 316), where recall@20 is 0.99 (scann_params).
_MIN_ITEMS_SEARCHED = 6000
# The most items a default ScaNN query scores: 6 % of the leaves at 1M items (60 of 1,000),
# where recall@20 is 0.997 and 5-10 leaves already give 0.987-0.993 (docs/benchmarks.md).
# Above 1M a share of the leaves grows the work per query as sqrt(N) for no recall: at 10M,
# 190 leaves (600k items) made search half of the serving time.
_MAX_ITEMS_SEARCHED = 60_000
# Queries per ScaNN work unit in parallel batched search (ScaNN's own default).
_SCANN_PARALLEL_BATCH = 256
# ScaNN's k-means starts from random centres drawn without a fixed seed (even with its
# clustering_seed set), so two builds of one catalog could return different neighbours: the
# same command gave Attr@50 0.28 in one run and 0.32 in the next. k-means++ centres with a
# fixed seed build the same index every time (checked across processes and thread counts),
# for about 2 s more per 100k items.
_SCANN_CLUSTERING_SEED = 1
# ScaNN builds of the same embeddings and parameters, kept for the process (a build is
# deterministic, above): one pipeline indexes the same train items for the online oracle of
# the offsets rule, of every HPPO run and of the evaluation, ~2 s each at 68k items. Only up
# to this many floats: a 10M-item index is gigabytes that a memo must not keep alive.
_BUILDS: memo.Memo["ScannIndex"] = memo.Memo("scann_builds", kept=2)
_MEMO_MAX_FLOATS = 1 << 26


class _Scratch(NamedTuple):
  """Reusable [B, N] buffers of one ExactIndex worker."""
  scores: np.ndarray       # float32
  partitioned: np.ndarray  # float32
  mask: np.ndarray         # bool


class Index(abc.ABC):
  """A maximum-dot-product index over `num_items` vectors of dimension `dim`."""

  kind: str
  num_items: int
  dim: int

  def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
             parallel: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Returns the k best items per query, best first.

    Args:
      queries: float [Q, dim] query embeddings.
      k: results per query, 1 <= k <= num_items.
      exclude: optional int [Q, E] item ids that must not be returned for each query (the
        seeds); -1 means "no id". Every row must leave at least k items.
      parallel: False searches batches one after another on the calling thread; True spreads
        batches over threads.

    Returns:
      ids int32 [Q, k] and scores float32 [Q, k] (dot products), best first.

    Raises:
      errors.UserError: bad queries, k or exclude.
    """
    queries = _check_queries(queries, self.dim)
    k = _check_k(k, self.num_items)
    exclude = _check_exclude(exclude, queries.shape[0], self.num_items, k)
    if queries.shape[0] == 0:
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    return self._search(queries, k, exclude, parallel)

  @abc.abstractmethod
  def _search(self, queries: np.ndarray, k: int, exclude: np.ndarray,
              parallel: bool) -> tuple[np.ndarray, np.ndarray]:
    """`search` on validated input: float32 [Q>0, dim], int32 exclude [Q, E]."""

  @property
  @abc.abstractmethod
  def params(self) -> dict[str, Any]:
    """The build parameters, as written to `index.json`."""

  def save(self, directory: str | os.PathLike) -> None:
    """Writes the index to `directory` (created if needed); `load_index` reads it back."""
    root = os.fspath(directory)
    os.makedirs(root, exist_ok=True)
    self._save_files(root)
    # The meta file goes last: a directory with index.json holds a complete index.
    meta = {"format": FORMAT, "kind": self.kind, "num_items": self.num_items,
            "dim": self.dim, "params": self.params}
    with open(os.path.join(root, META_FILE), "w") as f:
      json.dump(meta, f, indent=2)
      f.write("\n")

  @abc.abstractmethod
  def _save_files(self, root: str) -> None:
    """Writes the backend's files into the existing directory `root`."""


class ExactIndex(Index):
  """Brute-force maximum dot product in numpy: exact, O(N d) per query."""

  kind = "exact"

  def __init__(self, embeddings: np.ndarray):
    """Wraps float32 [N, d] embeddings (no copy when already float32; a memmap works)."""
    self._embeddings = _check_embeddings(embeddings)
    self.num_items, self.dim = (int(n) for n in self._embeddings.shape)

  @property
  def params(self) -> dict[str, Any]:
    return {}

  @property
  def embeddings(self) -> np.ndarray:
    return self._embeddings

  def _search(self, queries, k, exclude, parallel):
    num_queries = queries.shape[0]
    workers = min(os.cpu_count() or 1, num_queries) if parallel else 1
    # Each worker holds one block's scratch, so the budget is split between them.
    block = max(1, _SCRATCH_BYTES // (_SCRATCH_PER_SCORE * self.num_items * workers))
    starts = np.arange(0, num_queries, block)
    ids = np.empty((num_queries, k), np.int32)
    scores = np.empty((num_queries, k), np.float32)

    def run_blocks(my_starts: np.ndarray) -> None:
      # Scratch reused across blocks: fresh [B, N] arrays per block cost page faults.
      rows = min(block, num_queries)
      scratch = _Scratch(np.empty((rows, self.num_items), np.float32),
                         np.empty((rows, self.num_items), np.float32),
                         np.empty((rows, self.num_items), bool))
      for start in my_starts:
        stop = min(start + block, num_queries)
        ids[start:stop], scores[start:stop] = self._top_k(
            queries[start:stop], k, exclude[start:stop], scratch)

    workers = min(workers, starts.size)
    if workers == 1:
      run_blocks(starts)
    else:
      # numpy's matmul and partition release the GIL, so the threads run in parallel.
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(run_blocks, np.array_split(starts, workers)))
    return ids, scores

  def _top_k(self, queries: np.ndarray, k: int, exclude: np.ndarray,
             scratch: "_Scratch") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of one block of queries, best first, ties to the smaller id."""
    num_rows = queries.shape[0]
    # Negated scores, so that ascending order is best first.
    neg = scratch.scores[:num_rows]
    np.matmul(-queries, self._embeddings.T, out=neg)
    rows, cols = np.nonzero(exclude >= 0)
    neg[rows, exclude[rows, cols]] = np.inf  # validated: every row keeps >= k finite items
    # The k-th best value per row, by partitioning a copy of the values: several times
    # faster than argpartition, which also moves an int64 index per item.
    kth = scratch.partitioned[:num_rows]
    np.copyto(kth, neg)
    kth.partition(k - 1, axis=1)
    # Candidates: every item at least as good as the k-th (>= k per row, more on ties).
    mask = scratch.mask[:num_rows]
    np.less_equal(neg, kth[:, k - 1:k], out=mask)
    cand_rows, cand_ids = np.nonzero(mask)
    cand_neg = neg[cand_rows, cand_ids]
    order = np.lexsort((cand_ids, cand_neg, cand_rows))
    row_start = np.searchsorted(cand_rows[order], np.arange(num_rows))
    take = order[row_start[:, None] + np.arange(k)]
    return cand_ids[take].astype(np.int32), -cand_neg[take]

  def _save_files(self, root):
    np.save(os.path.join(root, _EMBEDDINGS_FILE), np.asarray(self._embeddings))

  @classmethod
  def load(cls, root: str, meta: dict) -> "ExactIndex":
    path = os.path.join(root, _EMBEDDINGS_FILE)
    if not os.path.isfile(path):
      raise errors.UserError(f"{root}: exact index is missing {_EMBEDDINGS_FILE}")
    embeddings = np.load(path)
    if tuple(embeddings.shape) != (meta["num_items"], meta["dim"]):
      raise errors.UserError(
          f"{path}: shape {embeddings.shape} does not match {META_FILE} "
          f"(num_items={meta['num_items']}, dim={meta['dim']})")
    return cls(embeddings)


def scann_params(num_items: int) -> dict[str, Any]:
  """ScaNN build parameters for a catalog of `num_items` unit-norm items.

  Below `_BRUTE_FORCE_BELOW` items: exact float32 brute force inside ScaNN. Otherwise the
  configuration the ScaNN authors recommend for normalised embeddings and dot product:
  - a k-means tree with ~sqrt(N) leaves (balances the cost of scoring the leaf centres
    against the cost of scoring the items in the searched leaves);
  - search ~6 % of the leaves, and never fewer than `_MIN_ITEMS_SEARCHED` items nor more
    than `_MAX_ITEMS_SEARCHED` (in expectation): with clustered data the top-50 of a query
    sits in a few neighbouring leaves, and at 6 % recall@20 is >= 0.99 in bench/retrieval.py
    at 100k and 1M items and 1.0 on the default synthetic world. Below ~100k items 6 % of the
    leaves is too few items: a query's neighbours straddle more leaves than that (recall@20
    0.65 at 10k with 12 leaves, docs/benchmarks.md). The floor keeps a small catalog's query
    as thorough as a 100k catalog's, at about its cost; the ceiling keeps a catalog above 1M
    items searching what a 1M catalog searches (19 of 3,162 leaves at 10M). Data whose
    neighbourhoods straddle many leaves still needs more: override `leaves_to_search` (at
    build, or `ScannIndex.with_search` on a built index) and check the recall
    against `ExactIndex`;
  - anisotropic (score-aware) quantisation with 2 dimensions per 16-centre block
    (threshold 0.2), the accurate end of ScaNN's speed/recall trade-off;
  - exact float32 re-ranking of the best 250 quantised candidates, so returned scores are
    true dot products and top-k ordering is exact among the candidates; 250 covers K = 50
    plus excluded seeds with room to spare. Above 1M items, 250 per started factor of
    sqrt(N / 1M) (1,000 at 10M): a denser catalog puts more near-ties among the searched
    items than the quantised scores can order. On 10M items of bench/scale.py's mixture
    recall@20 was 0.865 / 0.918 / 0.938 / 0.945 with 250 / 500 / 1,000 / 2,000 re-scored,
    for 124 / 130 / 174 / 250 µs per query (docs/benchmarks.md).

  Args:
    num_items: catalog size.

  Returns:
    A JSON-serialisable dict; `build_index(..., **overrides)` may change any key.
  """
  if num_items < _BRUTE_FORCE_BELOW:
    return {"algorithm": "brute_force"}
  return _tree_ah_params(num_items)


def _tree_ah_params(num_items: int) -> dict[str, Any]:
  """The tree + asymmetric hashing parameters of `scann_params` (see there)."""
  num_leaves = max(2, round(math.sqrt(num_items)))
  items_searched = min(max(LEAF_SHARE * num_items, _MIN_ITEMS_SEARCHED), _MAX_ITEMS_SEARCHED)
  return {
      "algorithm": "tree_ah",
      "num_leaves": num_leaves,
      # Leaves hold num_items / num_leaves items each in expectation.
      "leaves_to_search": min(num_leaves, max(1, math.ceil(
          round(items_searched * num_leaves / num_items, 6)))),
      # k-means on a sample: beyond ~250k points the leaf centres barely move.
      "training_sample_size": min(num_items, 250_000),
      "dims_per_block": 2,
      "anisotropic_quantization_threshold": 0.2,
      "reorder": 250 * max(1, math.ceil(round(math.sqrt(num_items / 1e6), 6))),
  }


class ScannIndex(Index):
  """ScaNN index; its build parameters come from `scann_params`."""

  kind = "scann"

  def __init__(self, searcher: Any, num_items: int, dim: int, params: dict[str, Any]):
    """Wraps a built or loaded `scann_ops_pybind.ScannSearcher`; use `build` or `load`."""
    self._searcher = searcher
    self.num_items = int(num_items)
    self.dim = int(dim)
    self._params = dict(params)

  @property
  def params(self) -> dict[str, Any]:
    return dict(self._params)

  @classmethod
  def build(cls, embeddings: np.ndarray, params: dict[str, Any]) -> "ScannIndex":
    """Builds a ScaNN index over float32 [N, d] embeddings with `params` (see scann_params)."""
    import scann  # pylint: disable=g-import-not-at-top
    from scann.proto import scann_pb2  # pylint: disable=g-import-not-at-top

    embeddings = np.ascontiguousarray(_check_embeddings(embeddings))
    num_items, dim = embeddings.shape
    algorithm = params.get("algorithm")
    # num_neighbors is only the default of search calls; `_search` always passes its own.
    builder = scann.scann_ops_pybind.builder(embeddings, 10, "dot_product")
    if algorithm == "brute_force":
      builder = builder.score_brute_force()
    elif algorithm == "tree_ah":
      expected = {"algorithm", "num_leaves", "leaves_to_search", "training_sample_size",
                  "dims_per_block", "anisotropic_quantization_threshold", "reorder"}
      missing = expected - set(params)
      if missing:
        raise errors.UserError(f"ScaNN tree_ah params miss {', '.join(sorted(missing))}")
      if not 1 <= params["leaves_to_search"] <= params["num_leaves"] <= num_items:
        raise errors.UserError(
            f"ScaNN params need 1 <= leaves_to_search <= num_leaves <= num_items, got "
            f"{params['leaves_to_search']}, {params['num_leaves']}, {num_items}")
      builder = builder.tree(
          num_leaves=params["num_leaves"],
          num_leaves_to_search=params["leaves_to_search"],
          training_sample_size=params["training_sample_size"],
          random_init=False,  # k-means++: see _SCANN_CLUSTERING_SEED
      ).score_ah(
          params["dims_per_block"],
          anisotropic_quantization_threshold=params["anisotropic_quantization_threshold"],
      ).reorder(params["reorder"])
    else:
      raise errors.UserError(
          f"unknown ScaNN algorithm {algorithm!r}; expected 'tree_ah' or 'brute_force'")
    config = text_format.Parse(builder.create_config(), scann_pb2.ScannConfig())
    if config.HasField("partitioning"):
      config.partitioning.clustering_seed = _SCANN_CLUSTERING_SEED
    searcher = scann.scann_ops_pybind.create_searcher(
        embeddings, text_format.MessageToString(config), builder.training_threads)
    return cls(searcher, num_items, dim, params)

  def with_search(self, leaves_to_search: int | None = None,
                  reorder: int | None = None) -> "ScannIndex":
    """The same built index searching differently (no rebuild); None keeps a setting.

    `leaves_to_search` leaves per query, and `reorder` quantised candidates re-scored exactly:
    they trade recall for speed at serving time; measure the recall against `ExactIndex`.
    """
    if self._params["algorithm"] != "tree_ah":
      raise errors.UserError(f"a {self._params['algorithm']} ScaNN index has no search "
                             "settings: it scores every item")
    params = dict(self._params)
    if leaves_to_search is not None:
      if not 1 <= int(leaves_to_search) <= params["num_leaves"]:
        raise errors.UserError(f"leaves_to_search must be in [1, {params['num_leaves']}]; "
                               f"got {leaves_to_search!r}")
      params["leaves_to_search"] = int(leaves_to_search)
    if reorder is not None:
      if int(reorder) < 1:
        raise errors.UserError(f"reorder must be >= 1; got {reorder!r}")
      params["reorder"] = int(reorder)
    return ScannIndex(self._searcher, self.num_items, self.dim, params)

  def _search(self, queries, k, exclude, parallel):
    num_queries = queries.shape[0]
    brute_force = self._params["algorithm"] == "brute_force"
    num_leaves = 0 if brute_force else self._params["num_leaves"]
    leaves = 0 if brute_force else self._params["leaves_to_search"]
    reorder = 0 if brute_force else self._params["reorder"]
    # Each excluded id can push at most one wanted item out, so k + E candidates suffice
    # unless ScaNN returns fewer than asked (the searched leaves hold too few items).
    want = min(self.num_items, k + exclude.shape[1])
    ids = np.empty((num_queries, k), np.int32)
    scores = np.empty((num_queries, k), np.float32)
    todo = np.arange(num_queries)
    while True:
      found, found_scores = self._raw_search(queries[todo], want, max(reorder, want),
                                             leaves, parallel)
      ok, top, top_scores = _drop_excluded(found, found_scores, exclude[todo], k)
      ids[todo[ok]], scores[todo[ok]] = top[ok], top_scores[ok]
      todo = todo[~ok]
      if todo.size == 0:
        return ids, scores
      if want == self.num_items and leaves == num_leaves:
        # Every leaf searched with every item asked for is exhaustive; the exclude check in
        # `search` guarantees >= k survivors, so getting here is a bug.
        raise RuntimeError(f"ScaNN returned fewer than k={k} items after an exhaustive search")
      # Rare: widen the search for the rows that came up short, and try again.
      want = min(self.num_items, 2 * want)
      leaves = min(num_leaves, 2 * leaves)

  def _raw_search(self, queries: np.ndarray, want: int, pre_reorder: int, leaves: int,
                  parallel: bool) -> tuple[np.ndarray, np.ndarray]:
    """ScaNN's answer: ids [Q, want] and scores, NaN-scored padding where it found fewer."""
    kwargs = {"final_num_neighbors": want}
    if leaves:
      kwargs.update(pre_reorder_num_neighbors=pre_reorder, leaves_to_search=leaves)
    if parallel:
      return self._searcher.search_batched_parallel(
          queries, batch_size=_SCANN_PARALLEL_BATCH, **kwargs)
    return self._searcher.search_batched(queries, **kwargs)

  def _save_files(self, root):
    # ScaNN 1.4.2 writes absolute asset paths into scann_assets.pbtxt unless told
    # otherwise, and a moved directory then fails to load; relative_path=True writes bare
    # file names, which load_searcher resolves against the directory it is given.
    self._searcher.serialize(root, relative_path=True)
    with open(os.path.join(root, _SCANN_ASSETS)) as f:
      paths = re.findall(r'asset_path:\s*"([^"]*)"', f.read())
    if not paths or any(os.path.isabs(p) for p in paths):
      raise RuntimeError(f"ScaNN wrote no or absolute asset paths into {_SCANN_ASSETS}: "
                         f"{paths}")

  @classmethod
  def load(cls, root: str, meta: dict) -> "ScannIndex":
    import scann  # pylint: disable=g-import-not-at-top

    if not os.path.isfile(os.path.join(root, _SCANN_ASSETS)):
      raise errors.UserError(f"{root}: ScaNN index is missing {_SCANN_ASSETS}")
    try:
      # No back-compat shim: it would guess the assets and write into the directory.
      searcher = scann.scann_ops_pybind.load_searcher(
          os.path.abspath(root), assets_backcompat_shim=False)
    except (RuntimeError, ValueError) as e:
      raise errors.UserError(f"{root}: cannot load the ScaNN index: {e}") from e
    if searcher.size() != meta["num_items"]:
      raise errors.UserError(f"{root}: ScaNN holds {searcher.size()} items but {META_FILE} "
                             f"says {meta['num_items']}")
    return cls(searcher, meta["num_items"], meta["dim"], meta["params"])


def build_index(embeddings: np.ndarray, kind: str = "scann", **overrides: Any) -> Index:
  """Builds an index of `kind` ("scann" or "exact") over float32 [N, d] embeddings.

  Args:
    embeddings: float32 [N, d] item embeddings (unit rows for the scores to be cosines).
    kind: "scann" or "exact".
    **overrides: ScaNN parameters replacing those of `scann_params(N)`.

  Returns:
    The index.

  Raises:
    errors.UserError: unknown kind, unknown override, or bad embeddings.
  """
  if kind not in KINDS:
    raise errors.UserError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")
  embeddings = _check_embeddings(embeddings)
  if kind == "exact":
    if overrides:
      raise errors.UserError(f"the exact index takes no parameters, got {sorted(overrides)}")
    return ExactIndex(embeddings)
  num_items = embeddings.shape[0]
  params = scann_params(num_items)
  algorithm = overrides.get("algorithm", params["algorithm"])
  if algorithm != params["algorithm"]:
    # Switching algorithm replaces the defaults rather than mixing two parameter sets.
    if algorithm == "tree_ah":
      params = _tree_ah_params(num_items)
    elif algorithm == "brute_force":
      params = {"algorithm": "brute_force"}
    else:
      raise errors.UserError(
          f"unknown ScaNN algorithm {algorithm!r}; expected 'tree_ah' or 'brute_force'")
  unknown = sorted(set(overrides) - set(params))
  if unknown:
    raise errors.UserError(
        f"unknown ScaNN parameter{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
        f"for algorithm {algorithm!r}; known: {', '.join(sorted(params))}")
  params.update(overrides)

  def build() -> ScannIndex:
    start = time.perf_counter()
    index = ScannIndex.build(embeddings, params)
    logging.info("Built ScaNN index over %d items in %.1f s: %s", num_items,
                 time.perf_counter() - start, params)
    return index

  if embeddings.size > _MEMO_MAX_FLOATS:
    return build()
  return _BUILDS.get(memo.digest(np.asarray(embeddings, np.float32), params), build)


def searching_leaf_share(index: Index, share: float) -> Index:
  """`index` searching at least `share` of its leaves; other indexes (exact, brute force) as
  they are.

  Serving caps a query at what a 1M-item catalog searches (`scann_params`); an evaluation
  measures methods, not the index, so it searches the share the default searches up to 1M
  items at every size (the same index up to 1M; 190 instead of 19 of 3,162 leaves at 10M).
  """
  if share <= 0 or not isinstance(index, ScannIndex) or index.params["algorithm"] != "tree_ah":
    return index
  leaves, searched = index.params["num_leaves"], index.params["leaves_to_search"]
  wanted = min(leaves, max(searched, math.ceil(round(share * leaves, 6))))
  return index if wanted == searched else index.with_search(leaves_to_search=wanted)


def load_or_build_index(directory: str | os.PathLike, embeddings: np.ndarray,
                        kind: str = "scann") -> Index:
  """The index saved in `directory`; built (`kind`) from `embeddings` and saved there if none is.

  A directory without `index.json` (never saved, or a save that did not finish: the meta file is
  written last) counts as none.
  """
  if os.path.isfile(os.path.join(directory, META_FILE)):
    return load_index(directory)
  index = build_index(embeddings, kind)
  index.save(directory)
  logging.info("No index in %s: built a %s index of %d items and saved it there", directory,
               kind, len(embeddings))
  return index


def load_index(directory: str | os.PathLike) -> Index:
  """Loads an index written by `Index.save`, from wherever the directory now is."""
  root = os.fspath(directory)
  meta_path = os.path.join(root, META_FILE)
  if not os.path.isfile(meta_path):
    raise errors.UserError(f"{root}: not an index directory (no {META_FILE})")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise errors.UserError(f"{meta_path}: not valid JSON: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise errors.UserError(f"{meta_path}: expected format {FORMAT!r}, got "
                           f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
  missing = [key for key in ("kind", "num_items", "dim", "params") if key not in meta]
  if missing:
    raise errors.UserError(f"{meta_path}: missing {', '.join(missing)}")
  if meta["kind"] == "exact":
    return ExactIndex.load(root, meta)
  if meta["kind"] == "scann":
    return ScannIndex.load(root, meta)
  raise errors.UserError(f"{meta_path}: unknown index kind {meta['kind']!r}")


def _check_embeddings(embeddings: np.ndarray) -> np.ndarray:
  """Float [N>0, d>0] and finite; returned as float32 (no copy when already float32)."""
  embeddings = np.asarray(embeddings)
  if embeddings.ndim != 2 or 0 in embeddings.shape:
    raise errors.UserError(
        f"embeddings must be a non-empty 2-D [N, d] array, got shape {embeddings.shape}")
  if not np.issubdtype(embeddings.dtype, np.floating):
    raise errors.UserError(f"embeddings must be float, got dtype {embeddings.dtype}")
  embeddings = embeddings.astype(np.float32, copy=False)
  for start in range(0, embeddings.shape[0], _CHECK_ROWS):
    chunk = embeddings[start:start + _CHECK_ROWS]
    if not np.isfinite(chunk).all():
      row = start + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
      raise errors.UserError(f"embeddings row {row} is not finite")
  return embeddings


def _check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
  queries = np.asarray(queries)
  if queries.ndim != 2:
    raise errors.UserError(
        f"queries must be a 2-D [Q, {dim}] array, got shape {queries.shape}")
  if not np.issubdtype(queries.dtype, np.floating):
    raise errors.UserError(f"queries must be float, got dtype {queries.dtype}")
  if queries.shape[1] != dim:
    raise errors.UserError(
        f"queries have dimension {queries.shape[1]} but the index has dimension {dim}")
  if not np.isfinite(queries).all():
    row = int(np.flatnonzero(~np.isfinite(queries).all(axis=1))[0])
    raise errors.UserError(f"query {row} is not finite")
  return np.ascontiguousarray(queries, dtype=np.float32)


def _check_k(k: int, num_items: int) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise errors.UserError(f"k must be an integer, got {k!r}")
  if not 1 <= k <= num_items:
    raise errors.UserError(f"k must be in [1, {num_items}] (the index size), got {k}")
  return int(k)


def _check_exclude(exclude: np.ndarray | None, num_queries: int, num_items: int,
                   k: int) -> np.ndarray:
  """int32 [Q, E] of ids in [-1, N); every row must leave at least k items."""
  if exclude is None:
    return np.zeros((num_queries, 0), np.int32)
  exclude = np.asarray(exclude)
  if exclude.ndim != 2 or exclude.shape[0] != num_queries:
    raise errors.UserError(
        f"exclude must be a 2-D [Q={num_queries}, E] array, got shape {exclude.shape}")
  if exclude.size and not np.issubdtype(exclude.dtype, np.integer):
    raise errors.UserError(f"exclude must hold integer ids, got dtype {exclude.dtype}")
  exclude = exclude.astype(np.int32)
  if exclude.size == 0:
    return exclude
  bad = (exclude < -1) | (exclude >= num_items)
  if bad.any():
    row, col = (int(i[0]) for i in np.nonzero(bad))
    raise errors.UserError(f"exclude[{row}, {col}] = {exclude[row, col]} is not an item id "
                           f"in [0, {num_items}) or -1")
  # Distinct real ids per row: sort, then count the changes, ignoring -1.
  ordered = np.sort(exclude, axis=1)
  distinct = (ordered[:, :1] >= 0).sum(axis=1) + (
      (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)).sum(axis=1)
  short = np.flatnonzero(num_items - distinct < k)
  if short.size:
    row = int(short[0])
    raise errors.UserError(
        f"query {row} excludes {distinct[row]} of {num_items} items, leaving fewer than "
        f"k={k}")
  return exclude


def _drop_excluded(ids: np.ndarray, scores: np.ndarray, exclude: np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Removes padding and excluded ids from best-first rows and keeps the first k.

  Returns:
    ok bool [Q] (the row kept k items), ids int32 [Q, k], scores float32 [Q, k]; rows
    that are not ok hold garbage.
  """
  ids = np.asarray(ids).astype(np.int32)
  scores = np.asarray(scores, np.float32)
  keep = ~np.isnan(scores)  # ScaNN pads rows it cannot fill with id 0 and a NaN score
  if exclude.shape[1]:
    keep &= ~(ids[:, :, None] == exclude[:, None, :]).any(axis=2)
  # A stable sort of "not kept" moves the kept entries to the front, in their order.
  order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
  ok = keep.sum(axis=1) >= k
  return (ok, np.take_along_axis(ids, order, axis=1),
          np.take_along_axis(scores, order, axis=1))
