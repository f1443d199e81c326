"""Tests for modit_jax.byo and the convert_catalog binary: round trips and one refusal per fault."""

import os
import subprocess
import sys

import numpy as np
import pytest

from modit_jax import byo
from modit_jax import catalog as catalog_lib
from modit_jax import errors

P, PER, D = 12, 30, 8            # 12 patterns x 30 items, d = 8
N = P * PER
DOMAINS = ("quality", "safety")
OPTIONS = byo.Options(attributes=DOMAINS, seed_size=3, queries_per_cell=5)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_columns(seed: int = 0) -> dict[str, np.ndarray]:
  """A small item table: string ids, unit embeddings, string patterns, labels with nulls."""
  rng = np.random.default_rng(seed)
  pattern = np.repeat(np.arange(P), PER)
  emb = rng.normal(size=(P, D))[pattern] + 0.3 * rng.normal(size=(N, D))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  columns = {"item_id": np.asarray([f"sku-{i}" for i in rng.permutation(N)]),
             "embedding": emb.astype(np.float32),
             "pattern": np.asarray([f"style-{p}" for p in pattern])}
  for m, name in enumerate(DOMAINS):
    label = (emb[:, m] > np.quantile(emb[:, m], 0.7)).astype(np.float64)
    label[rng.random(N) < 0.2] = np.nan  # unobserved
    columns[name] = label
  return columns


def write_npz(path, columns) -> str:
  np.savez(path, **columns)
  return os.fspath(path)


def write_parquet(path, columns) -> str:
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  arrays = {}
  for name, values in columns.items():
    if values.ndim == 2:
      arrays[name] = pa.array(list(values), pa.list_(pa.float32()))
    elif values.dtype.kind == "f":  # labels: booleans with nulls, as Parquet stores them
      arrays[name] = pa.array([None if np.isnan(v) else bool(v) for v in values], pa.bool_())
    else:
      arrays[name] = pa.array(values.tolist())
  pq.write_table(pa.table(arrays), os.fspath(path))
  return os.fspath(path)


def convert(tmp_path, columns=None, options=OPTIONS, sequences=None, name="out"):
  items = write_npz(tmp_path / "items.npz", make_columns() if columns is None else columns)
  return byo.convert(items, tmp_path / name, options, sequences=sequences).catalog


def test_npz_round_trip_keeps_rows_labels_and_ids(tmp_path):
  columns = make_columns()
  catalog = convert(tmp_path, columns)
  loaded = catalog_lib.load_catalog(tmp_path / "out")  # the loader's validation, again
  np.testing.assert_array_equal(loaded.embeddings, columns["embedding"])
  for m, name in enumerate(DOMAINS):
    label = columns[name]
    np.testing.assert_array_equal(loaded.attributes[:, m], label == 1)
    train = loaded.item_split == 0
    np.testing.assert_array_equal(loaded.observed[:, m], ~np.isnan(label) & train)
  assert loaded.domains == list(DOMAINS)
  # Row i is input row i; item_ids.npy maps back, pattern_ids.npy names the pattern labels.
  ids = np.load(tmp_path / "out" / byo.ITEM_IDS_FILE)
  np.testing.assert_array_equal(ids, columns["item_id"])
  labels = np.load(tmp_path / "out" / byo.PATTERN_IDS_FILE)
  np.testing.assert_array_equal(labels[loaded.patterns], columns["pattern"])
  assert catalog.manifest["patterns"]["source"] == "column"
  assert catalog.manifest["split"]["source"] == "seeded"


def test_seeded_split_and_queries_follow_the_protocols(tmp_path):
  catalog = convert(tmp_path)
  split, patterns = np.asarray(catalog.item_split), np.asarray(catalog.patterns)
  held = np.unique(patterns[split == 2])
  assert len(held) == round(P * OPTIONS.pattern_holdout_fraction)
  assert not np.isin(patterns[split != 2], held).any()  # whole patterns held out
  for p in set(range(P)) - set(held.tolist()):
    assert (split[patterns == p] == 1).sum() == round(PER * OPTIONS.item_holdout_fraction)
  for name, queries in catalog.queries.items():
    assert len(queries) == OPTIONS.queries_per_cell * len(DOMAINS)
    seed_patterns = patterns[queries.seeds]
    assert (seed_patterns == queries.pattern[:, None]).all()  # one pattern per seed set
    assert (split[queries.seeds] == catalog_lib.SPLIT_CODES[name]).all()
    # Seeds are not positive for the query's domain; the pattern has a positive.
    assert not catalog.attributes[queries.seeds, queries.domain[:, None]].any()
    for p, m in zip(queries.pattern, queries.domain):
      assert catalog.attributes[patterns == p, m].any()


