"""The embedded synthetic world: a catalog with known pattern and attribute truth.

Construction (DESIGN.md section 4, our constants in `configs/synthetic.py`):
  * T topics (random unit vectors); P patterns per topic centred near their topic, so that a
    query pushed too far along the wrong direction lands in a sibling pattern.
  * Items scatter around their pattern centre along `num_shared_axes` axes shared by every
    pattern, `num_local_axes` axes of their own pattern, plus isotropic noise; then are
    L2-normalised.
  * Domain m and pattern p have a true attribute direction
        w(m, p) = normalise(a_m * u_m + (1 - a_m) * h_m(p)),
    u_m = shared axis m (all patterns' positives lean the same way: global search drifts),
    h_m(p) = the pattern's local projection of a smooth random map of the pattern centre (so
    the direction can be inferred from the seeds and generalises to unseen patterns). Both
    lie in the pattern's main spread, so the positives form a region one query can reach.
  * An item is positive for m when its offset from the pattern centre along w(m, p) is in the
    top r(m, p) of its pattern.
  * Seeds come from the low-attribute part of their pattern (below `seed_quantile` along w).
  * Raw sequences are walks over train items inside a pattern that sometimes hop to a sibling.

Items are generated topic by topic, each topic from its own random stream, so the result does
not depend on how topics are grouped into chunks: the 10M-item variant streams chunks to disk
with the same code (and the same bytes for the topics both sizes share) as the small ones.
Item ids are contiguous per pattern; nothing downstream reads ids as features.
"""

import dataclasses
import os
from typing import Iterator

from absl import logging
import ml_collections
import numpy as np

from modit_jax import catalog as catalog_lib

_SPLIT_TRAIN, _SPLIT_ITEM_HOLDOUT, _SPLIT_PATTERN_HOLDOUT = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class WorldAxes:
  """Everything global to the world: drawn once from the config seed."""
  topics: np.ndarray            # float32 [T, d], unit rows
  shared_axes: np.ndarray       # float32 [S, d], orthonormal rows; u_m = shared_axes[m]
  smooth_maps: np.ndarray       # float32 [M, d, d], h_m's random linear map before tanh
  pattern_holdout: np.ndarray   # bool [P]
  queries_per_pattern: dict[str, np.ndarray]  # split -> int [P, M] query counts


@dataclasses.dataclass
class Chunk:
  """The items, labels, sequences and queries of a contiguous range of topics."""
  embeddings: np.ndarray
  patterns: np.ndarray
  attributes: np.ndarray
  observed: np.ndarray
  item_split: np.ndarray
  directions: np.ndarray        # float32 [M, P_chunk, d]
  sequences: np.ndarray
  queries: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # split -> seeds, pattern, domain


def _validate_config(config: ml_collections.ConfigDict) -> None:
  """Refuses configs that cannot produce a world with the promised structure."""
  from modit_jax import errors  # pylint: disable=g-import-not-at-top
  num_domains = len(config.domains)
  if num_domains < 1:
    raise errors.UserError("synthetic config: `domains` must name at least one domain")
  if len(config.alpha) != num_domains:
    raise errors.UserError(
        f"synthetic config: `alpha` has {len(config.alpha)} values for {num_domains} domains")
  if config.num_shared_axes < num_domains:
    raise errors.UserError("synthetic config: need num_shared_axes >= number of domains "
                           "(each domain leans along its own shared axis)")
  if config.num_shared_axes + config.num_local_axes >= config.dim:
    raise errors.UserError("synthetic config: num_shared_axes + num_local_axes must be < dim")
  lo, hi = config.positive_rate
  if not 0 < lo <= hi < 1:
    raise errors.UserError(f"synthetic config: positive_rate must satisfy 0 < lo <= hi < 1, "
                           f"got {tuple(config.positive_rate)}")
  holdout_items = int(round(config.items_per_pattern * config.item_holdout_fraction))
  if holdout_items * config.seed_quantile < config.seed_size:
    raise errors.UserError(
        "synthetic config: too few item-holdout items below seed_quantile per pattern to "
        f"draw {config.seed_size} seeds; raise items_per_pattern or item_holdout_fraction")


