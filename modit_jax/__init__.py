"""modit_jax: MO-DiT+HPPO generative retrieval for pattern-preserving attribute retrieval."""

__version__ = "0.1.0"
