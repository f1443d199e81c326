"""The training stages by name. Each is one module of this package that defines `STAGE`.

Adding a stage is adding its module here (`base.Stage`: what it trains on and how); the
registry finds it, `training.train` trains it, and its run directory records the facts that
inference reads (`run_dir.ModelFacts`). See docs/architecture.md.
"""

import functools
import importlib
import pkgutil

from modit_jax import errors
from modit_jax.stages import base

_NOT_STAGES = ("base",)


@functools.cache
def _registry() -> dict[str, base.Stage]:
  found = {}
  for info in pkgutil.iter_modules(__path__):
    if info.name in _NOT_STAGES:
      continue
    stage = importlib.import_module(f"{__name__}.{info.name}").STAGE
    if stage.name in found:
      raise RuntimeError(f"two stage modules define the stage {stage.name!r}")
    found[stage.name] = stage
  return dict(sorted(found.items(), key=lambda item: item[1].order))


def names() -> tuple[str, ...]:
  """Every stage's name, in pipeline order."""
  return tuple(_registry())


def get(name: str) -> base.Stage:
  """The stage called `name`; an unknown name is the user's error."""
  stage = _registry().get(name)
  if stage is None:
    raise errors.UserError(f"unknown stage {name!r}; known: {', '.join(names())}")
  return stage
