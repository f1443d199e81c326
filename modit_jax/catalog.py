"""Reads, validates and writes `modit-catalog/1` dataset directories (DESIGN.md section 3).

A catalog is a directory holding `manifest.json`, one `.npy` file per item array, the raw
sequences, and one `.npz` query file per split. `load_catalog` refuses anything that does not
follow the format with a single `errors.CatalogError` naming the file and the problem; it never
repairs or casts data. Validation walks every array in row chunks, so a memory-mapped 10M-item
catalog is checked without materialising whole arrays; the in-memory mode uses the same code.
"""

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence
import zipfile

import numpy as np

from modit_jax import errors

FORMAT = "modit-catalog/1"
SPLITS = ("train", "item_holdout", "pattern_holdout")
SPLIT_CODES = {"train": 0, "item_holdout": 1, "pattern_holdout": 2}

MANIFEST = "manifest.json"
ATTRIBUTE_DIRECTIONS = "attribute_directions.npy"
_ITEM_FILES = ("embeddings.npy", "patterns.npy", "attributes.npy", "observed.npy",
               "item_split.npy", "sequences.npy")
_REQUIRED_KEYS = ("format", "num_items", "dim", "domains", "seed_size")
_QUERY_KEYS = ("seeds", "pattern", "domain")
_SPLIT_NAMES = {code: name for name, code in SPLIT_CODES.items()}
# Rows must have unit L2 norm up to this much (float32 rounding of normalised rows is ~1e-7).
_NORM_TOLERANCE = 1e-3
# Validation reads at most this many rows (and about this many bytes) at a time, so checking a
# memory-mapped catalog never holds a whole array, or a float64 copy of one, in memory.
_CHUNK_ROWS = 1 << 20
_CHUNK_BYTES = 1 << 28
# Fixed zip member timestamp: `np.savez` stamps the current time, which breaks byte equality.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def query_file(split: str) -> str:
  """The file name of a split's queries, e.g. `queries_train.npz`."""
  return f"queries_{split}.npz"


@dataclasses.dataclass(frozen=True, eq=False)
class Queries:
  """The queries of one split: query q asks for domain `domain[q]` around `seeds[q]`."""
  seeds: np.ndarray    # int32 [Q, s]
  pattern: np.ndarray  # int32 [Q]
  domain: np.ndarray   # int32 [Q]

  def __len__(self) -> int:
    return int(self.seeds.shape[0])

  def take(self, rows: np.ndarray) -> "Queries":
    """The queries at `rows` (an index array; repeats allowed), in that order."""
    return Queries(seeds=self.seeds[rows], pattern=self.pattern[rows], domain=self.domain[rows])


@dataclasses.dataclass(frozen=True, eq=False)
class Catalog:
  """A loaded (and validated) `modit-catalog/1` dataset; arrays may be read-only memmaps."""
  manifest: dict
  embeddings: np.ndarray   # float32 [N, d], unit rows
  patterns: np.ndarray     # int32 [N], evaluation-only truth
  attributes: np.ndarray   # bool [N, M], evaluation-only truth
  observed: np.ndarray     # bool [N, M], the labels training may read
  item_split: np.ndarray   # int8 [N], SPLIT_CODES values
  sequences: np.ndarray    # int32 [S, L], -1 padded at the end
  queries: dict[str, Queries]  # keyed by SPLITS
  attribute_directions: np.ndarray | None = None  # float32 [M, P, d], oracle-only truth

  @property
  def num_items(self) -> int:
    return int(self.manifest["num_items"])

  @property
  def dim(self) -> int:
    return int(self.manifest["dim"])

  @property
  def domains(self) -> list[str]:
    return list(self.manifest["domains"])

  @property
  def num_domains(self) -> int:
    return len(self.manifest["domains"])

  @property
  def seed_size(self) -> int:
    return int(self.manifest["seed_size"])

  def domain_id(self, name: str) -> int:
    """The index of domain `name` in `domains`; refuses unknown names."""
    domains = self.domains
    if name not in domains:
      raise errors.CatalogError(
          f"unknown domain {name!r}; known domains: {', '.join(domains)}")
    return domains.index(name)

  def train_items(self) -> np.ndarray:
    """Ids of the train items (split 0), ascending."""
    return np.flatnonzero(np.asarray(self.item_split) == SPLIT_CODES["train"])


