"""Tests for modit_jax.catalog: round trips, determinism, and one refusal per broken rule."""

import dataclasses
import json
import os
import time

import numpy as np
import pytest

from modit_jax import catalog as catalog_lib
from modit_jax import errors

N, D, P, SEED_SIZE = 60, 8, 3, 3
DOMAINS = ["quality", "safety"]
ITEM_FILES = ("embeddings.npy", "patterns.npy", "attributes.npy", "observed.npy",
              "item_split.npy", "sequences.npy")
ALL_FILES = (("manifest.json",) + ITEM_FILES
             + tuple(f"queries_{s}.npz" for s in catalog_lib.SPLITS)
             + ("attribute_directions.npy",))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
  # Tiny chunks so that every check runs across chunk boundaries and must report global rows.
  monkeypatch.setattr(catalog_lib, "_CHUNK_ROWS", 7)


def _unit_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_catalog(with_truth: bool = True) -> catalog_lib.Catalog:
  """60 items: patterns 0, 1 (items 0-39) seen in training, pattern 2 (items 40-59) held out."""
  rng = np.random.default_rng(0)
  patterns = np.repeat(np.arange(P), N // P).astype(np.int32)
  item_split = np.zeros(N, np.int8)
  item_split[15:20] = item_split[35:40] = 1
  item_split[40:] = 2
  attributes = rng.random((N, len(DOMAINS))) < 0.3
  observed = (rng.random((N, len(DOMAINS))) < 0.5) & (item_split == 0)[:, None]
  sequences = np.full((9, 6), -1, np.int32)
  for s in range(9):
    pool = np.flatnonzero((item_split == 0) & (patterns == s % 2))
    sequences[s, :2 + s % 5] = rng.choice(pool, 2 + s % 5)
  pools = {"train": [(0, np.arange(0, 15)), (1, np.arange(20, 35))],
           "item_holdout": [(0, np.arange(15, 20)), (1, np.arange(35, 40))],
           "pattern_holdout": [(2, np.arange(40, 60))]}
  queries = {}
  for split, groups in pools.items():
    seeds, pattern, domain = [], [], []
    for p, pool in groups:
      for m in range(len(DOMAINS)):
        for _ in range(2):
          seeds.append(rng.choice(pool, SEED_SIZE, replace=False))
          pattern.append(p)
          domain.append(m)
    queries[split] = catalog_lib.Queries(
        seeds=np.asarray(seeds, np.int32), pattern=np.asarray(pattern, np.int32),
        domain=np.asarray(domain, np.int32))
  manifest = {"format": catalog_lib.FORMAT, "num_items": N, "dim": D, "domains": DOMAINS,
              "seed_size": SEED_SIZE, "generator": {"name": "test"}}
  if with_truth:
    manifest["truth"] = {"attribute_directions": "attribute_directions.npy"}
  return catalog_lib.Catalog(
      manifest=manifest, embeddings=_unit_rows(rng, (N, D)), patterns=patterns,
      attributes=attributes, observed=observed, item_split=item_split, sequences=sequences,
      queries=queries,
      attribute_directions=_unit_rows(rng, (len(DOMAINS), P, D)) if with_truth else None)


@pytest.fixture(name="catalog")
def catalog_fixture() -> catalog_lib.Catalog:
  return make_catalog()


@pytest.fixture(name="root")
def root_fixture(tmp_path, catalog) -> str:
  root = str(tmp_path / "cat")
  catalog_lib.write_catalog(root, catalog)
  return root


@pytest.fixture(name="mmap", params=[False, True], ids=["eager", "mmap"])
def mmap_fixture(request) -> bool:
  return request.param


def _assert_equal(a: catalog_lib.Catalog, b: catalog_lib.Catalog) -> None:
  assert a.manifest == b.manifest
  for field in ("embeddings", "patterns", "attributes", "observed", "item_split", "sequences",
                "attribute_directions"):
    x, y = getattr(a, field), getattr(b, field)
    if x is None or y is None:
      assert x is None and y is None, field
      continue
    assert x.dtype == y.dtype, field
    np.testing.assert_array_equal(x, y, err_msg=field)
  assert set(a.queries) == set(b.queries) == set(catalog_lib.SPLITS)
  for split in catalog_lib.SPLITS:
    for key in ("seeds", "pattern", "domain"):
      np.testing.assert_array_equal(getattr(a.queries[split], key),
                                    getattr(b.queries[split], key), err_msg=f"{split}.{key}")


# --- Round trips and determinism. ------------------------------------------------------------


def test_round_trip(root, catalog, mmap):
  loaded = catalog_lib.load_catalog(root, mmap=mmap)
  _assert_equal(loaded, catalog)
  assert isinstance(loaded.embeddings, np.memmap) == mmap
  assert (loaded.num_items, loaded.dim, loaded.num_domains, loaded.seed_size) == (
      N, D, 2, SEED_SIZE)
  assert loaded.domains == DOMAINS
  assert [len(loaded.queries[s]) for s in catalog_lib.SPLITS] == [8, 8, 4]


def test_round_trip_with_default_chunks(root, catalog, monkeypatch):
  monkeypatch.setattr(catalog_lib, "_CHUNK_ROWS", 1 << 20)
  _assert_equal(catalog_lib.load_catalog(root, mmap=True), catalog)


def test_round_trip_without_truth(tmp_path, mmap):
  catalog = make_catalog(with_truth=False)
  catalog_lib.write_catalog(tmp_path, catalog)
  assert not (tmp_path / "attribute_directions.npy").exists()
  loaded = catalog_lib.load_catalog(tmp_path, mmap=mmap)
  assert loaded.attribute_directions is None
  _assert_equal(loaded, catalog)


def test_write_is_deterministic(tmp_path, catalog, monkeypatch):
  catalog_lib.write_catalog(tmp_path / "a", catalog)
  # A later clock must not leak into the files (np.savez stamps zip members with it).
  later = time.time() + 3600
  monkeypatch.setattr(time, "time", lambda: later)
  catalog_lib.write_catalog(tmp_path / "b", make_catalog())
  names = sorted(os.listdir(tmp_path / "a"))
  assert names == sorted(ALL_FILES)
  assert sorted(os.listdir(tmp_path / "b")) == names
  for name in names:
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_manifest_is_sorted_and_indented(root):
  text = open(os.path.join(root, "manifest.json"), encoding="utf-8").read()
  manifest = json.loads(text)
  assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def test_domain_id_and_train_items(catalog):
  assert catalog.domain_id("safety") == 1
  with pytest.raises(errors.CatalogError,
                     match=r"unknown domain 'colour'; known domains: quality, safety"):
    catalog.domain_id("colour")
  expected = np.concatenate([np.arange(0, 15), np.arange(20, 35)])
  np.testing.assert_array_equal(catalog.train_items(), expected)


def test_catalog_error_is_user_error():
  assert issubclass(errors.CatalogError, errors.UserError)


# --- Helpers to break a written catalog. -----------------------------------------------------


def _expect(root, name, *fragments, mmap=False):
  """Loading must fail with one CatalogError naming `root/name` and every fragment."""
  with pytest.raises(errors.CatalogError) as info:
    catalog_lib.load_catalog(root, mmap=mmap)
  message = str(info.value)
  where = os.path.join(root, name) if name else root
  assert message.startswith(f"{where}: "), message
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  return message


def _resave(root, name, array):
  np.save(os.path.join(root, name), array)


def _resave_queries(root, split, **changes):
  path = os.path.join(root, f"queries_{split}.npz")
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  arrays.update(changes)
  np.savez(path, **arrays)


def _edit_manifest(root, edit):
  path = os.path.join(root, "manifest.json")
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  edit(manifest)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(manifest, f)


def _load(root, name):
  return np.load(os.path.join(root, name))


# --- Directory and manifest faults. ----------------------------------------------------------


@pytest.mark.parametrize("name", ALL_FILES)
def test_missing_file(root, name, mmap):
  os.remove(os.path.join(root, name))
  _expect(root, "", f"missing file {name}", mmap=mmap)


def test_missing_directory(tmp_path):
  _expect(str(tmp_path / "nope"), "", "no such catalog directory")


def test_unknown_format_version(root, mmap):
  _edit_manifest(root, lambda m: m.update(format="modit-catalog/2"))
  _expect(root, "manifest.json",
          "unknown format 'modit-catalog/2' (this version reads 'modit-catalog/1')", mmap=mmap)


def _set(key, value):
  return lambda m: m.update({key: value})


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m.pop("dim"), "missing key 'dim'"),
    (lambda m: m.pop("format"), "missing key 'format'"),
    (_set("domains", "quality"), "domains must be a list"),
    (_set("domains", ["quality", "quality"]), "duplicate domain names: quality"),
    (_set("domains", ["quality", ""]), "domains[1] must be a non-empty string"),
    (_set("domains", []), "domains is empty"),
    (_set("num_items", "60"), "num_items must be a positive integer"),
    (_set("dim", -8), "dim must be a positive integer"),
    (_set("seed_size", True), "seed_size must be a positive integer"),
    (_set("truth", {"attribute_directions": "other.npy"}),
     "truth.attribute_directions must be 'attribute_directions.npy'"),
])
def test_bad_manifest(root, edit, fragment):
  _edit_manifest(root, edit)
  _expect(root, "manifest.json", fragment)


