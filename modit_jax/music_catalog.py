"""The real development catalog: the music21 core corpus, embedded by a sentence encoder.

docs/real_catalog.md describes it. Items are the ~15k works (folk songs, dance tunes, chorales,
masses) whose metadata the `music21` package ships (BSD-3-Clause, read offline from the package's
metadata cache). Each item's text is its title, composer and place of origin as given, embedded
by all-MiniLM-L6-v2 (`text_encoder`). Raw sequences are real co-occurrence: the works of one
source book (an Essen song collection, a volume of O'Neill's tunes) in the book's order. The
four attribute domains come from the scores, never from the text:

  long          more notes than the corpus median
  wide_range    an ambitus of more than an octave (12 semitones)
  triple_meter  a first time signature of 3, 6, 9 or 12 beats
  sharp_key     a first key signature with sharps

The corpus has no fine-grained patterns, so `build` derives them by k-means through the
bring-your-own-catalog converter (`byo.convert`, `cluster_patterns`), which records them as
derived in the manifest. Everything is seeded; the embeddings are cached by the texts' hash.
"""

import json
import os
from typing import Any

import ml_collections
import numpy as np

from modit_jax import byo
from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import text_catalog
from modit_jax import text_encoder

DOMAINS = ("long", "wide_range", "triple_meter", "sharp_key")
SOURCE_FILE = "source.json"  # in the catalog directory: what it was built from
_TRIPLE_BEATS = ("3", "6", "9", "12")


def default_options() -> ml_collections.ConfigDict:
  """How the catalog is built; `make_music_catalog` exposes each field as a flag."""
  c = ml_collections.ConfigDict()
  c.num_patterns = 200         # derived by k-means over the embeddings (the corpus has none)
  c.seed_size = text_catalog.SEED_SIZE
  c.queries_per_cell = text_catalog.QUERIES_PER_CELL
  c.observed_fraction = text_catalog.OBSERVED_FRACTION  # DESIGN §2's sparse observed labels
  c.sequence_length = 16       # a book longer than this gives several consecutive sequences
  c.max_works = 0              # 0: every work; > 0 keeps that many, evenly spaced (tests)
  c.seed = text_catalog.SEED
  return c


def read_works(max_works: int = 0) -> dict[str, np.ndarray]:
  """The corpus' works with usable metadata, in the metadata bundle's order.

  `max_works` > 0 keeps that many, evenly spaced over the bundle (so every collection stays).

  Returns arrays: `item_id` (str), `text` (str), `book` (str, the source file), `number`
  (int, the work's position in its book; 0 if none), and per-domain float labels (1, 0, or NaN
  where the score does not say).
  """
  try:
    from music21 import corpus  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise errors.UserError("the music catalog needs music21: install the real-catalog extra "
                           "with `pip install -e '.[real]'`") from None
  # One slice lists the bundle: iterating it indexes each entry through a fresh list of all
  # 15k entries (quadratic, ~45 s).
  usable = [entry for entry in corpus.corpora.CoreCorpus().metadataBundle[:]
            if entry.metadata is not None and (entry.metadata.bestTitle or "").strip()]
  if not usable:
    raise errors.UserError("music21's core corpus metadata has no usable work")
  if 0 < max_works < len(usable):  # before reading paths and fields, which cost per entry
    usable = [usable[i] for i in np.linspace(0, len(usable) - 1, max_works).round().astype(int)]
  rows: list[dict[str, Any]] = []
  for entry in usable:
    md = entry.metadata
    text = md.bestTitle.strip()
    if md.composer:
      text += f"; {md.composer}"
    if md.localeOfComposition:
      text += f"; {md.localeOfComposition}"
    ambitus = md.ambitus
    meter = str(md.timeSignatureFirst or "")
    rows.append(dict(
        item_id=str(entry.corpusPath) if not entry.number else
        f"{entry.corpusPath}#{entry.number}",
        text=text, book=str(entry.sourcePath), number=int(entry.number or 0),
        notes=float(md.noteCount) if md.noteCount else np.nan,
        ambitus=float(ambitus.semitones) if ambitus is not None else np.nan,
        triple_meter=float(meter.split("/")[0] in _TRIPLE_BEATS) if meter else np.nan,
        sharp_key=(float(md.keySignatureFirst > 0) if md.keySignatureFirst is not None
                   else np.nan)))
  column = lambda name, dtype: np.array([r[name] for r in rows], dtype)
  notes, ambitus = column("notes", np.float64), column("ambitus", np.float64)
  median_notes = np.nanmedian(notes)
  with np.errstate(invalid="ignore"):
    long = np.where(np.isnan(notes), np.nan, (notes > median_notes).astype(np.float64))
    wide = np.where(np.isnan(ambitus), np.nan, (ambitus > 12).astype(np.float64))
  return dict(item_id=column("item_id", str), text=column("text", str),
              book=column("book", str), number=column("number", np.int64),
              long=long, wide_range=wide, triple_meter=column("triple_meter", np.float64),
              sharp_key=column("sharp_key", np.float64))


def book_sequences(works: dict[str, np.ndarray], length: int) -> np.ndarray:
  """Item ids of each book in the book's order, cut into rows of `length` ("" padded).

  Books with a single work give no sequence (a sequence needs a next item).
  """
  return byo.group_sequences(works["item_id"], works["book"], works["number"], length)


def build(out: str, cache_dir: str, options: ml_collections.ConfigDict) -> catalog_lib.Catalog:
  """Builds the catalog into `out` (reused as it is if built with the same options)."""
  source = {"corpus": "music21 core corpus", "encoder": text_encoder.NAME,
            "domains": list(DOMAINS), "options": options.to_dict()}
  source_path = os.path.join(out, SOURCE_FILE)
  if os.path.isfile(source_path):
    with open(source_path) as f:
      if json.load(f) == source:
        print(f"catalog: reused {out}", flush=True)
        return catalog_lib.load_catalog(out)
    raise errors.UserError(f"{out} holds a music catalog built with other options; write to a "
                           "new directory")
  works = read_works(int(options.max_works))
  result = text_catalog.convert(
      works["item_id"], works["text"], {name: works[name] for name in DOMAINS}, out,
      byo.Options(attributes=DOMAINS, seed_size=int(options.seed_size),
                  queries_per_cell=int(options.queries_per_cell),
                  observed_fraction=float(options.observed_fraction), seed=int(options.seed),
                  cluster_patterns=int(options.num_patterns)),
      book_sequences(works, int(options.sequence_length)), cache_dir)
  with open(source_path, "w") as f:
    json.dump(source, f, indent=1)
  return result.catalog