def _orthonormal_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
  q, _ = np.linalg.qr(rng.standard_normal((d, n)))
  return q.T


def make_axes(config: ml_collections.ConfigDict) -> WorldAxes:
  """Draws the world-level random structure (topics, shared axes, splits, query budget)."""
  _validate_config(config)
  rng = np.random.default_rng([config.seed, 0])
  d, m = config.dim, len(config.domains)
  topics = rng.standard_normal((config.num_topics, d))
  topics /= np.linalg.norm(topics, axis=1, keepdims=True)
  shared = _orthonormal_rows(rng, config.num_shared_axes, d)
  smooth = rng.standard_normal((m, d, d)) * config.smooth_map_gain / np.sqrt(d)
  num_patterns = config.num_topics * config.patterns_per_topic
  holdout = np.zeros(num_patterns, bool)
  holdout[rng.permutation(num_patterns)[:int(round(num_patterns *
                                                   config.pattern_holdout_fraction))]] = True
  # Spread each split's per-domain query budget evenly over its eligible patterns.
  def spread(count: int, eligible: np.ndarray) -> np.ndarray:
    out = np.zeros((num_patterns, m), np.int64)
    idx = np.flatnonzero(eligible)
    for dom in range(m):
      picks = rng.choice(idx, size=count, replace=True) if count > len(idx) else rng.choice(
          idx, size=count, replace=False)
      np.add.at(out[:, dom], picks, 1)
    return out
  queries = {
      "train": spread(config.num_queries.train, ~holdout),
      "item_holdout": spread(config.num_queries.item_holdout, ~holdout),
      "pattern_holdout": spread(config.num_queries.pattern_holdout, holdout),
  }
  return WorldAxes(topics.astype(np.float32), shared.astype(np.float32),
                   smooth.astype(np.float32), holdout, queries)


def _draw_seeds(rng: np.random.Generator, eligible: np.ndarray, count: int,
                seed_size: int) -> np.ndarray:
  return np.stack([rng.choice(eligible, size=seed_size, replace=False) for _ in range(count)]
                  ) if count else np.zeros((0, seed_size), np.int64)


