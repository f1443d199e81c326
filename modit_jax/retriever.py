"""Answering retrieval queries with a trained model: the library behind `modit_jax.cli.retrieve`.

A `Retriever` loads a training workdir (or a pipeline output directory) once: the model and
the EMA parameters of its latest checkpoint, the catalog it was trained on and the serialized
ScaNN index of that catalog. Each query is a seed set (catalog item ids, or raw embeddings of
new items) and a target domain; the answer is the ids and scores of the best k items.

  retriever = Retriever.from_workdir("out/default/sft")
  ids, scores = retriever.retrieve([12, 40, 7], "quality", k=20)
  ids, scores = retriever.retrieve(new_embeddings, "safety")  # float [s, d]: new items
  ids, scores = retriever.retrieve_batch([[1, 2], [3, 4, 5]], ["quality", "length"])

Contexts are padded (with the key-padding mask) to the next power of two of the longest seed set,
at most `config.model.max_context`, and batches to `Generator.padded_size`, so calls compile once
per (batch-size, context-length) bucket, never per call. Padding never changes an answer. Every
query is sampled with its own key (from `seed`), so its answer does not depend on the batch it
is asked in, up to float rounding (a batch split over several devices runs other kernels).
"""

import json
import os
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import evidence
from modit_jax import generator as generator_lib
from modit_jax import novelty
from modit_jax import retrieval
from modit_jax import run_dir

PIPELINE_FILE = "pipeline.json"  # written by the pipeline binary into its output directory
# {"guidance_scale": {"<domain>": float, ...}, "novelty_gate": Gate.to_json()}; both optional.
GUIDANCE_FILE = "guidance.json"
INDEX_DIR = "index"               # the default index directory inside a training workdir

Domain = str | int
GuidanceScale = float | Mapping[str, float]


