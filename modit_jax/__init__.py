"""modit_jax: MO-DiT+HPPO generative retrieval for pattern-preserving attribute retrieval."""

__version__ = "0.1.0"


def __getattr__(name: str):
  # Lazy, so `import modit_jax.catalog` does not pull in jax (and XLA flags can still be set).
  if name == "Retriever":
    from modit_jax.retriever import Retriever  # pylint: disable=g-import-not-at-top
    return Retriever
  raise AttributeError(f"module 'modit_jax' has no attribute {name!r}")
