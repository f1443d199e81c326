"""Config variants: the `tiny,no_policy` of `--config=configs/hppo.py:tiny,no_policy`.

A variant is a comma-separated list of tokens, each a named change to a config file's default
("default", or nothing, is no change). Every config file and `training.default_config` read
their variant with `parse`, so all of them accept and refuse tokens the same way.
"""

from typing import Collection


def parse(arg: str | None, known: Collection[str], config_name: str) -> list[str]:
  """The variant's tokens in their order, without "default" and blanks.

  Raises ValueError naming the known tokens when one is not among `known`.
  """
  tokens = [t.strip() for t in (arg or "").split(",")]
  tokens = [t for t in tokens if t and t != "default"]
  unknown = [t for t in tokens if t not in known]
  if unknown:
    raise ValueError(f"unknown {config_name} config variant{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(unknown)}; known: {', '.join(known)}")
  return tokens


def join(*tokens: str) -> str:
  """One variant of the given tokens (empty ones dropped)."""
  return ",".join(t for t in tokens if t)