class Retriever:
  """Answers (seed set, domain) queries with the best k catalog items."""

  def __init__(self, generator: generator_lib.Generator, catalog: catalog_lib.Catalog,
               index: retrieval.Index, guidance_scale: GuidanceScale | None = None,
               num_samples: int = 1, seed: int = 0, gate: novelty.Gate | None = None):
    """Wraps a loaded model, its catalog and an index of that catalog.

    Args:
      generator: the model of a training workdir.
      catalog: the catalog the model was trained on (ids, domains, seed embeddings).
      index: an index over `catalog.embeddings`.
      guidance_scale: a float for every domain, or a dict domain name -> float (missing
        domains keep the training config's scale); None: the training config's scale.
      num_samples: query embeddings sampled per query; their results merge by best score.
      seed: the random seed of every query's samples.
      gate: the novelty gate (modit_jax/novelty.py): seed sets from a region without train
        items are answered with its fallback query; None: the model answers every seed set.

    Raises:
      errors.UserError: the parts do not fit together, or a bad scale or sample count.
    """
    if (index.num_items, index.dim) != (catalog.num_items, catalog.dim):
      raise errors.UserError(
          f"the index holds {index.num_items} items of d={index.dim}; the catalog has "
          f"{catalog.num_items} of d={catalog.dim}: rebuild it from this catalog")
    generator.bind_catalog(catalog, index)
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or (
        num_samples < 1):
      raise errors.UserError(f"num_samples must be a positive integer, got {num_samples!r}")
    self.generator = generator
    self.catalog = catalog
    self.index = index
    self.num_samples = int(num_samples)
    self.seed = int(seed)
    if gate is not None and gate.train.shape != (catalog.num_items,):
      raise errors.UserError(f"the novelty gate knows {gate.train.shape[0]} items; the catalog "
                             f"has {catalog.num_items}")
    self.gate = gate
    self.guidance_scale = _domain_scales(guidance_scale, generator.guidance_scale,
                                         catalog.domains, "guidance_scale")
    # A model that never saw a domain token (stage 1) is asked with the null domain, as in
    # evaluation.
    self.conditioned = generator.facts.conditioned
    self.max_context = int(generator.config.model.max_context)

  @classmethod
  def from_workdir(cls, workdir: str | os.PathLike, *, dataset: str | None = None,
                   index: str | None = None, guidance_scale: GuidanceScale | None = None,
                   num_samples: int = 1, seed: int = 0, gate: bool = True) -> "Retriever":
    """Loads the retriever of a training workdir or of a pipeline output directory.

    Args:
      workdir: a training workdir (with `config.json`), or a directory whose `pipeline.json`
        names the final training workdir, the catalog and the index (paths relative to it).
      dataset: the catalog directory; default: pipeline.json's, else the one the workdir
        was trained on.
      index: an index directory saved by `retrieval.Index.save`; default: pipeline.json's,
        else `<training workdir>/index`. A default index that is not there yet is built
        (ScaNN) from the catalog and saved there, so the next load reads it.
      guidance_scale: as in `__init__`; default: `guidance.json` in `workdir` (then in the
        training workdir), else the training config's scale.
      num_samples: query embeddings sampled per query.
      seed: the random seed of every query's samples.
      gate: serve behind the novelty gate that `guidance.json` holds (the pipeline saves the
        one its evaluation used); False: the model answers every seed set.

    Returns:
      The retriever.

    Raises:
      errors.UserError: missing or inconsistent files.
    """
    root = os.fspath(workdir)
    pipeline = _read_pipeline(root)
    model_dir = pipeline.get("final_workdir", root)
    generator = generator_lib.Generator(model_dir)
    dataset = dataset or pipeline.get("dataset") or run_dir.run_dataset(model_dir)
    if not dataset:
      raise errors.UserError(
          f"{model_dir}/{run_dir.CONFIG_FILE} records no catalog: pass the dataset "
          f"(--dataset=DIR)")
    # Memory-mapped: seed lookups touch a few rows, and the index keeps its own copy.
    catalog = catalog_lib.load_catalog(dataset, mmap=True)
    if index:
      loaded = retrieval.load_index(index)
    else:
      loaded = retrieval.load_or_build_index(
          pipeline.get("index") or os.path.join(model_dir, INDEX_DIR), catalog.embeddings)
    # dict.fromkeys: both directories, in order, once each.
    saved_scales, saved_gate = _read_guidance(dict.fromkeys([root, model_dir]), catalog)
    if guidance_scale is None:
      guidance_scale = saved_scales
    return cls(generator, catalog, loaded, guidance_scale, num_samples, seed,
               saved_gate if gate else None)

  @property
  def domains(self) -> list[str]:
    return self.catalog.domains

  def retrieve(self, seeds: Any, domain: Domain, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """The best k items for one seed set in `domain`, best first.

    Args:
      seeds: int [s] catalog item ids (excluded from the answer), or float [s, d] raw
        embeddings of items that may not be in the catalog (L2-normalised here; nothing is
        excluded). 1 <= s <= the model's max_context.
      domain: a domain name of the catalog, or its id.
      k: how many items, 1 <= k <= the number of items left after excluding the seeds.

    Returns:
      ids int64 [k] and scores float32 [k] (dot products with the query embedding).

    Raises:
      errors.UserError: bad seeds, domain or k.
    """
    context, exclude = self._parse_seeds(seeds, "")
    ids, scores = self._answer(*self._pad([context], [exclude]), [self._domain_id(domain, "")],
                               k)
    return ids[0], scores[0]

  def retrieve_batch(self, seed_sets: Sequence[Any], domains: Domain | Sequence[Domain],
                     k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """`retrieve` for Q seed sets at once; rows equal Q separate `retrieve` calls.

    Args:
      seed_sets: Q seed sets as in `retrieve`, of any sizes and kinds (or an int [Q, s] or
        float [Q, s, d] array).
      domains: one domain for every seed set, or Q domains.
      k: items per seed set.

    Returns:
      ids int64 [Q, k] and scores float32 [Q, k].

    Raises:
      errors.UserError: a bad seed set (named by its position), domain or k.
    """
    if isinstance(seed_sets, (str, bytes)) or not hasattr(seed_sets, "__len__"):
      raise errors.UserError(f"seed_sets must be a list of seed sets, got {type(seed_sets)}")
    if not len(seed_sets):
      raise errors.UserError("seed_sets is empty: give at least one seed set")
    if isinstance(domains, (str, int, np.integer)):
      # One domain for all: resolved once (named as seed set 0's, as a list of it would be).
      domain_ids = [self._domain_id(domains, "seed set 0: ")] * len(seed_sets)
    else:
      if len(domains) != len(seed_sets):
        raise errors.UserError(
            f"{len(seed_sets)} seed sets but {len(domains)} domains: give one domain, or one "
            f"per seed set")
      domain_ids = [self._domain_id(d, f"seed set {q}: ") for q, d in enumerate(domains)]
    id_batch = _id_batch(seed_sets)
    if id_batch is not None:
      padded = self._parse_id_batch(id_batch)
    else:
      parsed = [self._parse_seeds(s, f"seed set {q}: ") for q, s in enumerate(seed_sets)]
      padded = self._pad([c for c, _ in parsed], [e for _, e in parsed])
    return self._answer(*padded, domain_ids, k)

  def _parse_id_batch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_pad` of `_parse_seeds` of every row of int [Q, s] ids, without a loop over rows.

    Parsing row by row costs ~11 us a seed set: little beside sampling on a CPU, but on a GPU
    parse, pad and merge were 42-64 % of serving's time (docs/benchmarks.md). This gives the
    same arrays and the same errors.
    """
    (num, size), num_items = ids.shape, self.catalog.num_items
    self._check_count(size, "seed set 0: ")
    bad_rows = np.flatnonzero(((ids < 0) | (ids >= num_items)).any(axis=1))
    if bad_rows.size:  # the per-row parse of the first bad row raises its error
      self._parse_seeds(ids[bad_rows[0]], f"seed set {bad_rows[0]}: ")
    context, mask, exclude = self._empty_padded(num, size)
    context[:, :size] = self.catalog.embeddings[ids.reshape(-1)].reshape(num, size, -1)
    mask[:, :size] = True
    # Each row's distinct ids ascending, then -1s (what np.unique per row and `_pad` give):
    # repeats are keyed past every id, sorted to the row's end, then marked -1.
    ordered = np.sort(ids, axis=1).astype(np.int64)
    repeat = np.zeros(ordered.shape, bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    ordered[repeat] = num_items
    ordered.sort(axis=1)
    ordered[ordered == num_items] = -1
    exclude[:, :size] = ordered
    return context, mask, exclude

  def _parse_seeds(self, seeds: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(unit context float32 [s, d], item ids to exclude int [e]) of one seed set."""
    try:
      seeds = np.asarray(seeds)
    except ValueError as e:  # ragged nested lists
      raise errors.UserError(f"{where}seeds must be a list of ids or an [s, d] array: {e}") from e
    if seeds.size == 0:
      raise errors.UserError(f"{where}empty seed set: give at least one item id or embedding")
    num_items, dim = self.catalog.num_items, self.catalog.dim
    if np.issubdtype(seeds.dtype, np.integer):
      if seeds.ndim != 1:
        raise errors.UserError(
            f"{where}item-id seeds must be a 1-D list of ids, got shape {seeds.shape}")
      self._check_count(len(seeds), where)
      bad = seeds[(seeds < 0) | (seeds >= num_items)]
      if bad.size:
        raise errors.UserError(
            f"{where}unknown item id {bad[0]}: the catalog's ids are 0..{num_items - 1}")
      return np.asarray(self.catalog.embeddings[seeds], np.float32), np.unique(seeds)
    if not np.issubdtype(seeds.dtype, np.floating):
      raise errors.UserError(
          f"{where}seeds must be integer item ids or float embeddings, got dtype {seeds.dtype}")
    if seeds.ndim != 2:
      raise errors.UserError(
          f"{where}seed embeddings must be a 2-D [s, {dim}] float array (one item: [1, {dim}]; "
          f"item ids must be integers), got shape {seeds.shape}")
    if seeds.shape[1] != dim:
      raise errors.UserError(
          f"{where}seed embeddings have dimension {seeds.shape[1]}, but the catalog and model "
          f"have dimension {dim}")
    self._check_count(len(seeds), where)
    seeds = seeds.astype(np.float64)
    norms = np.linalg.norm(seeds, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if bad.size:
      row = int(bad[0])
      problem = "is not finite" if not np.isfinite(norms[row]) else "is all zeros"
      raise errors.UserError(f"{where}seed embedding row {row} {problem}")
    # Catalog embeddings are unit rows; the model only ever saw those.
    return (seeds / norms[:, None]).astype(np.float32), np.zeros(0, np.int64)

  def _check_count(self, num: int, where: str) -> None:
    if num > self.max_context:
      raise errors.UserError(
          f"{where}{num} seeds, but the model takes at most {self.max_context} "
          f"(its config.model.max_context)")

  def _domain_id(self, domain: Domain, where: str) -> int:
    if isinstance(domain, str):
      try:
        return self.catalog.domain_id(domain)
      except errors.UserError as e:
        raise errors.UserError(f"{where}{e}") from None
    num = self.catalog.num_domains
    if isinstance(domain, (int, np.integer)) and not isinstance(domain, bool) and (
        0 <= domain < num):
      return int(domain)
    raise errors.UserError(
        f"{where}unknown domain {domain!r}; known domains: {', '.join(self.domains)} "
        f"(or their ids 0..{num - 1})")

  def _empty_padded(self, num: int, longest: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty (context float32 [Q, L, d], mask bool [Q, L], exclude int64 [Q, L], -1: none)."""
    # Padded (masked) to a power of two: few shapes to compile, and no attention over 16 slots
    # for 8 seeds (sampling is most of a call's time; bench/end_to_end.py).
    length = min(self.max_context, 1 << (longest - 1).bit_length())
    return (np.zeros((num, length, self.catalog.dim), np.float32),
            np.zeros((num, length), bool), np.full((num, length), -1, np.int64))

  def _pad(self, contexts: list[np.ndarray], excludes: list[np.ndarray]
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parsed seed sets as (context float32 [Q, L, d], mask bool [Q, L], exclude int64 [Q, L])."""
    context, mask, exclude = self._empty_padded(len(contexts), max(len(c) for c in contexts))
    for q, (ctx, ex) in enumerate(zip(contexts, excludes)):
      context[q, :len(ctx)], mask[q, :len(ctx)], exclude[q, :len(ex)] = ctx, True, ex
    return context, mask, exclude

  def _answer(self, context: np.ndarray, mask: np.ndarray, exclude: np.ndarray,
              domain_ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples, searches and merges padded queries; ids int64 [Q, k], scores float32 [Q, k]."""
    num_items, num = self.catalog.num_items, len(context)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
      raise errors.UserError(f"k must be an integer, got {k!r}")
    most_excluded = int((exclude >= 0).sum(axis=1).max())
    if not 1 <= k <= num_items - most_excluded:
      left = f" ({most_excluded} seed ids excluded)" if most_excluded else ""
      raise errors.UserError(f"k must be in [1, {num_items - most_excluded}] (the catalog's "
                             f"{num_items} items{left}), got {k}")
    domain = np.asarray(domain_ids, np.int32)
    model_domain = domain if self.conditioned else np.full(num, self.generator.num_domains)
    samples = self.generator.sample(context, mask, model_domain, np.full(num, self.seed),
                                    self.num_samples, self.guidance_scale[domain],
                                    exclude_items=exclude)
    if self.gate is not None:
      seed_means = (context * mask[:, :, None]).sum(1) / mask.sum(1, keepdims=True)
      samples, _ = self.gate.apply(self.index, seed_means, domain, exclude, samples)
    ids, scores = generator_lib.search_samples(self.index, samples, exclude, k,
                                               return_scores=True)
    return ids.astype(np.int64), scores.astype(np.float32)


def _id_batch(seed_sets: Any) -> np.ndarray | None:
  """`seed_sets` as int [Q, s >= 1] item ids when they are that (an array, or equal-length
  lists of ids); None for anything else, which is parsed seed set by seed set."""
  if isinstance(seed_sets, np.ndarray):
    ids = seed_sets
  elif isinstance(seed_sets, (list, tuple)) and all(
      isinstance(s, (list, tuple, np.ndarray)) for s in seed_sets):
    try:
      ids = np.asarray(seed_sets)
    except ValueError:  # ragged: parsed one by one, with their own errors
      return None
  else:
    return None
  if ids.ndim == 2 and ids.shape[1] and np.issubdtype(ids.dtype, np.integer):
    return ids
  return None


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: cannot read as JSON ({e})") from e


def _read_pipeline(root: str) -> dict[str, str]:
  """{} for a training workdir; else pipeline.json's paths, resolved against `root`."""
  if os.path.isfile(os.path.join(root, run_dir.CONFIG_FILE)):
    return {}
  path = os.path.join(root, PIPELINE_FILE)
  if not os.path.isfile(path):
    raise errors.UserError(
        f"{root}: neither a training workdir ({run_dir.CONFIG_FILE}) nor a pipeline output "
        f"directory ({PIPELINE_FILE})")
  saved = _read_json(path)
  if not isinstance(saved, dict) or not isinstance(saved.get("final_workdir"), str):
    raise errors.UserError(f"{path}: expected a JSON object with a \"final_workdir\" path")
  paths = {}
  for key in ("final_workdir", "dataset", "index"):
    value = saved.get(key)
    if value is not None and not isinstance(value, str):
      raise errors.UserError(f"{path}: \"{key}\" must be a path, got {value!r}")
    if value:
      paths[key] = os.path.join(root, value)
  return paths


def _read_guidance(directories: Sequence[str], catalog: catalog_lib.Catalog
                   ) -> tuple[dict[str, float] | None, novelty.Gate | None]:
  """The tuned scales and the novelty gate of the first `guidance.json` in `directories`.

  (None, None) if there is none; either is None when the file does not hold it.
  """
  for directory in directories:
    path = os.path.join(directory, GUIDANCE_FILE)
    if os.path.isfile(path):
      saved = _read_json(path)
      if not isinstance(saved, dict):
        raise errors.UserError(f"{path}: expected a JSON object")
      scales = saved.get("guidance_scale")
      if scales is not None:
        if not isinstance(scales, dict):
          raise errors.UserError(
              f"{path}: expected {{\"guidance_scale\": {{\"<domain>\": float, ...}}}}")
        _domain_scales(scales, 1.0, catalog.domains, path)  # checked here: errors name the file
        logging.info("Guidance scales from %s: %s", path, scales)
      gate = None
      if novelty.JSON_KEY in saved:
        gate = novelty.Gate.from_json(saved[novelty.JSON_KEY], catalog, path)
        logging.info("Novelty gate from %s: %d neighbours, threshold %.3f", path,
                     gate.neighbours, gate.threshold)
      return scales, gate
  return None, None


def _domain_scales(scale: GuidanceScale | None, default: float, domains: list[str],
                   what: str) -> np.ndarray:
  """Per-domain guidance scales float32 [M] from a float, a dict or None (the default)."""
  if scale is None:
    scale = default
  if isinstance(scale, Mapping):
    unknown = sorted(set(scale) - set(domains))
    if unknown:
      raise errors.UserError(f"{what}: unknown domain(s) {', '.join(map(str, unknown))}; "
                             f"known domains: {', '.join(domains)}")
    values = [scale.get(name, default) for name in domains]
  else:
    values = [scale] * len(domains)
  try:
    out = np.asarray(values, np.float32)
  except (TypeError, ValueError) as e:
    raise errors.UserError(f"{what}: guidance scales must be numbers, got {values}") from e
  if out.shape != (len(domains),) or not np.isfinite(out).all():
    raise errors.UserError(f"{what}: guidance scales must be finite numbers, got {values}")
  return out
