r"""Converts your own item table (Parquet or .npz) into a `modit-catalog/1` directory.

  python -m modit_jax.cli.convert_catalog --input=items.parquet --attributes=quality,safety \
      --out=out/mine/dataset
  python -m modit_jax.cli.convert_catalog --input=items.npz --attributes=quality,safety \
      --sequences=sequences.npz --normalize --out=out/mine/dataset
  python -m modit_jax.cli.convert_catalog --input=items.parquet --attributes=quality \
      --cluster_patterns=200 --out=out/mine/dataset   # no `pattern` column: derive patterns

The table needs columns `item_id`, `embedding` and one per attribute; `pattern` and `split` are
optional. The written directory has passed `catalog.load_catalog`. Input format, split, queries
and every choice made: docs/byo_catalog.md.
"""

from typing import Sequence

from absl import flags

from modit_jax import byo
from modit_jax import catalog as catalog_lib
from modit_jax import sequence_locality
from modit_jax.cli import app

_DEFAULTS = byo.Options(attributes=())
_INPUT = flags.DEFINE_string("input", None, "Item table: .parquet (needs pyarrow) or .npz.")
_OUT = flags.DEFINE_string("out", None, "New (or empty) directory to write the catalog to.")
_ATTRIBUTES = flags.DEFINE_list(
    "attributes", None, "Attribute columns, one domain each, in this order; values 1/0, "
    "true/false, or null for unobserved.")
_SEQUENCES = flags.DEFINE_string(
    "sequences", None, "Optional raw sequences: a file with column `sequence` of item ids "
    "(Parquet list column, or .npz [S, L] padded with -1 / \"\"). Held-out items are dropped.")
_SEED_SIZE = flags.DEFINE_integer("seed_size", _DEFAULTS.seed_size, "Seed items per query.")
_QUERIES_PER_CELL = flags.DEFINE_integer(
    "queries_per_cell", _DEFAULTS.queries_per_cell,
    "Queries per (split, domain), for each of train, item_holdout and pattern_holdout.")
_ITEM_HOLDOUT = flags.DEFINE_float(
    "item_holdout_fraction", _DEFAULTS.item_holdout_fraction,
    "Without a `split` column: share of each training pattern's items held out.")
_PATTERN_HOLDOUT = flags.DEFINE_float(
    "pattern_holdout_fraction", _DEFAULTS.pattern_holdout_fraction,
    "Without a `split` column: share of patterns held out whole.")
_OBSERVED = flags.DEFINE_float(
    "observed_fraction", _DEFAULTS.observed_fraction,
    "Share of the non-null labels of train items that training may read (seeded); the rest "
    "stay evaluation-only.")
_SEED = flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seeds the split, labels and queries.")
_NORMALIZE = flags.DEFINE_bool(
    "normalize", False, "L2-normalise the embedding rows (otherwise non-unit rows are refused).")
_CLUSTER_PATTERNS = flags.DEFINE_integer(
    "cluster_patterns", None, "Without a `pattern` column: derive this many patterns by "
    "k-means over the embeddings (recorded as derived in the manifest).")
flags.mark_flags_as_required(["input", "out", "attributes"])


def main(argv: Sequence[str]) -> None:
  del argv
  options = byo.Options(
      attributes=tuple(_ATTRIBUTES.value), seed_size=_SEED_SIZE.value,
      queries_per_cell=_QUERIES_PER_CELL.value, item_holdout_fraction=_ITEM_HOLDOUT.value,
      pattern_holdout_fraction=_PATTERN_HOLDOUT.value, observed_fraction=_OBSERVED.value,
      seed=_SEED.value, normalize=_NORMALIZE.value, cluster_patterns=_CLUSTER_PATTERNS.value)
  result = byo.convert(_INPUT.value, _OUT.value, options, sequences=_SEQUENCES.value)
  catalog = result.catalog
  splits = {name: int((catalog.item_split == code).sum())
            for name, code in catalog_lib.SPLIT_CODES.items()}
  print(f"wrote {catalog.num_items} items (d={catalog.dim}, "
        f"{catalog.manifest['num_patterns']} patterns, domains {', '.join(catalog.domains)}; "
        f"{', '.join(f'{k} {v}' for k, v in splits.items())}; "
        f"{len(catalog.sequences)} sequences) to {_OUT.value}")
  for note in result.notes:
    print(f"note: {note}")
  # Before any training: sequences that jump between unrelated items give a stage 1 that does
  # not stay in the seeds' pattern.
  locality = sequence_locality.measure(catalog)
  if locality is not None:
    print(locality.message())


if __name__ == "__main__":
  app.run(main)
