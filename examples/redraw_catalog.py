r"""Redraws a converted catalog with another converter seed: is a result an accident of the draw?

  python examples/redraw_catalog.py --catalog=out/hpo/dataset --seed=1 --out=out/hpo/draw1
  python -m modit_jax.cli.evaluate --config=configs/evaluate.py --dataset=out/hpo/draw1 \
      --workdir=out/hpo/draw1_eval \
      --config.methods=seed_centroid,centroid_global_shift,neighbourhood_offset

The catalog is converted again (`byo.convert_arrays`) from its own item ids, embeddings and
labels, with the options recorded in its manifest and a new `seed`: new k-means patterns, item
split, observed labels and queries over the same items and labels. At the catalog's own seed
the result equals the catalog (patterns, split, observed labels and queries).

Two limits, both because a catalog does not keep what its source table held:
- labels are taken as complete: a catalog cannot tell a null label of its table from a
  negative, so redraw only catalogs whose table had none (the examples' catalogs have none);
- the raw sequences are not carried over: the catalog keeps them without the items its split
  held out. The redrawn catalog has none (stage 1 then trains on nearest-neighbour walks);
  it is meant for the baselines, which read no sequences.
Used for the fresh draws in docs/novelty.md, "A step must beat chance".
"""

import os
from typing import Sequence

from absl import flags
import numpy as np

from modit_jax import byo
from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax.cli import app  # a user's mistake is one line, not a traceback


def redraw(catalog_dir: str, out: str, seed: int) -> byo.Result:
  """Converts the catalog at `catalog_dir` again with converter seed `seed`, into `out`.

  Raises:
    errors.UserError: the catalog was not converted by `convert_catalog` with derived patterns
      and a seeded split (a synthetic world, or patterns or a split given by its table: then a
      new seed would redraw nothing but the queries and labels).
  """
  catalog = catalog_lib.load_catalog(catalog_dir)
  manifest = catalog.manifest
  generator = manifest.get("generator", {})
  if (generator.get("name") != "modit_jax.cli.convert_catalog"
      or manifest.get("patterns", {}).get("source") != "derived"
      or manifest.get("split", {}).get("source") != "seeded"):
    raise errors.UserError(
        f"{catalog_dir}: not a catalog converted with derived patterns and a seeded split "
        f"(its generator is {generator.get('name')!r}); only such a catalog can be redrawn")
  options = dict(generator["options"], seed=int(seed))
  labels = {name: catalog.attributes[:, m].astype(np.int8)
            for m, name in enumerate(catalog.domains)}
  item_ids = np.load(os.path.join(catalog_dir, byo.ITEM_IDS_FILE), allow_pickle=False)
  return byo.convert_arrays(item_ids, np.asarray(catalog.embeddings, np.float32), labels, out,
                            byo.Options(**options))


def main(argv: Sequence[str]) -> None:
  del argv
  result = redraw(flags.FLAGS.catalog, flags.FLAGS.out, flags.FLAGS.seed)
  print(byo.sanity_table(result.catalog))
  print(f"wrote {flags.FLAGS.out} (converter seed {flags.FLAGS.seed}, no raw sequences)")


if __name__ == "__main__":
  # Defined here, not at import: the tests import this file beside binaries that define theirs.
  flags.DEFINE_string("catalog", None, "A catalog written by convert_catalog.")
  flags.DEFINE_string("out", None, "New (or empty) directory for the redrawn catalog.")
  flags.DEFINE_integer("seed", 1, "The converter seed of the draw.")
  flags.mark_flags_as_required(["catalog", "out"])
  app.run(main)
