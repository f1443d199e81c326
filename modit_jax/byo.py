"""Bring your own catalog: converts an item table into a `modit-catalog/1` directory.

The input is one table with a row per item, as Parquet (needs pyarrow, `pip install -e
'.[byo]'`) or as a NumPy `.npz` with one array per column:

  item_id     unique int or string ids; catalog row i is input row i (`item_ids.npy` maps back)
  embedding   d floats per item (a list column in Parquet, a 2-D [N, d] array in `.npz`)
  pattern     optional int or string pattern label (the evaluation's ground truth); without
              it, `cluster_patterns=K` derives patterns by k-means, recorded as derived
  split       optional: train / item_holdout / pattern_holdout (or the codes 0 / 1 / 2);
              without it a seeded split holds out whole patterns and a share of items
  <attribute> one column per domain named in `attributes`: 1/0/true/false, null (NaN in
              `.npz` floats) = unobserved

Optional raw sequences come from a second file with one column `sequence`: a Parquet list
column (one list of item ids per row) or a `.npz` array [S, L] of item ids padded at the end
with -1 (int ids) or "" (string ids). Held-out items are dropped from them (the format allows
only train items in sequences).

Queries are sampled per (split, domain) cell: each draws `seed_size` items of one pattern and
of that split that are not positive for the domain, from a pattern that has a positive for it
(the synthetic world's seeds likewise sit in the low-attribute part of their pattern).

The result is written with `catalog.write_catalog` and loaded back with `catalog.load_catalog`,
so a converted directory has passed the loader's validation. Decisions: docs/byo_catalog.md.
"""

import dataclasses
import os
import tempfile
from typing import Any, Sequence

import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import evaluation

ITEM_ID, EMBEDDING, PATTERN, SPLIT = "item_id", "embedding", "pattern", "split"
SEQUENCE = "sequence"  # the column of the sequence file
ITEM_IDS_FILE, PATTERN_IDS_FILE = "item_ids.npy", "pattern_ids.npy"
_TRAIN = catalog_lib.SPLIT_CODES["train"]
_ITEM_HOLDOUT = catalog_lib.SPLIT_CODES["item_holdout"]
_PATTERN_HOLDOUT = catalog_lib.SPLIT_CODES["pattern_holdout"]
# Independent random streams per purpose, so e.g. changing the query count keeps the split.
_STREAM_SPLIT, _STREAM_OBSERVED, _STREAM_QUERIES = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Options:
  """How to convert; the defaults follow the synthetic world (configs/synthetic.py)."""
  attributes: Sequence[str]
  seed_size: int = 8
  queries_per_cell: int = 250             # per (split, domain), train queries included
  item_holdout_fraction: float = 0.2      # of each non-held-out pattern's items
  pattern_holdout_fraction: float = 0.15  # of the patterns
  observed_fraction: float = 1.0          # of the non-null labels of train items
  seed: int = 0
  normalize: bool = False
  cluster_patterns: int | None = None

  def check(self) -> None:
    """Refuses option values outside their range."""
    if not self.attributes:
      raise errors.UserError("--attributes must name at least one attribute column")
    names = list(self.attributes)
    for name in names:
      if not name or name in (ITEM_ID, EMBEDDING, PATTERN, SPLIT):
        raise errors.UserError(f"--attributes: {name!r} cannot be an attribute column name")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      raise errors.UserError(f"--attributes names {', '.join(repeated)} more than once")
    for flag, value in (("seed_size", self.seed_size),
                        ("queries_per_cell", self.queries_per_cell)):
      if value < 1:
        raise errors.UserError(f"--{flag} must be >= 1, got {value}")
    for flag, value in (("item_holdout_fraction", self.item_holdout_fraction),
                        ("pattern_holdout_fraction", self.pattern_holdout_fraction)):
      if not 0 < value < 1:
        raise errors.UserError(f"--{flag} must be in (0, 1), got {value}")
    if not 0 < self.observed_fraction <= 1:
      raise errors.UserError(
          f"--observed_fraction must be in (0, 1], got {self.observed_fraction}")
    if self.cluster_patterns is not None and self.cluster_patterns < 1:
      raise errors.UserError(f"--cluster_patterns must be >= 1, got {self.cluster_patterns}")