def test_conversion_is_deterministic(tmp_path):
  convert(tmp_path, name="a")
  convert(tmp_path, name="b")
  for name in sorted(os.listdir(tmp_path / "a")):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_parquet_gives_the_same_catalog_as_npz(tmp_path):
  columns = make_columns()
  items = write_parquet(tmp_path / "items.parquet", columns)
  from_parquet = byo.convert(items, tmp_path / "pq", OPTIONS).catalog
  from_npz = convert(tmp_path, columns)
  for field in ("embeddings", "patterns", "attributes", "observed", "item_split"):
    np.testing.assert_array_equal(getattr(from_parquet, field), getattr(from_npz, field))
  for split in catalog_lib.SPLITS:
    np.testing.assert_array_equal(from_parquet.queries[split].seeds,
                                  from_npz.queries[split].seeds)


def test_sequences_map_ids_and_drop_held_out_items(tmp_path):
  columns = make_columns()
  ids = columns["item_id"]
  seq = np.full((4, 5), "", dtype=ids.dtype)
  picks = [[0, 1, 2], [3, 4, 5, 6, 7], [8], [9, 10]]
  for r, rows in enumerate(picks):
    seq[r, :len(rows)] = ids[rows]
  seq_path = write_npz(tmp_path / "seq.npz", {"sequence": seq})
  catalog = convert(tmp_path, columns, sequences=seq_path)
  train = np.asarray(catalog.item_split) == 0
  expected = [[i for i in rows if train[i]] for rows in picks]
  expected = [rows for rows in expected if rows]
  got = [[int(i) for i in row if i >= 0] for row in catalog.sequences]
  assert got == expected
  dropped = catalog.manifest["sequences"]["dropped"]
  assert dropped["held_out_items"] == sum(len(r) for r in picks) - sum(len(r) for r in expected)


def test_arrays_in_memory_convert_as_the_files_do(tmp_path):
  columns = make_columns()
  ids = columns["item_id"]
  seq = np.stack([ids[:4], ids[4:8]])
  from_files = convert(tmp_path, columns,
                       sequences=write_npz(tmp_path / "seq.npz", {"sequence": seq}))
  rest = {k: v for k, v in columns.items() if k not in ("item_id", "embedding")}
  from_arrays = byo.convert_arrays(ids, columns["embedding"], rest, tmp_path / "arrays",
                                   OPTIONS, seq).catalog
  for field in ("embeddings", "patterns", "attributes", "observed", "item_split", "sequences"):
    np.testing.assert_array_equal(getattr(from_arrays, field), getattr(from_files, field))
  alone = byo.convert_arrays(ids, columns["embedding"], rest, tmp_path / "alone", OPTIONS)
  assert len(alone.catalog.sequences) == 0


