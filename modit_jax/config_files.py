"""Config files that build on each other, found beside each other rather than on `sys.path`.

`configs/pipeline.py` builds every run from the stage config files next to it. Importing them
as `configs.<name>` would work only where the repository root is on `sys.path` (running from
it); `sibling` loads them by path, so a binary runs from any directory with
`--config=/path/to/configs/pipeline.py`.
"""

import importlib.util
import os
import sys
import types


def sibling(anchor_file: str, name: str) -> types.ModuleType:
  """The config file `<name>.py` in the folder of `anchor_file` (a config file's `__file__`).

  Each file is executed once per folder and process; later calls return the same module.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(anchor_file)), f"{name}.py")
  # One module name per file path: configs of two checkouts in one process stay apart.
  key = f"_modit_config_file:{path}"
  if key in sys.modules:
    return sys.modules[key]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found (beside {anchor_file})")
  spec = importlib.util.spec_from_file_location(key, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[key] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[key]
    raise
  return module