# ---------------------------------------------------------------------------------------------
# Reading tables.


@dataclasses.dataclass(frozen=True)
class Column:
  """One input column: `values` of kind int, float, bool or str (numpy 'U'), and null rows."""
  values: np.ndarray
  null: np.ndarray  # bool, same length


class Table:
  """Columns of one input file, read on demand; messages name the file and the column."""

  def __init__(self, path: str, names: Sequence[str], reader: Any):
    self.path = path
    self.names = list(names)
    self._reader = reader  # _NpzReader or _ParquetReader: scalar / matrix / ragged columns

  def has(self, name: str) -> bool:
    return name in self.names

  def require(self, name: str, why: str) -> None:
    if name not in self.names:
      raise errors.UserError(f"{self.path}: missing column {name!r} ({why}); columns: "
                             f"{', '.join(self.names) or 'none'}")

  def column(self, name: str, why: str) -> Column:
    self.require(name, why)
    return self._reader.scalar(name)

  def matrix(self, name: str, why: str) -> np.ndarray:
    """A list-valued column as a 2-D array; refuses ragged rows and nulls."""
    self.require(name, why)
    return self._reader.matrix(name)

  def ragged(self, name: str, why: str) -> tuple[np.ndarray, np.ndarray]:
    """A column of id lists as (flat ids, length of each row); refuses nulls."""
    self.require(name, why)
    ids, lengths = self._reader.ragged(name)
    if ids.dtype.kind not in "iuU":
      raise self.error(name, f"expected integer or string item ids, got {ids.dtype}")
    return ids, lengths

  def error(self, name: str, problem: str) -> errors.UserError:
    return errors.UserError(f"{self.path}: column {name!r}: {problem}")