def make_topic(config: ml_collections.ConfigDict, axes: WorldAxes, topic: int) -> Chunk:
  """Generates one topic's patterns, items, labels, sequences and queries."""
  rng = np.random.default_rng([config.seed, 1, topic])
  d, num_domains = config.dim, len(config.domains)
  n_pat, n_item = config.patterns_per_topic, config.items_per_pattern
  first_pattern = topic * n_pat
  first_item = first_pattern * n_item
  alpha = np.asarray(config.alpha, np.float64)

  centres = axes.topics[topic][None, :] + config.sibling_spread * rng.standard_normal(
      (n_pat, d)) / np.sqrt(d)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)

  emb = np.empty((n_pat * n_item, d), np.float32)
  attributes = np.zeros((n_pat * n_item, num_domains), bool)
  directions = np.empty((num_domains, n_pat, d), np.float32)
  item_split = np.full(n_pat * n_item, _SPLIT_TRAIN, np.int8)
  low_attribute = np.zeros((n_pat * n_item, num_domains), bool)
  for j in range(n_pat):
    rows = slice(j * n_item, (j + 1) * n_item)
    local = _orthonormal_rows(rng, config.num_local_axes, d)
    x = (centres[j] +
         config.shared_scale * rng.standard_normal((n_item, config.num_shared_axes)) @ axes.shared_axes
         + config.local_scale * rng.standard_normal((n_item, config.num_local_axes)) @ local
         + config.noise_scale * rng.standard_normal((n_item, d)))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb[rows] = x
    offsets = x - centres[j]
    for m in range(num_domains):
      smooth = np.tanh(axes.smooth_maps[m] @ centres[j])
      h = local.T @ (local @ smooth)
      h /= np.linalg.norm(h)
      w = alpha[m] * axes.shared_axes[m] + (1 - alpha[m]) * h
      w /= np.linalg.norm(w)
      directions[m, j] = w
      along = offsets @ w
      rate = rng.uniform(*config.positive_rate)
      order = np.argsort(along)
      attributes[j * n_item + order[n_item - int(round(rate * n_item)):], m] = True
      low = np.zeros(n_item, bool)
      low[order[:int(config.seed_quantile * n_item)]] = True
      low_attribute[rows, m] = low
    if axes.pattern_holdout[first_pattern + j]:
      item_split[rows] = _SPLIT_PATTERN_HOLDOUT
    else:
      held = rng.permutation(n_item)[:int(round(n_item * config.item_holdout_fraction))]
      item_split[j * n_item + held] = _SPLIT_ITEM_HOLDOUT

  train = item_split == _SPLIT_TRAIN
  observed = (rng.random((n_pat * n_item, num_domains)) < config.observed_fraction) & train[:, None]

  queries = {}
  for split, code in catalog_lib.SPLIT_CODES.items():
    seeds, pats, doms = [], [], []
    for j in range(n_pat):
      for m in range(num_domains):
        count = int(axes.queries_per_pattern[split][first_pattern + j, m])
        if not count:
          continue
        rows = np.arange(j * n_item, (j + 1) * n_item)
        eligible = rows[(item_split[rows] == code) & low_attribute[rows, m]]
        seeds.append(_draw_seeds(rng, eligible, count, config.seed_size) + first_item)
        pats += [first_pattern + j] * count
        doms += [m] * count
    queries[split] = (np.concatenate(seeds) if seeds else np.zeros((0, config.seed_size), np.int64),
                      np.asarray(pats, np.int64), np.asarray(doms, np.int64))

  sequences = _walks(config, rng, item_split, n_pat, n_item) 
  sequences = np.where(sequences >= 0, sequences + first_item, -1)
  return Chunk(emb, np.repeat(np.arange(first_pattern, first_pattern + n_pat), n_item),
               attributes, observed, item_split, directions, sequences, queries)


def _walks(config: ml_collections.ConfigDict, rng: np.random.Generator, item_split: np.ndarray,
           n_pat: int, n_item: int) -> np.ndarray:
  """Random walks over one topic's train items; local ids, -1 padded to sequence_length."""
  train_of = [np.flatnonzero(item_split[j * n_item:(j + 1) * n_item] == _SPLIT_TRAIN) + j * n_item
              for j in range(n_pat)]
  walkable = [j for j in range(n_pat) if len(train_of[j])]
  num = config.sequences_per_topic if walkable else 0
  out = np.full((num, config.sequence_length), -1, np.int64)
  lengths = rng.integers(config.min_sequence_length, config.sequence_length + 1, size=num)
  for s in range(num):
    pattern = rng.choice(walkable)
    for t in range(lengths[s]):
      if t and rng.random() < config.sibling_hop_probability:
        pattern = rng.choice(walkable)
      out[s, t] = rng.choice(train_of[pattern])
  return out


def iter_chunks(config: ml_collections.ConfigDict, axes: WorldAxes) -> Iterator[Chunk]:
  """Yields the world `config.topics_per_chunk` topics at a time."""
  for start in range(0, config.num_topics, config.topics_per_chunk):
    parts = [make_topic(config, axes, t)
             for t in range(start, min(start + config.topics_per_chunk, config.num_topics))]
    yield Chunk(
        embeddings=np.concatenate([p.embeddings for p in parts]),
        patterns=np.concatenate([p.patterns for p in parts]),
        attributes=np.concatenate([p.attributes for p in parts]),
        observed=np.concatenate([p.observed for p in parts]),
        item_split=np.concatenate([p.item_split for p in parts]),
        directions=np.concatenate([p.directions for p in parts], axis=1),
        sequences=np.concatenate([p.sequences for p in parts]),
        queries={s: tuple(np.concatenate([p.queries[s][i] for p in parts]) for i in range(3))
                 for s in catalog_lib.SPLITS})


