"""The command-line binaries: `python -m modit_jax.cli.<name>` (README, "Commands").

Each module is a thin absl `main` over the library; `app` is their shared start-up. Nothing in
the library imports this package.
"""