@pytest.mark.parametrize("text, fragment", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_manifest_not_an_object(root, text, fragment):
  with open(os.path.join(root, "manifest.json"), "w", encoding="utf-8") as f:
    f.write(text)
  _expect(root, "manifest.json", fragment)


@pytest.mark.parametrize("key, value, fragment", [
    ("num_items", N + 1, "expected shape [num_items=61, dim=8] (from manifest.json), got (60, 8)"),
    ("dim", D + 1, "expected shape [num_items=60, dim=9] (from manifest.json), got (60, 8)"),
])
def test_manifest_mismatches_arrays(root, key, value, fragment, mmap):
  _edit_manifest(root, _set(key, value))
  _expect(root, "embeddings.npy", fragment, mmap=mmap)


def test_domains_mismatch_arrays(root):
  _edit_manifest(root, _set("domains", DOMAINS + ["length"]))
  _expect(root, "attributes.npy", "num_domains=3", "got (60, 2)")


def test_attribute_directions_not_named_in_manifest(root):
  _edit_manifest(root, lambda m: m.pop("truth"))
  _expect(root, "attribute_directions.npy", "present", "truth.attribute_directions")


# --- Dtype, shape and corrupt-file faults. ---------------------------------------------------


@pytest.mark.parametrize("name, dtype, expected", [
    ("embeddings.npy", np.float64, "float32"),
    ("patterns.npy", np.int64, "int32"),
    ("attributes.npy", np.uint8, "bool"),
    ("observed.npy", np.int32, "bool"),
    ("item_split.npy", np.int32, "int8"),
    ("sequences.npy", np.int64, "int32"),
    ("attribute_directions.npy", np.float16, "float32"),
])
def test_wrong_dtype(root, name, dtype, expected, mmap):
  _resave(root, name, _load(root, name).astype(dtype))
  _expect(root, name, f"expected dtype {expected}, got {np.dtype(dtype).name}", mmap=mmap)


def test_wrong_query_dtype(root, mmap):
  seeds = _load(root, "queries_train.npz")["seeds"]
  _resave_queries(root, "train", seeds=seeds.astype(np.int64))
  _expect(root, "queries_train.npz", "seeds: expected dtype int32, got int64", mmap=mmap)


@pytest.mark.parametrize("name, change, fragment", [
    ("embeddings.npy", lambda a: a.reshape(-1), "expected shape [num_items=60, dim=8]"),
    ("patterns.npy", lambda a: a[:, None], "expected shape [num_items=60]"),
    ("attributes.npy", lambda a: a[:, :1], "expected shape [num_items=60, num_domains=2]"),
    ("item_split.npy", lambda a: a[:-1], "got (59,)"),
    ("sequences.npy", lambda a: a.reshape(-1), "expected shape [S, L], got (54,)"),
    ("sequences.npy", lambda a: a[:, :0], "L = 0"),
    ("attribute_directions.npy", lambda a: a[:, :-1],
     "expected shape [num_domains=2, num_patterns=3, dim=8]"),
])
def test_wrong_shape(root, name, change, fragment, mmap):
  _resave(root, name, change(_load(root, name)))
  _expect(root, name, fragment, mmap=mmap)


@pytest.mark.parametrize("key, change, fragment", [
    ("seeds", lambda a: np.concatenate([a, a[:, :1]], axis=1),
     "seeds: expected shape [Q, seed_size=3] (from manifest.json), got (8, 4)"),
    ("pattern", lambda a: a[:-1], "pattern: expected shape [Q=8]"),
    ("domain", lambda a: a[:, None], "domain: expected shape [Q=8]"),
])
def test_wrong_query_shape(root, key, change, fragment):
  _resave_queries(root, "train", **{key: change(_load(root, "queries_train.npz")[key])})
  _expect(root, "queries_train.npz", fragment)


@pytest.mark.parametrize("name", ["embeddings.npy", "sequences.npy", "queries_train.npz"])
def test_corrupt_file(root, name, mmap):
  with open(os.path.join(root, name), "wb") as f:
    f.write(b"\x93NUMPY garbage")
  _expect(root, name, "cannot read", mmap=mmap)


def test_truncated_npy(root, mmap):
  path = os.path.join(root, "embeddings.npy")
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:-40])
  _expect(root, "embeddings.npy", "cannot read as .npy", mmap=mmap)