def read_table(path: str | os.PathLike) -> Table:
  """Opens an item or sequence table: `.parquet`/`.pq` (pyarrow) or `.npz`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise errors.UserError(f"{path}: no such file")
  if path.endswith(".npz"):
    return _NpzReader(path).table()
  if path.endswith((".parquet", ".pq")):
    return _ParquetReader(path).table()
  raise errors.UserError(f"{path}: unknown table type; use a .parquet or .npz file")


class _NpzReader:
  """Columns are the archive's arrays; nulls are NaN in float arrays (npz has no nulls)."""

  def __init__(self, path: str):
    self._path = path
    try:
      with np.load(path, allow_pickle=False) as archive:
        self._arrays = {name: archive[name] for name in archive.files}
    except ValueError as e:
      # Object arrays (e.g. np.array(list_of_python_strings, dtype=object)) need pickle.
      raise errors.UserError(f"{path}: cannot read as .npz without pickle ({e}); store "
                             f"strings as a fixed-width array, e.g. np.asarray(ids, str)") from e
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise errors.UserError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e

  def table(self) -> Table:
    lengths = {name: (a.shape[0] if a.ndim else None) for name, a in self._arrays.items()}
    if len(set(lengths.values())) > 1:
      raise errors.UserError(f"{self._path}: arrays have different numbers of rows "
                             f"({', '.join(f'{k}: {v}' for k, v in lengths.items())}); every "
                             f"column needs one row per item")
    return Table(self._path, list(self._arrays), self)

  def _array(self, name: str, ndim: int, shape: str) -> np.ndarray:
    a = self._arrays[name]
    if a.ndim != ndim:
      raise errors.UserError(f"{self._path}: column {name!r}: expected a {ndim}-D array "
                             f"{shape}, got shape {a.shape}")
    return a.astype(str) if a.dtype.kind == "S" else a

  def scalar(self, name: str) -> Column:
    a = self._array(name, 1, "[rows]")
    return Column(a, np.isnan(a) if a.dtype.kind == "f" else np.zeros(len(a), bool))

  def matrix(self, name: str) -> np.ndarray:
    return self._array(name, 2, "[rows, width]")

  def ragged(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    ids = self._array(name, 2, "[rows, length], padded at the end")
    pad = "" if ids.dtype.kind == "U" else -1
    valid = ids != pad
    gap = ~valid[:, :-1] & valid[:, 1:]
    if gap.any():
      raise errors.UserError(f"{self._path}: column {name!r}: row {int(np.argwhere(gap)[0, 0])}:"
                             f" padding ({pad!r}) followed by an item id; padding must be at "
                             f"the end only")
    return ids[valid], valid.sum(axis=1)


class _ParquetReader:
  """Reads only the columns asked for; nulls (and NaN in float columns) are null rows."""

  def __init__(self, path: str):
    self._path = path
    try:
      import pyarrow  # pylint: disable=g-import-not-at-top
      import pyarrow.compute  # pylint: disable=g-import-not-at-top,unused-import
      import pyarrow.parquet  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise errors.UserError(f"{path}: reading Parquet needs pyarrow; install it with "
                             f"pip install -e '.[byo]' (or convert the table to .npz)") from e
    self._pa = pyarrow
    try:
      self._file = pyarrow.parquet.ParquetFile(path)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise errors.UserError(f"{path}: cannot read as Parquet ({type(e).__name__}: {e})") from e

  def table(self) -> Table:
    return Table(self._path, self._file.schema_arrow.names, self)

  def _read(self, name: str) -> Any:
    array = self._file.read(columns=[name]).column(name).combine_chunks()
    if self._pa.types.is_dictionary(array.type):  # pandas categoricals
      array = array.dictionary_decode()
    return array

  def _error(self, name: str, problem: str) -> errors.UserError:
    return errors.UserError(f"{self._path}: column {name!r}: {problem}")

  def _numpy(self, name: str, array: Any) -> Column:
    """A flat arrow array as values and nulls (NaN counts as null in float columns)."""
    pa, pc = self._pa, self._pa.compute
    kind = array.type
    if pa.types.is_floating(kind):
      return Column(pc.fill_null(array, 0.0).to_numpy(zero_copy_only=False),
                    pc.is_null(array, nan_is_null=True).to_numpy(zero_copy_only=False))
    if pa.types.is_integer(kind):
      values = pc.fill_null(array, 0).to_numpy(zero_copy_only=False)
    elif pa.types.is_boolean(kind):
      values = pc.fill_null(array, False).to_numpy(zero_copy_only=False).astype(bool)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
      values = np.asarray(pc.fill_null(array, "").to_numpy(zero_copy_only=False), str)
    else:
      raise self._error(name, f"unsupported type {kind} (expected integers, floats, booleans "
                              f"or strings)")
    return Column(values, array.is_null().to_numpy(zero_copy_only=False))

  def scalar(self, name: str) -> Column:
    return self._numpy(name, self._read(name))

  def ragged(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    pa = self._pa
    array = self._read(name)
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)
            or pa.types.is_fixed_size_list(array.type)):
      raise self._error(name, f"expected a list column, got {array.type}")
    if array.null_count:
      row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
      raise self._error(name, f"row {row} is null")
    lengths = pa.compute.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = self._numpy(name, array.flatten())
    if flat.null.any():
      row = int(np.searchsorted(np.cumsum(lengths), np.flatnonzero(flat.null)[0], side="right"))
      raise self._error(name, f"row {row} holds a null value")
    return flat.values, lengths

  def matrix(self, name: str) -> np.ndarray:
    values, lengths = self.ragged(name)
    if len(lengths) and (lengths != lengths[0]).any():
      row = int(np.flatnonzero(lengths != lengths[0])[0])
      raise self._error(name, f"row {row} has {lengths[row]} values, row 0 has {lengths[0]}; "
                              f"every row needs the same width")
    return values.reshape(len(lengths), int(lengths[0]) if len(lengths) else 0)


# ---------------------------------------------------------------------------------------------
# Column semantics.


def _ids(table: Table, column: Column, name: str) -> np.ndarray:
  """An id column: ints or strings, no nulls."""
  if column.values.dtype.kind not in "iuU":
    raise table.error(name, f"expected integers or strings, got {column.values.dtype} (an "
                            f"integer column with missing values is stored as floats)")
  if column.null.any():
    raise table.error(name, f"row {int(np.flatnonzero(column.null)[0])} is null")
  return column.values


