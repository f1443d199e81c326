r"""Retrieves the best items for one seed set and domain with a trained model, as a table.

  python -m modit_jax.cli.retrieve --workdir=out/default/sft --domain=quality --seeds=12,40,7
  python -m modit_jax.cli.retrieve --workdir=OUT --domain=safety --seed_embeddings=new_items.npy \
      --k=50

--workdir is a training workdir or a pipeline output directory (with pipeline.json). Seeds are
catalog item ids (--seeds; excluded from the answer) or a .npy float [s, d] file of raw
embeddings of new items (--seed_embeddings). The first run without a saved index builds one
and saves it (see `modit_jax.retriever.Retriever.from_workdir`).
"""

from typing import Sequence

from absl import flags
import numpy as np

from modit_jax import errors
from modit_jax import retriever as retriever_lib
from modit_jax import variants
from modit_jax.cli import app

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Training workdir, or pipeline output directory (with pipeline.json).")
_DOMAIN = flags.DEFINE_string("domain", None, "Target domain name, e.g. quality.")
_SEEDS = flags.DEFINE_string("seeds", None, "Comma-separated catalog item ids, e.g. 12,40,7.")
_SEED_EMBEDDINGS = flags.DEFINE_string(
    "seed_embeddings", None, ".npy file of float [s, d] seed embeddings (new items).")
_K = flags.DEFINE_integer("k", 20, "How many items to retrieve.")
_DATASET = flags.DEFINE_string("dataset", None, "Catalog directory (default: the trained one).")
_INDEX = flags.DEFINE_string("index", None, "Index directory (default: built or saved one).")
_GUIDANCE_SCALE = flags.DEFINE_float(
    "guidance_scale", None, "Guidance scale for every domain (default: guidance.json, else "
    "the training config's).")
_GATE = flags.DEFINE_bool(
    "gate", True, "Serve behind the novelty gate saved in guidance.json (seed sets from a "
    "region without train items get the global shift; docs/novelty.md); --nogate: the model "
    "answers every seed set.")
flags.mark_flags_as_required(["workdir", "domain"])


def _seeds() -> np.ndarray:
  """The seed set of --seeds or --seed_embeddings (exactly one of them)."""
  if (_SEEDS.value is None) == (_SEED_EMBEDDINGS.value is None):
    raise errors.UserError("give exactly one of --seeds (item ids) or --seed_embeddings (.npy)")
  if _SEED_EMBEDDINGS.value is not None:
    try:
      return np.load(_SEED_EMBEDDINGS.value, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise errors.UserError(f"--seed_embeddings: cannot read {_SEED_EMBEDDINGS.value} as "
                             f".npy ({e})") from e
  try:
    return np.array([int(t) for t in variants.split(_SEEDS.value)], np.int64)
  except ValueError as e:
    raise errors.UserError(f"--seeds must be comma-separated item ids, got {_SEEDS.value!r}"
                           ) from e


def main(argv: Sequence[str]) -> None:
  del argv
  seeds = _seeds()
  retriever = retriever_lib.Retriever.from_workdir(
      _WORKDIR.value, dataset=_DATASET.value, index=_INDEX.value,
      guidance_scale=_GUIDANCE_SCALE.value, gate=_GATE.value)
  ids, scores = retriever.retrieve(seeds, _DOMAIN.value, _K.value)
  kind = ("item ids, excluded from the answer" if np.issubdtype(seeds.dtype, np.integer)
          else "new-item embeddings")
  print(f"top {len(ids)} for domain {_DOMAIN.value} from {len(seeds)} seeds ({kind}):")
  print(f"{'rank':>4}  {'item':>9}  {'score':>7}")
  for rank, (item, score) in enumerate(zip(ids, scores), 1):
    print(f"{rank:>4}  {item:>9}  {score:>7.4f}")


if __name__ == "__main__":
  app.run(main)
