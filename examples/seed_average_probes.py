r"""What label-free query changes and the metric predictor add to the seed average on a catalog.

A diagnostic for the question "can anything DESIGN §2 lets a method read beat averaging the
seeds on this catalog's held-out patterns?" (docs/real_data.md, "The pattern-holdout
ceiling"). Exact search over the whole catalog, seeds excluded, Joint@20 and Purity@20 of every
query of the train, item-holdout and pattern-holdout splits:

  python examples/seed_average_probes.py --dataset=out/music/dataset

- `centred a`: the seed average minus `a` times the catalog's mean embedding (removes the
  component every text embedding shares; a standard correction for hub items).
- `feedback k b`: the seed average plus `b` times the mean of its own `k` nearest items
  (pseudo-relevance feedback without labels).
- `predictor g`: the seed average's 200 nearest items re-scored by cosine + `g` x the logit of
  the metric predictor's probability for the query's domain (the evaluation's predictor, trained
  on the observed labels; `rerank` is the limit of a large `g`).

The knobs here are swept on the evaluation splits themselves, so the best row of a holdout split
is an optimistic bound of what a knob chosen on validation queries would give; the train split's
rows show what validation would see. Each row's Δ is against the seed average, with its paired
standard error.
"""

from typing import Sequence

from absl import flags
import numpy as np

from modit_jax import catalog as catalog_lib
from modit_jax import clusters
from modit_jax import evaluation
from modit_jax import evidence
from modit_jax import metric_predictor
from modit_jax import metrics
from modit_jax import retrieval
from modit_jax.cli import app

_DATASET = flags.DEFINE_string("dataset", None, "The catalog directory.", required=True)
_K = 20
_POOL = 200


def _scores(catalog: catalog_lib.Catalog, queries: catalog_lib.Queries,
            retrieved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  m = metrics.retrieval_metrics(retrieved, queries.seeds, queries.pattern, queries.domain,
                                catalog.patterns, catalog.attributes, ks=(_K,))
  return m[f"joint@{_K}"], m[f"purity@{_K}"]


def _rows(catalog: catalog_lib.Catalog, index: retrieval.Index, logits: np.ndarray,
          queries: catalog_lib.Queries) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """(name, per-query Joint@K, per-query Purity@K) of every probe on one split."""
  emb = np.asarray(catalog.embeddings, np.float32)
  centroid = evidence.seed_centroids(emb, queries.seeds)
  mean = emb.mean(axis=0)

  def search(q: np.ndarray) -> np.ndarray:
    return index.search(evidence.normalize(q), _K, exclude=queries.seeds)[0]

  rows = [("seed average", *_scores(catalog, queries, search(centroid)))]
  for a in (0.25, 0.5, 1.0):
    rows.append((f"centred {a}", *_scores(catalog, queries, search(centroid - a * mean))))
  pool, pool_scores = index.search(centroid, _POOL, exclude=queries.seeds)
  for k in (5, 10, 20):
    neighbours = emb[pool[:, :k]].mean(axis=1)
    for b in (0.5, 1.0):
      rows.append((f"feedback {k} {b}",
                   *_scores(catalog, queries, search(centroid + b * neighbours))))
  for g in (0.002, 0.005, 0.01):
    rescored = pool_scores + g * logits[pool, queries.domain[:, None]]
    order = np.argsort(-rescored, axis=1, kind="stable")[:, :_K]
    rows.append((f"predictor {g}",
                 *_scores(catalog, queries, np.take_along_axis(pool, order, axis=1))))
  return rows


def main(argv: Sequence[str]) -> None:
  del argv
  catalog = catalog_lib.load_catalog(_DATASET.value)
  emb = np.asarray(catalog.embeddings, np.float32)
  index = retrieval.build_index(emb, kind="exact")
  config = evaluation.default_config().metric_predictor
  predictor = metric_predictor.train(emb, catalog.attributes, catalog.observed, config,
                                     clusters.relative_features(catalog, config))
  print("metric predictor held-out AUC: " + ", ".join(
      f"{d} {v['auc']:.3f}" for d, v in zip(catalog.domains, predictor.validation)))
  probs = np.clip(predictor.predict(emb), 1e-4, 1 - 1e-4)
  logits = np.log(probs) - np.log1p(-probs)
  for split in ("train", "item_holdout", "pattern_holdout"):
    queries = catalog.queries[split]
    rows = _rows(catalog, index, logits, queries)
    base = rows[0][1]
    print(f"\n{split} ({len(queries)} queries): Joint@{_K} mean [per domain], Purity@{_K}, "
          "Δ Joint vs the seed average ± paired SE")
    for name, joint, purity in rows:
      diff = joint - base
      per_domain = " ".join(f"{joint[queries.domain == m].mean():.3f}"
                            for m in range(catalog.num_domains))
      print(f"  {name:18s} {joint.mean():.3f} [{per_domain}]  {purity.mean():.3f}  "
            f"{diff.mean():+.3f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}")


if __name__ == "__main__":
  app.run(main)