class _RowWriter:
  """Writes a `.npy` file row block by row block with plain file writes.

  Plain writes rather than a writable memmap: dirty memmap pages stay resident until the
  kernel flushes them, which made the 10M-item world's footprint grow with the file.
  """

  def __init__(self, path: str, dtype: type, shape: tuple[int, ...]):
    self._dtype = np.dtype(dtype)
    self._row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self._dtype.itemsize
    self._file = open(path, "wb")
    np.lib.format.write_array_header_1_0(
        self._file, {"descr": np.lib.format.dtype_to_descr(self._dtype), "fortran_order": False,
                     "shape": shape})
    self._offset = self._file.tell()
    self._file.truncate(self._offset + shape[0] * self._row_bytes)

  def write(self, row: int, block: np.ndarray) -> None:
    self._file.seek(self._offset + row * self._row_bytes)
    self._file.write(np.ascontiguousarray(block, self._dtype).tobytes())

  def close(self) -> None:
    self._file.close()


def write_world(config: ml_collections.ConfigDict, out_dir: str | os.PathLike) -> None:
  """Generates the world and writes it as a `modit-catalog/1` directory, chunk by chunk.

  Item arrays are written chunk by chunk so that at most one chunk of items is in memory;
  the small per-query arrays are gathered and shuffled at the end.
  """
  axes = make_axes(config)
  os.makedirs(out_dir, exist_ok=True)
  d, num_domains = config.dim, len(config.domains)
  num_patterns = config.num_topics * config.patterns_per_topic
  num_items = num_patterns * config.items_per_pattern
  path = lambda name: os.path.join(os.fspath(out_dir), name)
  # Chunk field -> its writer; the file is `<field>.npy`.
  writers = {
      field: _RowWriter(path(f"{field}.npy"), dtype, (num_items,) + row_shape)
      for field, dtype, row_shape in (("embeddings", np.float32, (d,)),
                                      ("patterns", np.int32, ()),
                                      ("attributes", np.bool_, (num_domains,)),
                                      ("observed", np.bool_, (num_domains,)),
                                      ("item_split", np.int8, ()))}
  # [M, P, d] is small next to the items (41 MB at 10M items): gathered in memory.
  directions = np.empty((num_domains, num_patterns, d), np.float32)
  sequences, queries = [], {s: [] for s in catalog_lib.SPLITS}
  item, pattern = 0, 0
  for i, chunk in enumerate(iter_chunks(config, axes)):
    n = len(chunk.patterns)
    for field, writer in writers.items():
      writer.write(item, getattr(chunk, field))
    directions[:, pattern:pattern + chunk.directions.shape[1]] = chunk.directions
    item, pattern = item + n, pattern + chunk.directions.shape[1]
    sequences.append(chunk.sequences)
    for s in catalog_lib.SPLITS:
      queries[s].append(chunk.queries[s])
    logging.info("generated %d / %d items (chunk %d)", item, num_items, i + 1)
  for writer in writers.values():
    writer.close()
  np.save(path(catalog_lib.ATTRIBUTE_DIRECTIONS), directions)
  del directions

  order_rng = np.random.default_rng([config.seed, 2])
  sequences = np.concatenate(sequences)
  np.save(path("sequences.npy"), sequences[order_rng.permutation(len(sequences))].astype(np.int32))
  for s in catalog_lib.SPLITS:
    seeds, pats, doms = (np.concatenate([q[i] for q in queries[s]]) for i in range(3))
    perm = order_rng.permutation(len(pats))
    catalog_lib.save_npz(path(catalog_lib.query_file(s)), seeds=seeds[perm].astype(np.int32),
                         pattern=pats[perm].astype(np.int32), domain=doms[perm].astype(np.int32))
  catalog_lib.write_manifest(out_dir, {
      "format": catalog_lib.FORMAT,
      "num_items": int(num_items),
      "dim": int(d),
      "domains": list(config.domains),
      "seed_size": int(config.seed_size),
      "num_patterns": int(num_patterns),
      "truth": {"attribute_directions": "attribute_directions.npy"},
      "generator": {"name": "modit_jax.synthetic", "config": config.to_dict()},
  })
