r"""Generates the synthetic world and checks its required properties.

  python -m modit_jax.cli.make_dataset --config=configs/synthetic.py --out=out/default/dataset
  python -m modit_jax.cli.make_dataset --config=configs/synthetic.py:tiny --out=/tmp/tiny

Prints the property table of DESIGN.md section 4 (also written to OUT/properties.md) and exits
with status 1 when a required property fails (`config.properties_required`: the default world).
"""

import os
import sys
import time
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from modit_jax import catalog as catalog_lib
from modit_jax import properties
from modit_jax import synthetic
from modit_jax.cli import app

_CONFIG = config_flags.DEFINE_config_file("config", None, "Synthetic world config file.")
_OUT = flags.DEFINE_string("out", None, "Directory to write the catalog to.")
flags.mark_flags_as_required(["config", "out"])


def main(argv: Sequence[str]) -> None:
  del argv
  config = _CONFIG.value
  start = time.perf_counter()
  synthetic.write_world(config, _OUT.value)
  # Memory-mapped: validation streams over the arrays, so the 10M variant stays small.
  catalog = catalog_lib.load_catalog(_OUT.value, mmap=True)
  print(f"wrote {catalog.num_items} items ({len(set(catalog.patterns.tolist()))} patterns, "
        f"d={catalog.dim}, domains {', '.join(catalog.domains)}) to {_OUT.value} in "
        f"{time.perf_counter() - start:.1f} s")
  if not config.check_properties:
    print("property check skipped (config.check_properties = False)")
    return
  found, text, cells = properties.check_world(catalog, config)
  with open(os.path.join(_OUT.value, "properties.md"), "w") as f:
    f.write(text)
  print(text)
  print(cells)
  if not all(p.holds for p in found):
    if not config.properties_required:
      print("note: not every property holds; this variant does not require them "
            "(config.properties_required = False)")
      return
    sys.stderr.write("error: a required property of the synthetic world fails (table above)\n")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
