r"""Builds the retrieval index of a catalog and saves it.

  python -m modit_jax.cli.build_index --dataset=out/default/dataset --out=out/default/index
  python -m modit_jax.cli.build_index --dataset=DIR --out=DIR --kind=exact

The index directory can be moved; `modit_jax.retrieval.load_index` reads it back.
"""

import time
from typing import Sequence

from absl import flags
from absl import logging

from modit_jax import catalog as catalog_lib
from modit_jax import retrieval
from modit_jax.cli import app

_DATASET = flags.DEFINE_string("dataset", None, "Catalog directory (modit-catalog/1).")
_OUT = flags.DEFINE_string("out", None, "Directory to write the index to.")
_KIND = flags.DEFINE_enum("kind", "scann", retrieval.KINDS,
                          "scann, or exact (brute force; the recall yardstick).")
flags.mark_flags_as_required(["dataset", "out"])


def main(argv: Sequence[str]) -> None:
  del argv
  start = time.perf_counter()
  # Memory-mapped: the index makes its own copy, no need for a second one in memory.
  embeddings = catalog_lib.load_catalog(_DATASET.value, mmap=True).embeddings
  logging.info("Loaded %d x %d embeddings from %s in %.1f s", *embeddings.shape,
               _DATASET.value, time.perf_counter() - start)
  start = time.perf_counter()
  index = retrieval.build_index(embeddings, _KIND.value)
  built = time.perf_counter() - start
  index.save(_OUT.value)
  logging.info("Built the %s index in %.1f s and saved it to %s in %.1f s; params: %s",
               _KIND.value, built, _OUT.value, time.perf_counter() - start - built,
               index.params)


if __name__ == "__main__":
  app.run(main)
