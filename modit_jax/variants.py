"""Comma-separated config strings: variants like `tiny,no_policy`, and lists of names.

A variant (the `tiny,no_policy` of `--config=configs/hppo.py:tiny,no_policy`) is a
comma-separated list of tokens, each a named change to a config file's default ("default", or
nothing, is no change). Every config file and `training.default_config` read their variant with
`parse`, so all of them accept and refuse tokens the same way. Lists of names in a config
(methods, splits, HPPO's policies) and on a command line are split by `split`, the same way.
"""

from typing import Collection


def split(arg: str | None) -> list[str]:
  """The comma-separated tokens of `arg` in their order, stripped, blanks dropped."""
  return [t for t in (t.strip() for t in str(arg or "").split(",")) if t]


def parse(arg: str | None, known: Collection[str], config_name: str) -> list[str]:
  """The variant's tokens in their order, without "default" and blanks.

  Raises ValueError naming the known tokens when one is not among `known`.
  """
  tokens = [t for t in split(arg) if t != "default"]
  unknown = [t for t in tokens if t not in known]
  if unknown:
    raise ValueError(f"unknown {config_name} config variant{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(unknown)}; known: {', '.join(known)}")
  return tokens


def join(*tokens: str) -> str:
  """One variant of the given tokens (empty ones dropped)."""
  return ",".join(t for t in tokens if t)