def _check_unique(table: Table, ids: np.ndarray) -> None:
  order = np.argsort(ids, kind="stable")
  same = ids[order[1:]] == ids[order[:-1]]
  if same.any():
    i = int(np.flatnonzero(same)[0])
    raise table.error(ITEM_ID, f"duplicate id {ids[order[i]].item()!r} (rows {int(order[i])} "
                               f"and {int(order[i + 1])}); item ids must be unique")


def _labels(table: Table, name: str) -> tuple[np.ndarray, np.ndarray]:
  """An attribute column as (positive, labelled); null = not labelled."""
  column = table.column(name, "named in --attributes")
  values, null = column.values, column.null
  if values.dtype.kind == "b":
    return values & ~null, ~null
  if values.dtype.kind not in "iuf":
    raise table.error(name, f"expected 1/0, true/false or null labels, got {values.dtype}")
  bad = ~null & (values != 0) & (values != 1)
  if bad.any():
    row = int(np.flatnonzero(bad)[0])
    raise table.error(name, f"row {row} has value {values[row].item()!r}; labels must be 1/0, "
                            f"true/false or null (threshold scores before converting)")
  return (values == 1) & ~null, ~null


def _embeddings(table: Table, normalize: bool) -> np.ndarray:
  x = table.matrix(EMBEDDING, "d floats per item")
  if x.dtype.kind != "f":
    raise table.error(EMBEDDING, f"expected floats, got {x.dtype}")
  if x.shape[1] < 1:
    raise table.error(EMBEDDING, "rows are empty (width 0)")
  x = np.asarray(x, np.float32)
  if normalize:
    norms = np.linalg.norm(x, axis=1)
    # Checked here because dividing would turn these rows into NaN and hide the cause.
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
      row = int(np.flatnonzero(bad)[0])
      raise table.error(EMBEDDING, f"row {row} has norm {float(norms[row])}; cannot "
                                   f"L2-normalise a zero or non-finite row")
    x = x / norms[:, None]
  return x


def _split_codes(table: Table) -> np.ndarray:
  column = table.column(SPLIT, "train / item_holdout / pattern_holdout")
  values = _ids(table, column, SPLIT)
  if values.dtype.kind == "U":
    codes = np.full(len(values), -1, np.int8)
    for name, code in catalog_lib.SPLIT_CODES.items():
      codes[values == name] = code
  else:
    codes = np.where((values >= 0) & (values <= 2), values, -1).astype(np.int8)
  bad = codes < 0
  if bad.any():
    row = int(np.flatnonzero(bad)[0])
    raise table.error(SPLIT, f"row {row} has {values[row].item()!r}; expected train, "
                             f"item_holdout, pattern_holdout (or 0, 1, 2)")
  return codes


def _check_split_protocol(table: Table, codes: np.ndarray, patterns: np.ndarray,
                          pattern_labels: np.ndarray | None) -> None:
  """A given split must follow the protocols (DESIGN section 3); the loader cannot check it."""
  num_patterns = int(patterns.max()) + 1
  count = lambda code: np.bincount(patterns[codes == code], minlength=num_patterns)
  train, item_held, pattern_held = count(_TRAIN), count(_ITEM_HOLDOUT), count(_PATTERN_HOLDOUT)
  label = lambda p: repr(pattern_labels[p].item()) if pattern_labels is not None else str(p)
  mixed = (pattern_held > 0) & (train + item_held > 0)
  if mixed.any():
    p = int(np.flatnonzero(mixed)[0])
    raise table.error(SPLIT, f"pattern {label(p)} has pattern_holdout items and also train or "
                             f"item_holdout items; pattern holdout holds out whole patterns")
  orphan = (item_held > 0) & (train == 0)
  if orphan.any():
    p = int(np.flatnonzero(orphan)[0])
    raise table.error(SPLIT, f"pattern {label(p)} has item_holdout items but no train items; "
                             f"item-holdout seeds come from patterns seen in training")
  for code, name in ((_TRAIN, "train"), (_ITEM_HOLDOUT, "item_holdout"),
                     (_PATTERN_HOLDOUT, "pattern_holdout")):
    if not (codes == code).any():
      raise table.error(SPLIT, f"no {name} items; every split needs items for its queries")


