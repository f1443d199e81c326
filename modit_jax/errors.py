"""Errors that mean "the user gave bad input", as opposed to bugs.

Binaries catch `UserError` (see `modit_jax.cli.app.run`) and print its message without a
traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input from the user: a flag, a config value, a file on disk."""


class CatalogError(UserError):
  """A catalog directory that does not follow the `modit-catalog/1` format."""
