"""Training batches, deterministic in the step.

Every batch is a pure function of (seed, step): resuming at step N replays exactly the batches an
uninterrupted run would have seen, whatever the number of processes. Each process builds the
global batch's item ids (cheap) and gathers embeddings only for its own slice.

A batch is a dict of numpy arrays:
  context       float32 [B, L, d]  context item embeddings (zeros where padded)
  context_mask  bool    [B, L]     True for real items
  domain        int32   [B]        domain id; `num_domains` is the null domain
  target        float32 [B, d]     the embedding the model learns to generate
"""

import numpy as np

from modit_jax import errors
from modit_jax import retrieval


def process_slice(batch_size: int, process_index: int, process_count: int) -> slice:
  """This process's rows of a global batch of `batch_size`."""
  if batch_size % process_count:
    raise errors.UserError(
        f"batch_size {batch_size} is not divisible by the {process_count} processes")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def gather(embeddings: np.ndarray, context_ids: np.ndarray, target: np.ndarray,
           domain: np.ndarray) -> dict[str, np.ndarray]:
  """Builds a batch from context ids (-1 padded), target embeddings and domains."""
  mask = context_ids >= 0
  # Only real context rows are read: padding never touches (possibly held-out) item rows.
  context = np.zeros(context_ids.shape + (embeddings.shape[1],), np.float32)
  context[mask] = embeddings[context_ids[mask]]
  return {"context": context, "context_mask": mask, "domain": domain.astype(np.int32),
          "target": np.asarray(target, np.float32)}


def item_counts(sequences: np.ndarray) -> np.ndarray:
  """int [S]: the items in each -1-padded sequence row (a row with 2 or more has a next item)."""
  return (np.asarray(sequences) >= 0).sum(axis=1)


def neighbour_walks(embeddings: np.ndarray, train_items: np.ndarray, neighbours: int,
                    length: int, max_walks: int, seed: int) -> np.ndarray:
  """Random walks over the train items' nearest-neighbour graph, int32 [W, length] item ids.

  Stage 1's sequences where the catalog has none that stay local: each step goes to one of
  the current item's `neighbours` nearest train items (dot product, itself left out), so a
  walk stays in a region as a session inside one pattern does. One walk starts at each train
  item (at most `max_walks`, a seeded sample beyond that). Reads only train items.
  """
  train_items = np.asarray(train_items)
  if len(train_items) < 2:
    raise errors.UserError("stage 1's neighbour walks need at least 2 train items")
  neighbours = min(int(neighbours), len(train_items) - 1)
  if neighbours < 1 or length < 2:
    raise errors.UserError(f"neighbour walks need neighbours >= 1 and length >= 2, got "
                           f"{neighbours} and {length}")
  vectors = np.asarray(embeddings[train_items], np.float32)
  index = retrieval.build_index(vectors, "exact" if len(vectors) <= _EXACT_WALK_ITEMS
                                else "scann")
  # Row i's own id is excluded; its neighbours come back as rows of `vectors`.
  near, _ = index.search(vectors, neighbours, exclude=np.arange(len(vectors))[:, None])
  rng = np.random.default_rng([seed, _WALK_STREAM])
  starts = np.arange(len(vectors))
  if len(starts) > max_walks:
    starts = np.sort(rng.choice(starts, max_walks, replace=False))
  walks = np.empty((len(starts), length), np.int64)
  walks[:, 0] = starts
  for step in range(1, length):
    walks[:, step] = near[walks[:, step - 1], rng.integers(0, neighbours, len(starts))]
  return train_items[walks].astype(np.int32)


# Up to this many train items the walks' neighbours come from an exact search; beyond, ScaNN.
_EXACT_WALK_ITEMS = 200_000
# The random stream of the walks, apart from the batches' (which key on the step).
_WALK_STREAM = 7


class SequencePrefixes:
  """Stage 1: context = a prefix of a raw sequence (random length), target = the next item."""

  def __init__(self, sequences: np.ndarray, embeddings: np.ndarray, max_context: int,
               null_domain: int, seed: int):
    sequences = np.asarray(sequences)
    lengths = item_counts(sequences)
    keep = lengths >= 2  # a prefix needs at least one context item and one next item
    if not keep.any():
      raise errors.UserError("stage 1 needs raw sequences of length >= 2; sequences.npy has none")
    self._sequences = sequences[keep]
    self._lengths = lengths[keep]
    self._embeddings = embeddings
    self._max_context = int(max_context)
    self._null_domain = int(null_domain)
    self._seed = int(seed)

  def __call__(self, step: int, batch_size: int, process_index: int = 0,
               process_count: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self._seed, step])
    rows = rng.integers(0, len(self._sequences), size=batch_size)
    # Position of the target: 1 .. length-1, so the prefix before it is never empty.
    target_pos = 1 + (rng.random(batch_size) * (self._lengths[rows] - 1)).astype(np.int64)
    part = process_slice(batch_size, process_index, process_count)
    rows, target_pos = rows[part], target_pos[part]
    # The last max_context items before the target, left-aligned, -1 padded.
    offsets = np.arange(self._max_context)
    start = np.maximum(target_pos - self._max_context, 0)
    pos = start[:, None] + offsets[None, :]
    ids = np.where(pos < target_pos[:, None],
                   self._sequences[rows[:, None], np.minimum(pos, self._sequences.shape[1] - 1)],
                   -1)
    target = self._embeddings[self._sequences[rows, target_pos]]
    return gather(self._embeddings, ids, target,
                  np.full(len(rows), self._null_domain, np.int32))