def seeded_split(patterns: np.ndarray, item_fraction: float, pattern_fraction: float,
                 seed: int) -> np.ndarray:
  """Holds out whole patterns, then a share of each remaining pattern's items (int8 codes).

  `round(P * pattern_fraction)` patterns (at least 1) go to pattern holdout;
  `round(n_p * item_fraction)` of the n_p items of every other pattern go to item holdout.
  """
  rng = np.random.default_rng([seed, _STREAM_SPLIT])
  num_patterns = int(patterns.max()) + 1
  held_count = max(1, int(round(num_patterns * pattern_fraction)))
  if held_count >= num_patterns:
    raise errors.UserError(
        f"--pattern_holdout_fraction={pattern_fraction} holds out {held_count} of "
        f"{num_patterns} patterns; at least one pattern must stay in training")
  held = np.zeros(num_patterns, bool)
  held[rng.permutation(num_patterns)[:held_count]] = True
  codes = np.where(held[patterns], _PATTERN_HOLDOUT, _TRAIN).astype(np.int8)
  # Items grouped by pattern in random order; the first round(n_p * f) of each group are held.
  order = np.lexsort((rng.random(len(patterns)), patterns))
  sizes = np.bincount(patterns, minlength=num_patterns)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  rank = np.arange(len(patterns)) - starts[patterns[order]]
  take = rank < np.round(sizes * item_fraction)[patterns[order]]
  chosen = order[take & ~held[patterns[order]]]
  codes[chosen] = _ITEM_HOLDOUT
  return codes


def map_sequences(ids: np.ndarray, lengths: np.ndarray, item_ids: np.ndarray,
                  item_split: np.ndarray, path: str) -> tuple[np.ndarray, dict[str, int]]:
  """Maps sequences of input ids to catalog rows; drops non-train items and empty sequences.

  Returns:
    (int32 [S, L] rows padded with -1 at the end, counts of what was dropped).
  """
  if (ids.dtype.kind == "U") != (item_ids.dtype.kind == "U"):
    raise errors.UserError(f"{path}: sequence item ids are {ids.dtype} but item_id is "
                           f"{item_ids.dtype}; they must be the same kind of id")
  rows = _rows_of(item_ids, ids)
  unknown = rows < 0
  if unknown.any():
    at = int(np.flatnonzero(unknown)[0])
    sequence = int(np.searchsorted(np.cumsum(lengths), at, side="right"))
    raise errors.UserError(f"{path}: sequence {sequence} holds item id {ids[at].item()!r}, "
                           f"which is not an item_id of the item table")
  which = np.repeat(np.arange(len(lengths)), lengths)
  keep = item_split[rows] == _TRAIN
  rows, which = rows[keep], which[keep]
  new_lengths = np.bincount(which, minlength=len(lengths))
  nonempty = new_lengths > 0
  width = max(1, int(new_lengths.max())) if len(new_lengths) else 1
  out = np.full((int(nonempty.sum()), width), -1, np.int32)
  # Position of each kept item inside its (compacted) sequence.
  starts = np.concatenate([[0], np.cumsum(new_lengths)[:-1]])
  position = np.arange(len(rows)) - starts[which]
  out[(np.cumsum(nonempty) - 1)[which], position] = rows
  dropped = {"held_out_items": int((~keep).sum()),
             "empty_sequences": int((~nonempty).sum())}
  return out, dropped


def group_sequences(item_ids: np.ndarray, groups: np.ndarray, order: np.ndarray,
                    length: int) -> np.ndarray:
  """Raw sequences from groups: each group's item ids in ascending `order`, in rows of `length`.

  Groups come in sorted order; a group longer than `length` gives several consecutive rows;
  rows are "" padded, and a row of a single item is dropped (a sequence needs a next item).
  For real co-occurrence a catalog has as groups (a book, a card set, a region).
  """
  rows = []
  ordered = np.lexsort((order, groups))
  group = groups[ordered]
  starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if len(group) else []
  for start, end in zip(starts, list(starts[1:]) + [len(ordered)]):
    ids = item_ids[ordered[start:end]]
    for first in range(0, len(ids), length):
      chunk = list(ids[first:first + length])
      if len(chunk) >= 2:
        rows.append(chunk + [""] * (length - len(chunk)))
  width = max((len(str(i)) for i in item_ids), default=1)
  return np.array(rows, dtype=f"<U{width}").reshape(-1, length)