def test_parquet_sequences_with_int_ids(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  columns = make_columns()
  columns["item_id"] = np.arange(N) * 10  # int ids
  pq.write_table(pa.table({"sequence": [[0, 10, 20], [30]]}), tmp_path / "seq.parquet")
  catalog = convert(tmp_path, columns, sequences=tmp_path / "seq.parquet")
  train = np.asarray(catalog.item_split) == 0
  expected = [r for r in ([i for i in (0, 1, 2) if train[i]], [3] if train[3] else []) if r]
  assert [[int(i) for i in row if i >= 0] for row in catalog.sequences] == expected


def test_normalize_and_derived_patterns(tmp_path):
  columns = make_columns()
  columns["embedding"] = columns["embedding"] * 3.0
  del columns["pattern"]
  # A third of the clusters held out, so that held-out clusters with positives exist.
  options = byo.Options(attributes=DOMAINS, seed_size=3, queries_per_cell=5, normalize=True,
                        cluster_patterns=P, pattern_holdout_fraction=0.34)
  catalog = convert(tmp_path, columns, options)
  np.testing.assert_allclose(np.linalg.norm(catalog.embeddings, axis=1), 1.0, atol=1e-6)
  assert catalog.manifest["patterns"]["source"] == "derived"
  assert catalog.manifest["patterns"]["k"] == P
  assert not os.path.exists(tmp_path / "out" / byo.PATTERN_IDS_FILE)


def _edit(**changes):
  columns = make_columns()
  for name, value in changes.items():
    if value is None:
      del columns[name]
    else:
      columns[name] = value
  return columns


def _duplicate_ids():
  ids = make_columns()["item_id"].copy()
  ids[7] = ids[3]
  return ids


def _half_label():
  label = make_columns()["quality"].copy()
  label[5] = 0.5
  return label


def _mixed_split():
  split = np.full(N, "train", dtype="<U16")
  split[:PER // 2] = "pattern_holdout"  # half of pattern 0's items
  split[-PER:] = "pattern_holdout"
  split[PER:2 * PER:3] = "item_holdout"
  return split


@pytest.mark.parametrize("columns, options, message", [
    (_edit(embedding=None), OPTIONS, "missing column 'embedding'"),
    (_edit(item_id=None), OPTIONS, "missing column 'item_id'"),
    (_edit(embedding=np.ones(N, np.float32)), OPTIONS, "'embedding': expected a 2-D array"),
    (_edit(item_id=_duplicate_ids()), OPTIONS, "duplicate id"),
    (_edit(), byo.Options(attributes=("quality", "colour"), seed_size=3, queries_per_cell=5),
     "missing column 'colour' (named in --attributes)"),
    (_edit(embedding=make_columns()["embedding"] * 2), OPTIONS, "pass --normalize"),
    (_edit(pattern=None), OPTIONS, "evaluation needs ground-truth patterns"),
    (_edit(quality=_half_label()), OPTIONS, "row 5 has value 0.5"),
    (_edit(split=_mixed_split()), OPTIONS, "pattern holdout holds out whole patterns"),
    (_edit(item_id=np.arange(N) * 1.0), OPTIONS, "expected integers or strings"),
    (_edit(), byo.Options(attributes=DOMAINS, seed_size=20, queries_per_cell=5),
     "no item_holdout query can be made for attribute 'quality'"),
    (_edit(), byo.Options(attributes=DOMAINS, pattern_holdout_fraction=0.99),
     "at least one pattern must stay in training"),
])
def test_refusals(tmp_path, columns, options, message):
  with pytest.raises(errors.UserError) as raised:
    convert(tmp_path, columns, options)
  assert message in str(raised.value), str(raised.value)
  assert "items.npz" in str(raised.value) or "--" in str(raised.value), str(raised.value)


def test_ragged_parquet_embedding_is_refused(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  columns = make_columns()
  rows = [list(r) for r in columns.pop("embedding")]
  rows[4] = rows[4][:-1]
  table = pa.table({**{k: v.tolist() for k, v in columns.items()}, "embedding": rows})
  pq.write_table(table, tmp_path / "items.parquet")
  with pytest.raises(errors.UserError, match=r"'embedding': row 4 has 7 values, row 0 has 8"):
    byo.convert(tmp_path / "items.parquet", tmp_path / "out", OPTIONS)


def test_unknown_sequence_item_is_refused(tmp_path):
  seq_path = write_npz(tmp_path / "seq.npz", {"sequence": np.asarray([["sku-1", "nope"]])})
  with pytest.raises(errors.UserError, match="sequence 0 holds item id 'nope'"):
    convert(tmp_path, sequences=seq_path)


def test_non_empty_output_directory_is_refused(tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "old.txt").write_text("x")
  with pytest.raises(errors.UserError, match="not an empty directory"):
    convert(tmp_path)


def _run_binary(*args):
  return subprocess.run([sys.executable, "-m", "modit_jax.cli.convert_catalog", *args],
                        capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def test_binary_converts_and_refuses_bad_input_without_traceback(tmp_path):
  columns = make_columns()
  items = write_npz(tmp_path / "items.npz", columns)
  # One session per pattern, its items in row order: local sequences.
  sessions = write_npz(tmp_path / "seq.npz", {"sequence": columns["item_id"].reshape(P, PER)})
  ok = _run_binary(f"--input={items}", f"--out={tmp_path / 'out'}", "--attributes=quality,safety",
                   "--seed_size=3", "--queries_per_cell=5", f"--sequences={sessions}")
  assert ok.returncode == 0, ok.stderr
  assert f"wrote {N} items" in ok.stdout
  # How local the sequences are is said before any training (sequence_locality).
  assert "raw sequences: locality" in ok.stdout and "warning" not in ok.stdout
  catalog_lib.load_catalog(tmp_path / "out")
  bad = _run_binary(f"--input={items}", f"--out={tmp_path / 'bad'}", "--attributes=colour")
  assert bad.returncode == 2
  assert bad.stderr.startswith("error: "), bad.stderr
  assert "'colour'" in bad.stderr and "Traceback" not in bad.stderr


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
  (tmp_path / "items.parquet").write_bytes(b"PAR1")
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
  with pytest.raises(errors.UserError, match=r"needs pyarrow; install it with pip install -e "
                                             r"'\.\[byo\]'"):
    byo.convert(tmp_path / "items.parquet", tmp_path / "out", OPTIONS)