def with_first_seeds(catalog: Catalog, count: int) -> Catalog:
  """`catalog` with every query (every split) asked with only its first `count` seeds.

  0 (or the seed-set size) leaves it unchanged. The seeds left out become ordinary catalog
  items, as for a user who holds only `count` of them: they may be retrieved and count as hits.
  Evaluation uses it to measure what fewer seeds cost (`evaluate --config.seed_limit`).
  """
  count = int(count)
  if count == 0 or count == catalog.seed_size:
    return catalog
  if not 0 < count < catalog.seed_size:
    raise errors.UserError(f"a seed limit must be in [1, {catalog.seed_size}] (the catalog's "
                           f"seed-set size), or 0 for all seeds; got {count}")
  queries = {split: Queries(seeds=np.ascontiguousarray(q.seeds[:, :count]), pattern=q.pattern,
                            domain=q.domain) for split, q in catalog.queries.items()}
  return dataclasses.replace(catalog, manifest={**catalog.manifest, "seed_size": count},
                             queries=queries)


# ---------------------------------------------------------------------------------------------
# Loading.


def load_catalog(path: str | os.PathLike, mmap: bool = False) -> Catalog:
  """Loads and validates the catalog directory at `path`.

  Args:
    path: the catalog directory.
    mmap: open the `.npy` arrays read-only with `mmap_mode="r"` instead of reading them.

  Returns:
    The catalog, its arrays exactly as stored (no casts).

  Raises:
    errors.CatalogError: the directory does not follow `modit-catalog/1`.
  """
  root = os.fspath(path)
  if not os.path.exists(root):
    raise errors.CatalogError(f"{root}: no such catalog directory")
  if not os.path.isdir(root):
    raise errors.CatalogError(f"{root}: not a directory (a catalog is a directory)")
  manifest_path = os.path.join(root, MANIFEST)
  if not os.path.isfile(manifest_path):
    raise errors.CatalogError(f"{root}: missing file {MANIFEST}")
  manifest = _read_manifest(manifest_path)
  _check_manifest(manifest, manifest_path)

  has_truth = _names_attribute_directions(manifest)
  required = list(_ITEM_FILES) + [query_file(s) for s in SPLITS]
  if has_truth:
    required.append(ATTRIBUTE_DIRECTIONS)
  missing = [name for name in required if not os.path.isfile(os.path.join(root, name))]
  if missing:
    raise errors.CatalogError(
        f"{root}: missing file{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
  if not has_truth and os.path.exists(os.path.join(root, ATTRIBUTE_DIRECTIONS)):
    raise errors.CatalogError(
        f"{os.path.join(root, ATTRIBUTE_DIRECTIONS)}: present, but {MANIFEST} has no "
        f"truth.attribute_directions entry (the file is there iff the manifest names it)")

  arrays = {name: _read_npy(os.path.join(root, name), mmap) for name in _ITEM_FILES}
  queries = {s: _read_queries(os.path.join(root, query_file(s))) for s in SPLITS}
  directions = (_read_npy(os.path.join(root, ATTRIBUTE_DIRECTIONS), mmap)
                if has_truth else None)
  catalog = Catalog(
      manifest=manifest,
      embeddings=arrays["embeddings.npy"],
      patterns=arrays["patterns.npy"],
      attributes=arrays["attributes.npy"],
      observed=arrays["observed.npy"],
      item_split=arrays["item_split.npy"],
      sequences=arrays["sequences.npy"],
      queries=queries,
      attribute_directions=directions)
  validate_catalog(catalog, root)
  return catalog


def _read_manifest(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.CatalogError(f"{path}: not valid JSON ({e})") from e
  except OSError as e:
    raise errors.CatalogError(f"{path}: cannot read ({e})") from e


def _read_npy(path: str, mmap: bool) -> np.ndarray:
  # Without this, np.load falls back to pickle on a non-.npy file and blames "pickled data".
  try:
    with open(path, "rb") as f:
      magic = f.read(len(np.lib.format.MAGIC_PREFIX))
  except OSError as e:
    raise errors.CatalogError(f"{path}: cannot read ({e})") from e
  if magic != np.lib.format.MAGIC_PREFIX:
    raise errors.CatalogError(f"{path}: cannot read as .npy (it does not start with the .npy "
                              f"magic string)")
  try:
    array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
  # np.load raises many exception types on corrupt or truncated input (ValueError, EOFError,
  # OSError, zipfile errors, ...); all of them mean "this file is not a readable .npy".
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise errors.CatalogError(f"{path}: cannot read as .npy ({type(e).__name__}: {e})") from e
  if not isinstance(array, np.ndarray):
    if hasattr(array, "close"):
      array.close()
    raise errors.CatalogError(f"{path}: not a .npy array file (got {type(array).__name__})")
  return array


def _read_queries(path: str) -> Queries:
  """Reads a query `.npz` fully (query files are small; `.npz` members cannot be mmapped)."""
  try:
    archive = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise errors.CatalogError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise errors.CatalogError(
        f"{path}: not a .npz archive (got {type(archive).__name__}); expected arrays "
        f"{', '.join(_QUERY_KEYS)}")
  with archive:
    missing = [k for k in _QUERY_KEYS if k not in archive.files]
    if missing:
      raise errors.CatalogError(
          f"{path}: missing array{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
          f"(has: {', '.join(sorted(archive.files)) or 'nothing'})")
    try:
      loaded = {k: archive[k] for k in _QUERY_KEYS}
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise errors.CatalogError(
          f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
  return Queries(**loaded)


# ---------------------------------------------------------------------------------------------
# Validation.


def validate_catalog(catalog: Catalog, where: str | os.PathLike) -> None:
  """Checks every rule of `modit-catalog/1`; messages name files under directory `where`.

  Raises:
    errors.CatalogError: on the first rule broken.
  """
  root = os.fspath(where)
  at = lambda name: os.path.join(root, name)
  manifest = catalog.manifest
  _check_manifest(manifest, at(MANIFEST))
  n, d = manifest["num_items"], manifest["dim"]
  domains = manifest["domains"]
  m = len(domains)

  # Dtypes and shapes first: the content checks below index with them.
  _check_array(at("embeddings.npy"), catalog.embeddings, np.float32,
               [("num_items", n), ("dim", d)])
  _check_array(at("patterns.npy"), catalog.patterns, np.int32, [("num_items", n)])
  _check_array(at("attributes.npy"), catalog.attributes, np.bool_,
               [("num_items", n), ("num_domains", m)])
  _check_array(at("observed.npy"), catalog.observed, np.bool_,
               [("num_items", n), ("num_domains", m)])
  _check_array(at("item_split.npy"), catalog.item_split, np.int8, [("num_items", n)])
  _check_array(at("sequences.npy"), catalog.sequences, np.int32,
               [("S", None), ("L", None)])
  if catalog.sequences.shape[1] < 1:
    raise _error(at("sequences.npy"), "sequences have length L = 0; need L >= 1")
  if not isinstance(catalog.queries, dict) or set(catalog.queries) != set(SPLITS):
    got = sorted(catalog.queries) if isinstance(catalog.queries, dict) else catalog.queries
    raise _error(root, f"queries must be keyed by {', '.join(SPLITS)}; got {got}")
  for split in SPLITS:
    _check_query_arrays(at(query_file(split)), catalog.queries[split], manifest["seed_size"])
  named = _names_attribute_directions(manifest)
  if named != (catalog.attribute_directions is not None):
    raise _error(at(ATTRIBUTE_DIRECTIONS),
                 f"present iff {MANIFEST} has truth.attribute_directions = "
                 f"{ATTRIBUTE_DIRECTIONS!r}; the manifest {'names' if named else 'does not name'}"
                 f" it but the catalog has {'none' if named else 'them'}")

  _check_embeddings(at("embeddings.npy"), catalog.embeddings)
  num_patterns = _check_patterns(at("patterns.npy"), catalog.patterns)
  _check_item_split(at("item_split.npy"), catalog.item_split)
  _check_observed(at("observed.npy"), catalog.observed, catalog.item_split, domains)
  _check_sequences(at("sequences.npy"), catalog.sequences, catalog.item_split)
  for split in SPLITS:
    _check_queries(at(query_file(split)), catalog.queries[split], split,
                   patterns=catalog.patterns, item_split=catalog.item_split, domains=domains)
  if catalog.attribute_directions is not None:
    _check_attribute_directions(at(ATTRIBUTE_DIRECTIONS), catalog.attribute_directions,
                                num_domains=m, num_patterns=num_patterns, dim=d)


def _error(path: str, problem: str) -> errors.CatalogError:
  return errors.CatalogError(f"{path}: {problem}")


def _is_count(value: Any) -> bool:
  # JSON `true` loads as a Python bool, which is an int; it is not a count.
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _names_attribute_directions(manifest: dict) -> bool:
  truth = manifest.get("truth")
  return isinstance(truth, dict) and "attribute_directions" in truth


def _check_manifest(manifest: Any, path: str) -> None:
  """Checks the manifest's own structure (not yet against the arrays)."""
  if not isinstance(manifest, dict):
    raise _error(path, f"expected a JSON object, got {type(manifest).__name__}")
  if "format" not in manifest:
    raise _error(path, f"missing key 'format' (expected {FORMAT!r})")
  if manifest["format"] != FORMAT:
    raise _error(path, f"unknown format {manifest['format']!r} (this version reads {FORMAT!r})")
  missing = [k for k in _REQUIRED_KEYS if k not in manifest]
  if missing:
    raise _error(path, f"missing key{'s' if len(missing) > 1 else ''} "
                       f"{', '.join(repr(k) for k in missing)} "
                       f"({FORMAT} needs {', '.join(_REQUIRED_KEYS)})")
  for key in ("num_items", "dim", "seed_size"):
    if not _is_count(manifest[key]):
      raise _error(path, f"{key} must be a positive integer, got {manifest[key]!r}")
  domains = manifest["domains"]
  if not isinstance(domains, list):
    raise _error(path, f"domains must be a list of names, got {type(domains).__name__}")
  if not domains:
    raise _error(path, "domains is empty; need at least one domain name")
  for i, name in enumerate(domains):
    if not isinstance(name, str) or not name:
      raise _error(path, f"domains[{i}] must be a non-empty string, got {name!r}")
  duplicates = sorted({name for name in domains if domains.count(name) > 1})
  if duplicates:
    raise _error(path, f"duplicate domain names: {', '.join(duplicates)}")
  if "truth" in manifest:
    truth = manifest["truth"]
    if not isinstance(truth, dict):
      raise _error(path, f"truth must be an object, got {type(truth).__name__}")
    if "attribute_directions" in truth and truth["attribute_directions"] != ATTRIBUTE_DIRECTIONS:
      raise _error(path, f"truth.attribute_directions must be {ATTRIBUTE_DIRECTIONS!r}, got "
                         f"{truth['attribute_directions']!r}")


def _check_array(path: str, array: Any, dtype: type,
                 shape: Sequence[tuple[str, int | None]], what: str = "") -> None:
  """Checks type, exact dtype and shape; `shape` lists (name, size or None for any size)."""
  prefix = f"{what}: " if what else ""
  if not isinstance(array, np.ndarray):
    raise _error(path, f"{prefix}expected a numpy array, got {type(array).__name__}")
  if array.dtype != np.dtype(dtype):
    raise _error(path, f"{prefix}expected dtype {np.dtype(dtype).name}, got {array.dtype}")
  fits = array.ndim == len(shape) and all(
      size is None or array.shape[i] == size for i, (_, size) in enumerate(shape))
  if not fits:
    expected = ", ".join(name if size is None else f"{name}={size}" for name, size in shape)
    source = f" (from {MANIFEST})" if any(size is not None for _, size in shape) else ""
    raise _error(path, f"{prefix}expected shape [{expected}]{source}, got {tuple(array.shape)}")


def _row_chunks(array: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (first row, block of rows) through `array`, one bounded block at a time."""
  row_bytes = max(1, array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)))
  step = max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // row_bytes))
  for start in range(0, array.shape[0], step):
    yield start, np.asarray(array[start:start + step])


def _first(mask: np.ndarray) -> int:
  return int(np.flatnonzero(mask)[0])


def _split_label(code: int) -> str:
  return f"{_SPLIT_NAMES.get(code, 'invalid')} ({code})"


def _check_embeddings(path: str, embeddings: np.ndarray) -> None:
  for start, block in _row_chunks(embeddings):
    finite = np.isfinite(block).all(axis=1)
    if not finite.all():
      i = _first(~finite)
      kind = "NaN" if np.isnan(block[i]).any() else "inf"
      raise _error(path, f"row {start + i} contains {kind}; embeddings must be finite")
    # float32 accumulation on purpose: a float64 copy of a 1M-row block would be 8x larger,
    # and float32 is far more precise than the 1e-3 tolerance.
    norms = np.sqrt(np.einsum("ij,ij->i", block, block))
    zero = norms == 0
    if zero.any():
      raise _error(path, f"row {start + _first(zero)} has zero norm")
    off = np.abs(norms - 1) > _NORM_TOLERANCE
    if off.any():
      i = _first(off)
      raise _error(path, f"rows must be L2-normalised (|norm - 1| <= {_NORM_TOLERANCE}); "
                         f"row {start + i} has norm {float(norms[i]):.6g}")


def _check_patterns(path: str, patterns: np.ndarray) -> int:
  """Checks pattern ids are >= 0; returns the number of patterns, max id + 1."""
  top = -1
  for start, block in _row_chunks(patterns):
    negative = block < 0
    if negative.any():
      i = _first(negative)
      raise _error(path, f"row {start + i} has pattern id {int(block[i])}; ids must be >= 0")
    if block.size:
      top = max(top, int(block.max()))
  return top + 1


def _check_item_split(path: str, item_split: np.ndarray) -> None:
  for start, block in _row_chunks(item_split):
    bad = (block < 0) | (block > 2)
    if bad.any():
      i = _first(bad)
      raise _error(path, f"row {start + i} has split {int(block[i])}; expected "
                         f"0 (train), 1 (item_holdout) or 2 (pattern_holdout)")


def _check_observed(path: str, observed: np.ndarray, item_split: np.ndarray,
                    domains: Sequence[str]) -> None:
  for start, block in _row_chunks(observed):
    split = np.asarray(item_split[start:start + len(block)])
    leak = block.any(axis=1) & (split != SPLIT_CODES["train"])
    if leak.any():
      i = _first(leak)
      domain = domains[_first(block[i])]
      raise _error(path, f"item {start + i} is observed for domain {domain!r} but has split "
                         f"{_split_label(int(split[i]))}; observed labels must be False "
                         f"outside train items (they would leak held-out labels)")


def _check_sequences(path: str, sequences: np.ndarray, item_split: np.ndarray) -> None:
  num_items = item_split.shape[0]
  for start, block in _row_chunks(sequences):
    bad = (block < -1) | (block >= num_items)
    if bad.any():
      r, c = np.argwhere(bad)[0]
      raise _error(path, f"row {start + r}: item id {int(block[r, c])} out of range "
                         f"[0, {num_items}) (only -1 may pad)")
    # An id right after a -1 means padding in the middle (or at the front) of a row.
    gap = (block[:, :-1] == -1) & (block[:, 1:] != -1)
    if gap.any():
      r = int(np.argwhere(gap)[0, 0])
      raise _error(path, f"row {start + r}: -1 padding followed by an item id; "
                         f"padding must be at the end only")
    empty = block[:, 0] == -1
    if empty.any():
      raise _error(path, f"row {start + _first(empty)} has no items (all padding)")
    valid = block >= 0
    split = np.where(valid, item_split[np.where(valid, block, 0)], SPLIT_CODES["train"])
    held = split != SPLIT_CODES["train"]
    if held.any():
      r, c = np.argwhere(held)[0]
      raise _error(path, f"row {start + r}: item {int(block[r, c])} has split "
                         f"{_split_label(int(split[r, c]))}; sequences may hold only "
                         f"train items (split 0)")


def _check_query_arrays(path: str, queries: Any, seed_size: int) -> None:
  if not isinstance(queries, Queries):
    raise _error(path, f"expected Queries, got {type(queries).__name__}")
  _check_array(path, queries.seeds, np.int32, [("Q", None), ("seed_size", seed_size)], "seeds")
  q = queries.seeds.shape[0]
  if q == 0:
    raise _error(path, "no queries (Q = 0); a query file must hold at least one query")
  _check_array(path, queries.pattern, np.int32, [("Q", q)], "pattern")
  _check_array(path, queries.domain, np.int32, [("Q", q)], "domain")


def _check_queries(path: str, queries: Queries, split: str, *, patterns: np.ndarray,
                   item_split: np.ndarray, domains: Sequence[str]) -> None:
  """Checks seed ids, domains, seed patterns and seed splits of one split's queries."""
  num_items, code = patterns.shape[0], SPLIT_CODES[split]
  for start, seeds in _row_chunks(queries.seeds):
    rows = slice(start, start + len(seeds))
    pattern = np.asarray(queries.pattern[rows])
    domain = np.asarray(queries.domain[rows])
    bad = (seeds < 0) | (seeds >= num_items)
    if bad.any():
      r, c = np.argwhere(bad)[0]
      raise _error(path, f"row {start + r}: seed id {int(seeds[r, c])} out of range "
                         f"[0, {num_items})")
    bad = (domain < 0) | (domain >= len(domains))
    if bad.any():
      r = _first(bad)
      raise _error(path, f"row {start + r}: domain index {int(domain[r])} out of range "
                         f"[0, {len(domains)}) (domains: {', '.join(domains)})")
    ordered = np.sort(seeds, axis=1)
    repeated = ordered[:, 1:] == ordered[:, :-1]
    if repeated.any():
      r, c = np.argwhere(repeated)[0]
      raise _error(path, f"row {start + r}: duplicate seed id {int(ordered[r, c])}")
    seed_patterns = patterns[seeds]
    mixed = (seed_patterns != seed_patterns[:, :1]).any(axis=1)
    if mixed.any():
      r = _first(mixed)
      raise _error(path, f"row {start + r}: seeds mix patterns (items {seeds[r].tolist()} "
                         f"have patterns {seed_patterns[r].tolist()})")
    wrong = seed_patterns[:, 0] != pattern
    if wrong.any():
      r = _first(wrong)
      raise _error(path, f"row {start + r}: seeds not in the query's pattern (seeds are in "
                         f"pattern {int(seed_patterns[r, 0])}, query says {int(pattern[r])})")
    seed_split = item_split[seeds]
    wrong = seed_split != code
    if wrong.any():
      r, c = np.argwhere(wrong)[0]
      raise _error(path, f"row {start + r}: seed item {int(seeds[r, c])} has split "
                         f"{_split_label(int(seed_split[r, c]))}; {query_file(split)} needs "
                         f"{_split_label(code)} seeds")


def _check_attribute_directions(path: str, directions: np.ndarray, *, num_domains: int,
                                num_patterns: int, dim: int) -> None:
  _check_array(path, directions, np.float32,
               [("num_domains", num_domains), ("num_patterns", num_patterns), ("dim", dim)])
  for m in range(num_domains):
    for start, block in _row_chunks(directions[m]):
      finite = np.isfinite(block).all(axis=1)
      if not finite.all():
        raise _error(path, f"direction [{m}, {start + _first(~finite)}] is not finite "
                           f"(NaN or inf)")


# ---------------------------------------------------------------------------------------------
# Writing.


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
  """Checks `manifest` and writes it as `path/manifest.json` (sorted keys, indent 2)."""
  root = os.fspath(path)
  target = os.path.join(root, MANIFEST)
  _check_manifest(manifest, target)
  os.makedirs(root, exist_ok=True)
  text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
  with open(target, "w", encoding="utf-8") as f:
    f.write(text)


def write_catalog(path: str | os.PathLike, catalog: Catalog) -> None:
  """Validates `catalog` and writes it as a `modit-catalog/1` directory at `path`.

  Equal catalogs give byte-equal files. Nothing is written when validation fails.

  Raises:
    errors.CatalogError: the catalog breaks a rule of the format (messages name the files
      it would have been written to).
  """
  root = os.fspath(path)
  validate_catalog(catalog, root)
  stale = os.path.join(root, ATTRIBUTE_DIRECTIONS)
  if catalog.attribute_directions is None and os.path.exists(stale):
    # Left there, it would make the directory unreadable (the file is present iff named).
    raise _error(stale, "exists, but the catalog being written has no attribute directions; "
                        "remove it or write to a fresh directory")
  os.makedirs(root, exist_ok=True)
  at = lambda name: os.path.join(root, name)
  _save_npy(at("embeddings.npy"), catalog.embeddings)
  _save_npy(at("patterns.npy"), catalog.patterns)
  _save_npy(at("attributes.npy"), catalog.attributes)
  _save_npy(at("observed.npy"), catalog.observed)
  _save_npy(at("item_split.npy"), catalog.item_split)
  _save_npy(at("sequences.npy"), catalog.sequences)
  for split in SPLITS:
    q = catalog.queries[split]
    save_npz(at(query_file(split)), seeds=q.seeds, pattern=q.pattern, domain=q.domain)
  if catalog.attribute_directions is not None:
    _save_npy(at(ATTRIBUTE_DIRECTIONS), catalog.attribute_directions)
  # The manifest goes last: a directory a crashed writer left behind has none and is refused.
  write_manifest(root, catalog.manifest)


def _save_npy(path: str, array: np.ndarray) -> None:
  with open(path, "wb") as f:
    # C order so that equal arrays give equal headers and bytes whatever their memory layout.
    np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
  """Like `np.savez` (uncompressed), but byte-deterministic: fixed timestamps, sorted names."""
  with zipfile.ZipFile(os.fspath(path), "w", compression=zipfile.ZIP_STORED) as archive:
    for name in sorted(arrays):
      info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE_TIME)
      info.external_attr = 0o644 << 16
      with archive.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arrays[name]), allow_pickle=False)
