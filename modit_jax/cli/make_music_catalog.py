r"""Builds the real development catalog (music21 corpus + MiniLM; docs/real_catalog.md).

  pip install -e '.[real]'
  python -m modit_jax.cli.make_music_catalog --out=out/music/dataset

Prints the catalog's sanity table (also written to OUT/sanity.md). The text embeddings are
cached in `--cache_dir` (default: a `cache` folder beside OUT), and a catalog already built with
the same options is reused. Then run the pipeline on it with no other flag:
  python -m modit_jax.cli.pipeline --config=configs/pipeline.py \
      --config.dataset=out/music/dataset --workdir=out/music/run
"""

import os
import time
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from modit_jax import byo
from modit_jax import music_catalog
from modit_jax.cli import app

_OPTIONS = config_flags.DEFINE_config_dict("options", music_catalog.default_options(),
                                           "How the catalog is built.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the catalog to.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None,
                                 "Where text embeddings are cached (default: OUT/../cache).")
flags.mark_flags_as_required(["out"])


def main(argv: Sequence[str]) -> None:
  del argv
  out = _OUT.value
  cache_dir = _CACHE_DIR.value or os.path.join(os.path.dirname(os.path.abspath(out)), "cache")
  start = time.perf_counter()
  catalog = music_catalog.build(out, cache_dir, _OPTIONS.value)
  print(f"catalog: {out} ({time.perf_counter() - start:.1f} s)", flush=True)
  table = byo.sanity_table(catalog)
  with open(os.path.join(out, "sanity.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  app.run(main)