def _rows_of(item_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Catalog row of each id in `ids`, -1 where it is not an item id."""
  order = np.argsort(item_ids, kind="stable")
  ordered = item_ids[order]
  pos = np.minimum(np.searchsorted(ordered, ids), len(ordered) - 1)
  found = ordered[pos] == ids
  return np.where(found, order[pos], -1)


def sample_queries(patterns: np.ndarray, attributes: np.ndarray, item_split: np.ndarray,
                   split: str, *, domains: Sequence[str], seed_size: int, per_domain: int,
                   seed: int) -> catalog_lib.Queries:
  """Samples `per_domain` queries per domain for one split.

  A query for domain m: a pattern with at least one positive for m (anywhere in the catalog)
  and at least `seed_size` items of this split that are not positive for m; its seeds are
  `seed_size` distinct such items. Patterns are drawn without replacement while there are
  enough, then with replacement.

  Raises:
    errors.UserError: no pattern can serve a domain in this split.
  """
  code = catalog_lib.SPLIT_CODES[split]
  num_patterns = int(patterns.max()) + 1
  seeds, pattern, domain = [], [], []
  for m, name in enumerate(domains):
    rng = np.random.default_rng([seed, _STREAM_QUERIES, code, m])
    candidates = np.flatnonzero((item_split == code) & ~attributes[:, m])
    available = np.bincount(patterns[candidates], minlength=num_patterns)
    has_positive = np.bincount(patterns[attributes[:, m]], minlength=num_patterns) > 0
    eligible = np.flatnonzero((available >= seed_size) & has_positive)
    if not len(eligible):
      in_split = np.bincount(patterns[item_split == code], minlength=num_patterns) > 0
      raise errors.UserError(
          f"no {split} query can be made for attribute {name!r}: of the {int(in_split.sum())} "
          f"patterns with {split} items, {int((in_split & has_positive).sum())} have a positive "
          f"item for it and {int((available >= seed_size).sum())} have {seed_size} {split} "
          f"items that are not positive (the seeds), but none has both; lower --seed_size, "
          f"change the holdout fractions, or check the labels")
    chosen = rng.choice(eligible, size=per_domain, replace=per_domain > len(eligible))
    # Candidates grouped by pattern, so a pattern's seed pool is one slice.
    grouped = candidates[np.argsort(patterns[candidates], kind="stable")]
    starts = np.concatenate([[0], np.cumsum(available)[:-1]])
    for p in chosen:
      pool = grouped[starts[p]:starts[p] + available[p]]
      seeds.append(rng.choice(pool, size=seed_size, replace=False))
    pattern += chosen.tolist()
    domain += [m] * per_domain
  return catalog_lib.Queries(seeds=np.asarray(seeds, np.int32),
                             pattern=np.asarray(pattern, np.int32),
                             domain=np.asarray(domain, np.int32))


# ---------------------------------------------------------------------------------------------
# Conversion.


@dataclasses.dataclass(frozen=True)
class Result:
  """The converted catalog (as loaded back from disk) and what the conversion did."""
  catalog: catalog_lib.Catalog
  notes: list[str]


def convert(items: str | os.PathLike, out: str | os.PathLike, options: Options,
            sequences: str | os.PathLike | None = None) -> Result:
  """Converts an item table (and optional sequences) into a catalog directory at `out`.

  Raises:
    errors.UserError: bad input (message names the file and column) or a result the
      catalog loader refuses (message names the output file, e.g. non-unit embeddings).
  """
  options.check()
  items, out = os.fspath(items), os.fspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise errors.UserError(f"{out}: exists and is not an empty directory; write the catalog "
                           f"to a new directory")
  table = read_table(items)
  notes = []
  for name in options.attributes:
    table.require(name, "named in --attributes")
  item_ids = _ids(table, table.column(ITEM_ID, "unique int or string ids"), ITEM_ID)
  if not len(item_ids):
    raise errors.UserError(f"{items}: the table has no rows")
  _check_unique(table, item_ids)
  embeddings = _embeddings(table, options.normalize)

  pattern_labels = None
  if table.has(PATTERN):
    if options.cluster_patterns is not None:
      raise errors.UserError(f"{items}: has a {PATTERN!r} column and --cluster_patterns is "
                             f"set; use the column (ground truth) or drop it, not both")
    raw = _ids(table, table.column(PATTERN, "pattern label"), PATTERN)
    pattern_labels, patterns = np.unique(raw, return_inverse=True)
    patterns = patterns.astype(np.int32)
    pattern_source = {"source": "column", "column": PATTERN, "labels": PATTERN_IDS_FILE}
  elif options.cluster_patterns is not None:
    from modit_jax import clusters  # pylint: disable=g-import-not-at-top  (imports jax)
    _, patterns = clusters.kmeans(embeddings, options.cluster_patterns, seed=options.seed)
    patterns = np.unique(patterns, return_inverse=True)[1].astype(np.int32)  # no empty ids
    pattern_source = {"source": "derived", "method": "kmeans over all item embeddings",
                      "k": options.cluster_patterns, "seed": options.seed}
    notes.append(f"patterns are DERIVED by k-means (k={options.cluster_patterns}), not ground "
                 f"truth; Purity/Joint measure agreement with these clusters")
  else:
    raise errors.UserError(
        f"{items}: missing column {PATTERN!r}; evaluation needs ground-truth patterns. Add "
        f"the column, or pass --cluster_patterns=K to derive K patterns by k-means over the "
        f"embeddings (recorded as derived in the manifest)")

  labels = [_labels(table, name) for name in options.attributes]
  attributes = np.stack([positive for positive, _ in labels], axis=1)
  labelled = np.stack([known for _, known in labels], axis=1)

  if table.has(SPLIT):
    item_split = _split_codes(table)
    _check_split_protocol(table, item_split, patterns, pattern_labels)
    split_source = {"source": "column", "column": SPLIT}
  else:
    item_split = seeded_split(patterns, options.item_holdout_fraction,
                              options.pattern_holdout_fraction, options.seed)
    split_source = {"source": "seeded", "seed": options.seed,
                    "item_holdout_fraction": options.item_holdout_fraction,
                    "pattern_holdout_fraction": options.pattern_holdout_fraction}

  rng = np.random.default_rng([options.seed, _STREAM_OBSERVED])
  kept = (rng.random(labelled.shape) < options.observed_fraction
          if options.observed_fraction < 1 else np.ones(labelled.shape, bool))
  observed = labelled & kept & (item_split == _TRAIN)[:, None]

  if sequences is not None:
    seq_ids, lengths = read_table(sequences).ragged(SEQUENCE, "one list of item ids per row")
    seq, dropped = map_sequences(seq_ids, lengths, item_ids, item_split, os.fspath(sequences))
    sequence_info = {"source": os.fspath(sequences), "dropped": dropped}
    if dropped["held_out_items"]:
      notes.append(f"sequences: removed {dropped['held_out_items']} occurrences of held-out "
                   f"items and dropped {dropped['empty_sequences']} sequences left empty")
  else:
    seq = np.full((0, 1), -1, np.int32)
    sequence_info = {"source": None}
    notes.append("no --sequences: sequences.npy is empty, so stage 1 trains on "
                 "nearest-neighbour walks of the train items (pretrain.sequences=auto)")

  queries = {
      split: sample_queries(patterns, attributes, item_split, split,
                            domains=options.attributes, seed_size=options.seed_size,
                            per_domain=options.queries_per_cell, seed=options.seed)
      for split in catalog_lib.SPLITS}

  manifest = {
      "format": catalog_lib.FORMAT,
      "num_items": int(len(item_ids)),
      "dim": int(embeddings.shape[1]),
      "domains": list(options.attributes),
      "seed_size": int(options.seed_size),
      "num_patterns": int(patterns.max()) + 1,
      "item_ids": ITEM_IDS_FILE,
      "patterns": pattern_source,
      "split": split_source,
      "sequences": sequence_info,
      "generator": {"name": "modit_jax.cli.convert_catalog", "input": items,
                    "options": {**dataclasses.asdict(options),
                                "attributes": list(options.attributes)}},
  }
  catalog = catalog_lib.Catalog(
      manifest=manifest, embeddings=embeddings, patterns=patterns, attributes=attributes,
      observed=observed, item_split=item_split, sequences=seq, queries=queries)
  try:
    catalog_lib.write_catalog(out, catalog)
  except errors.CatalogError as e:
    hint = "catalog row i is input row i"
    if str(e).startswith(os.path.join(out, "embeddings.npy")) and not options.normalize:
      hint += "; pass --normalize to L2-normalise the embedding rows"
    raise errors.UserError(f"{items}: the converted table breaks {catalog_lib.FORMAT}: {e} "
                           f"({hint})") from e
  np.save(os.path.join(out, ITEM_IDS_FILE), item_ids, allow_pickle=False)
  if pattern_labels is not None:
    np.save(os.path.join(out, PATTERN_IDS_FILE), pattern_labels, allow_pickle=False)
  # The loader's validation of what is on disk: a converted directory is known to load.
  return Result(catalog_lib.load_catalog(out, mmap=True), notes)


def convert_arrays(item_ids: np.ndarray, embeddings: np.ndarray, columns: dict[str, np.ndarray],
                   out: str | os.PathLike, options: Options,
                   sequences: np.ndarray | None = None) -> Result:
  """`convert` from arrays in memory: ids [N], embeddings [N, d] and the table's other columns
  [N] by name (a label column per attribute; `pattern`, `split` where given).

  `sequences` are rows of item ids ("" or -1 padded), as the sequences file holds them.
  """
  with tempfile.TemporaryDirectory() as tmp:
    items = os.path.join(tmp, "items.npz")
    np.savez(items, **{ITEM_ID: item_ids, EMBEDDING: embeddings}, **columns)
    sequences_file = None
    if sequences is not None:
      sequences_file = os.path.join(tmp, "sequences.npz")
      np.savez(sequences_file, **{SEQUENCE: sequences})
    return convert(items, out, options, sequences_file)


def sanity_table(catalog: catalog_lib.Catalog) -> str:
  """A converted catalog's sizes, label rates and the naive answers per cell, as markdown.

  Run after `convert` (the real-catalog builders print it): a cell whose seed average is
  already near its Bound@20, or whose labels are nearly all positive, tells little.
  """
  split = catalog.item_split
  source = (catalog.manifest.get("patterns") or {}).get("source", "given")
  lines = [f"items {catalog.num_items} (train {int((split == 0).sum())}, item holdout "
           f"{int((split == 1).sum())}, pattern holdout {int((split == 2).sum())}), d "
           f"{catalog.dim}, {int(catalog.patterns.max()) + 1} patterns ({source}), "
           f"{len(catalog.sequences)} sequences, seed size {catalog.seed_size}", ""]
  config = evaluation.default_config()
  config.methods = "seed_centroid,global_attribute,centroid_global_shift"
  config.index_kind = config.oracle_index_kind = "exact"
  config.num_resamples = 200
  result = evaluation.evaluate(catalog, config)
  by = {(r["method"], r["split"], r["domain"]): r for r in result.records}
  lines += ["| cell | positive rate | observed (train) | mean Bound@20 | seed centroid Purity / "
            "Joint @20 | global attribute Purity / Attr @20 | global shift Joint@20 |",
            "|---|---|---|---|---|---|---|"]
  for split_name in evaluation.EVAL_SPLITS:
    for m, domain in enumerate(catalog.domains):
      sc = by[("seed_centroid", split_name, domain)]
      ga = by[("global_attribute", split_name, domain)]
      gs = by[("centroid_global_shift", split_name, domain)]
      lines.append(
          f"| {split_name} / {domain} | {catalog.attributes[:, m].mean():.2f} | "
          f"{int(catalog.observed[:, m].sum())} | {sc['bound@20']:.2f} | "
          f"{sc['purity@20']:.2f} / {sc['joint@20']:.3f} | {ga['purity@20']:.2f} / "
          f"{ga['attr@20']:.2f} | {gs['joint@20']:.3f} |")
  return "\n".join(lines) + "\n"
