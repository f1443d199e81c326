"""How local a catalog's raw sequences are, which decides what stage 1 can learn from them.

Stage 1 (the pretrained GR) learns to generate a sequence's next item from its prefix. Where
consecutive items lie near each other (walks inside a pattern, books of one region), its
samples stay near the seeds; where a sequence jumps between unrelated items (a card set in
card-number order), it learns the jumps, and `pretrained_gr` retrieves outside the seeds'
pattern (docs/real_data.md, "A second real catalog"). Below `LOW` the pipeline warns. Stages
2-4 train on latent-cluster trajectories and seed-like sets, not on the raw sequences.

Locality = (mean cosine of consecutive items - mean cosine of random train-item pairs) /
(1 - the latter): 1 when consecutive items coincide, 0 when they are as far apart as random
items. It reads the sequences and the train items' embeddings, as training may.
"""

import dataclasses

import numpy as np

from modit_jax import catalog as catalog_lib

# Below this the pipeline and the converter warn. Measured on raw sequences: the development
# world 0.91, the music catalog 0.43 (`pretrained_gr` Purity@20 0.94-0.98 of the seed
# average's), the Hearthstone cards 0.04 (Purity@20 0.00).
LOW = 0.2
# Pairs averaged over (uniformly sampled beyond it): a 10M-item catalog has tens of millions
# of consecutive pairs, and 50,000 pin the mean to about +-0.002.
MAX_PAIRS = 50_000


@dataclasses.dataclass(frozen=True)
class Locality:
  """Mean cosines of consecutive and of random pairs, and the locality they give."""
  consecutive_cosine: float
  random_cosine: float
  locality: float
  num_pairs: int  # consecutive pairs in the sequences (before sampling)

  @property
  def low(self) -> bool:
    return self.locality < LOW

  def line(self) -> str:
    """One line for the pipeline's log and report."""
    text = (f"raw sequences: locality {self.locality:.2f} (consecutive items' mean cosine "
            f"{self.consecutive_cosine:.3f} against {self.random_cosine:.3f} for random train "
            f"items; {self.num_pairs} pairs)")
    if self.low:
      text += (f"; below {LOW}: the sequences jump between unrelated items, and stage 1 "
               "(`pretrained_gr`) may not stay in the seeds' pattern; stages 2-4 do not read "
               "the sequences")
    return text

  def message(self) -> str:
    """`line()` as printed to the user: a warning when low."""
    return ("warning: " if self.low else "") + self.line()


def measure(catalog: catalog_lib.Catalog, seed: int = 0) -> Locality | None:
  """The locality of `catalog`'s raw sequences; None if they hold no consecutive pair."""
  sequences = np.asarray(catalog.sequences)
  first, second = sequences[:, :-1].ravel(), sequences[:, 1:].ravel()
  real = (first >= 0) & (second >= 0)
  first, second = first[real], second[real]
  train = catalog.train_items()
  if not len(first) or len(train) < 2:
    return None
  rng = np.random.default_rng(seed)
  if len(first) > MAX_PAIRS:
    rows = rng.choice(len(first), MAX_PAIRS, replace=False)
    sampled_first, sampled_second = first[rows], second[rows]
  else:
    sampled_first, sampled_second = first, second
  random_first = rng.choice(train, MAX_PAIRS)
  random_second = rng.choice(train, MAX_PAIRS)
  consecutive = _mean_cosine(catalog.embeddings, sampled_first, sampled_second)
  random = _mean_cosine(catalog.embeddings, random_first, random_second)
  return Locality(consecutive, random, (consecutive - random) / max(1.0 - random, 1e-6),
                  int(len(first)))


def _mean_cosine(embeddings: np.ndarray, first: np.ndarray, second: np.ndarray) -> float:
  # Rows are unit (the loader checks), so a dot product is the cosine.
  a = np.asarray(embeddings[first], np.float32)
  b = np.asarray(embeddings[second], np.float32)
  return float(np.mean(np.sum(a * b, axis=1)))
