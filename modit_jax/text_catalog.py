"""A catalog from item texts: embedded by `text_encoder`, converted by `byo`.

The real catalogs (the music corpus, examples/hearthstone_catalog.py,
examples/cities_catalog.py) are tables of item ids, texts and label columns with raw
sequences; this turns such a table into a catalog directory in one way for all of them.
"""

import os
from typing import Sequence

import numpy as np

from modit_jax import byo
from modit_jax import sequence_locality
from modit_jax import text_encoder

# The real catalogs' query options: 5-item seed sets, 250 queries per cell, 10 % of train labels
# observed (DESIGN §2's sparse labels), seed 0.
SEED_SIZE, QUERIES_PER_CELL, OBSERVED_FRACTION, SEED = 5, 250, 0.1, 0


def convert(item_ids: np.ndarray, texts: np.ndarray, columns: dict[str, np.ndarray],
            out: str | os.PathLike, options: byo.Options, sequences: np.ndarray | None,
            cache_dir: str) -> byo.Result:
  """Embeds `texts` [N] (cached in `cache_dir` by their hash; '' for none) and converts.

  `columns` are the table's other columns [N] by name (a label column per attribute);
  `sequences` rows of item ids ("" padded). The converter's notes are printed, and the texts
  are saved beside the catalog as `out/texts.npy`, for reading what a result retrieved.
  """
  result = byo.convert_arrays(item_ids, text_encoder.encode_cached(texts, cache_dir), columns,
                              out, options, sequences)
  for note in result.notes:
    print(f"note: {note}", flush=True)
  np.save(os.path.join(os.fspath(out), "texts.npy"), texts)
  return result


def build_and_report(name: str, columns: dict[str, np.ndarray], domains: Sequence[str],
                     sequences: np.ndarray, num_patterns: int, out: str,
                     cache_dir: str) -> byo.Result:
  """An example catalog from a table with `item_id`, `text` and a 1/0 column per domain.

  Converted with the real catalogs' options and `num_patterns` derived patterns; prints the
  positive rates, the sanity table and the raw sequences' locality.
  """
  domains = tuple(domains)
  print(f"{name}: {len(columns['item_id'])}, positive rates "
        + ", ".join(f"{d} {columns[d].mean():.2f}" for d in domains), flush=True)
  result = convert(columns["item_id"], columns["text"], {d: columns[d] for d in domains}, out,
                   byo.Options(attributes=domains, seed_size=SEED_SIZE,
                               queries_per_cell=QUERIES_PER_CELL,
                               observed_fraction=OBSERVED_FRACTION, seed=SEED,
                               cluster_patterns=num_patterns),
                   sequences, cache_dir)
  print(byo.sanity_table(result.catalog))
  print(sequence_locality.measure(result.catalog).line())
  return result