def test_query_file_missing_key(root):
  path = os.path.join(root, "queries_item_holdout.npz")
  with np.load(path) as z:
    np.savez(path, seeds=z["seeds"], pattern=z["pattern"])
  _expect(root, "queries_item_holdout.npz", "missing array domain")


# --- Content faults. -------------------------------------------------------------------------


@pytest.mark.parametrize("value, kind", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite_embedding(root, value, kind, mmap):
  emb = _load(root, "embeddings.npy")
  emb[45, 3] = value
  _resave(root, "embeddings.npy", emb)
  _expect(root, "embeddings.npy", f"row 45 contains {kind}", mmap=mmap)


def test_zero_norm_row(root, mmap):
  emb = _load(root, "embeddings.npy")
  emb[22] = 0
  _resave(root, "embeddings.npy", emb)
  _expect(root, "embeddings.npy", "row 22 has zero norm", mmap=mmap)


def test_non_normalised_row(root, mmap):
  emb = _load(root, "embeddings.npy")
  emb[31] *= 1.01
  emb[50] *= 1.0005  # within the 1e-3 tolerance: accepted, and row 31 comes first anyway
  _resave(root, "embeddings.npy", emb)
  _expect(root, "embeddings.npy", "rows must be L2-normalised", "row 31", mmap=mmap)


def test_normalisation_tolerance_accepts_small_error(root):
  emb = _load(root, "embeddings.npy")
  emb[50] *= 1.0005
  _resave(root, "embeddings.npy", emb)
  catalog_lib.load_catalog(root)


def test_non_finite_attribute_direction(root):
  directions = _load(root, "attribute_directions.npy")
  directions[1, 2, 0] = np.nan
  _resave(root, "attribute_directions.npy", directions)
  _expect(root, "attribute_directions.npy", "[1, 2] is not finite")


def test_negative_pattern_id(root):
  patterns = _load(root, "patterns.npy")
  patterns[10] = -1
  _resave(root, "patterns.npy", patterns)
  _expect(root, "patterns.npy", "row 10 has pattern id -1")


def test_invalid_split_value(root):
  split = _load(root, "item_split.npy")
  split[12] = 3
  _resave(root, "item_split.npy", split)
  _expect(root, "item_split.npy", "row 12 has split 3")


@pytest.mark.parametrize("item, split", [(17, "item_holdout (1)"), (44, "pattern_holdout (2)")])
def test_observed_label_on_held_out_item(root, item, split, mmap):
  observed = _load(root, "observed.npy")
  observed[item, 1] = True
  _resave(root, "observed.npy", observed)
  _expect(root, "observed.npy", f"item {item} is observed for domain 'safety'", split,
          "leak held-out labels", mmap=mmap)


@pytest.mark.parametrize("row, col, value, fragment", [
    (4, 0, N, "row 4: item id 60 out of range [0, 60)"),
    (5, 1, -7, "row 5: item id -7 out of range"),
    (7, 1, -1, "row 7: -1 padding followed by an item id"),
    (8, 0, 17, "row 8: item 17 has split item_holdout (1)"),
])
def test_bad_sequence(root, row, col, value, fragment, mmap):
  sequences = _load(root, "sequences.npy")
  sequences[row, col] = value
  _resave(root, "sequences.npy", sequences)
  _expect(root, "sequences.npy", fragment, mmap=mmap)


def test_empty_sequence_row(root):
  sequences = _load(root, "sequences.npy")
  sequences[3] = -1
  _resave(root, "sequences.npy", sequences)
  _expect(root, "sequences.npy", "row 3 has no items")


def _break_seeds(root, split, row, values):
  seeds = _load(root, f"queries_{split}.npz")["seeds"]
  seeds[row] = values
  _resave_queries(root, split, seeds=seeds)


@pytest.mark.parametrize("split, row, values, fragment", [
    ("train", 2, [0, 1, N], "row 2: seed id 60 out of range [0, 60)"),
    ("pattern_holdout", 1, [40, -1, 41], "row 1: seed id -1 out of range"),
    ("train", 6, [0, 1, 20], "row 6: seeds mix patterns (items [0, 1, 20] have patterns "
                             "[0, 0, 1])"),
    ("train", 0, [3, 4, 3], "row 0: duplicate seed id 3"),
    ("train", 3, [0, 1, 17], "row 3: seed item 17 has split item_holdout (1)"),
    ("item_holdout", 1, [15, 16, 2], "row 1: seed item 2 has split train (0)"),
    ("pattern_holdout", 3, [40, 41, 20], "row 3: seeds mix patterns"),
])
def test_bad_seeds(root, split, row, values, fragment, mmap):
  _break_seeds(root, split, row, values)
  _expect(root, f"queries_{split}.npz", fragment, mmap=mmap)


def test_seeds_not_in_query_pattern(root):
  queries = _load(root, "queries_train.npz")
  pattern = queries["pattern"]
  pattern[5] = 1 - pattern[5]
  _resave_queries(root, "train", pattern=pattern)
  _expect(root, "queries_train.npz", "row 5: seeds not in the query's pattern")


@pytest.mark.parametrize("value", [2, -1])
def test_query_domain_out_of_range(root, value, mmap):
  domain = _load(root, "queries_item_holdout.npz")["domain"]
  domain[4] = value
  _resave_queries(root, "item_holdout", domain=domain)
  _expect(root, "queries_item_holdout.npz",
          f"row 4: domain index {value} out of range [0, 2) (domains: quality, safety)",
          mmap=mmap)


def test_empty_query_file(root, mmap):
  _resave_queries(root, "pattern_holdout", seeds=np.zeros((0, SEED_SIZE), np.int32),
                  pattern=np.zeros(0, np.int32), domain=np.zeros(0, np.int32))
  _expect(root, "queries_pattern_holdout.npz", "no queries", mmap=mmap)


# --- Writing refuses what loading would refuse. ----------------------------------------------


def test_write_refuses_invalid_catalog_and_writes_nothing(tmp_path, catalog):
  embeddings = catalog.embeddings.copy()
  embeddings[7] = 0
  bad = dataclasses.replace(catalog, embeddings=embeddings)
  with pytest.raises(errors.CatalogError, match="embeddings.npy: row 7 has zero norm"):
    catalog_lib.write_catalog(tmp_path / "out", bad)
  assert not (tmp_path / "out").exists()


def test_write_refuses_truth_mismatch(tmp_path, catalog):
  bad = dataclasses.replace(catalog, attribute_directions=None)
  with pytest.raises(errors.CatalogError, match="attribute_directions.npy: present iff"):
    catalog_lib.write_catalog(tmp_path, bad)


def test_write_refuses_stale_attribute_directions(root):
  with pytest.raises(errors.CatalogError, match="attribute_directions.npy: exists"):
    catalog_lib.write_catalog(root, make_catalog(with_truth=False))


def test_write_manifest_refuses_bad_manifest(tmp_path):
  with pytest.raises(errors.CatalogError, match="manifest.json: unknown format"):
    catalog_lib.write_manifest(tmp_path, {"format": "other"})
  assert not (tmp_path / "manifest.json").exists()


def test_not_an_npy_file(root):
  with open(os.path.join(root, "patterns.npy"), "wb") as f:
    f.write(b"xx")
  _expect(root, "patterns.npy", "does not start with the .npy magic string")


def test_with_first_seeds_cuts_every_split_and_refuses_a_bad_count(catalog):
  assert catalog_lib.with_first_seeds(catalog, 0) is catalog
  assert catalog_lib.with_first_seeds(catalog, catalog.seed_size) is catalog
  cut = catalog_lib.with_first_seeds(catalog, 1)
  assert cut.seed_size == 1 and catalog.seed_size > 1  # the original is left alone
  for split, q in catalog.queries.items():
    np.testing.assert_array_equal(cut.queries[split].seeds, q.seeds[:, :1])
    np.testing.assert_array_equal(cut.queries[split].domain, q.domain)
  for bad in (-1, catalog.seed_size + 1):
    with pytest.raises(errors.UserError, match="seed limit"):
      catalog_lib.with_first_seeds(catalog, bad)
