r"""A second real catalog: the collectible Hearthstone cards, through the BYO converter.

An independent check, never used for a decision (docs/real_data.md, "A second real catalog"),
and an example of turning a real item table into a catalog with `byo.convert` (through
`text_catalog`):

  pip install -e '.[real,cards]'
  python examples/hearthstone_catalog.py --out=out/cards/dataset
  python -m modit_jax.cli.pipeline --config=configs/pipeline.py \
      --config.dataset=out/cards/dataset --workdir=out/cards/run

Items: the collectible cards of `hearthstone-data` (CardDefs.xml, read from the installed
package; nothing is downloaded), minions, spells, weapons and locations, first printing only
(a reprint repeats its name and text). Text: name, rules text and flavour text, embedded by
all-MiniLM-L6-v2 (`text_encoder`). Raw sequences: the cards of one set in card-id order, rows of
16. Patterns: derived by k-means (k = 100, about 60 cards each). Domains, none stated in the
text: `expensive` (mana cost 5 or more), `elite` (epic or legendary), `neutral` (no hero
class), `early` (database id below the median: the older half). Options as the music
catalog's: 5 seeds, 250 queries per cell, 10 % of train labels observed, seed 0.
"""

import importlib.util
import os
import re
from typing import Any, Sequence
import xml.etree.ElementTree as ElementTree

from absl import flags
import numpy as np

from modit_jax import byo
from modit_jax import errors
from modit_jax import text_catalog
from modit_jax.cli import app  # a user's mistake is one line, not a traceback

DOMAINS = ("expensive", "elite", "neutral", "early")
_PLAYABLE_TYPES = ("4", "5", "7", "39")  # minion, spell, weapon, location (no heroes)
_ELITE_RARITIES = ("4", "5")             # epic, legendary
_NEUTRAL_CLASS = "12"
_SEQUENCE_LENGTH = 16
_NUM_PATTERNS = 100


def card_defs() -> str:
  """The path of CardDefs.xml in the installed `hearthstone-data` package."""
  spec = importlib.util.find_spec("hearthstone_data")
  if spec is None or spec.origin is None:
    raise errors.UserError("this example needs the package hearthstone-data: "
                           "pip install -e '.[real,cards]'")
  return os.path.join(os.path.dirname(spec.origin), "CardDefs.xml")


def read_cards(path: str) -> list[dict[str, Any]]:
  """Collectible playable cards with their English strings and integer tags, first printings."""
  cards = []
  for _, entity in ElementTree.iterparse(path, events=("end",)):
    if entity.tag != "Entity":
      continue
    tags = {}
    for tag in entity.findall("Tag"):
      if tag.get("type") == "LocString":
        english = tag.find("enUS")
        tags[tag.get("name")] = english.text if english is not None else None
      else:
        tags[tag.get("name")] = tag.get("value")
    if (tags.get("COLLECTIBLE") == "1" and tags.get("CARDTYPE") in _PLAYABLE_TYPES
        and tags.get("CARDNAME")):
      cards.append({"card_id": entity.get("CardID"), "dbf": int(entity.get("ID")), **tags})
    entity.clear()  # the file is ~100 MB
  cards.sort(key=lambda c: c["dbf"])
  first, seen = [], set()
  for card in cards:
    key = (card["CARDNAME"], _clean(card.get("CARDTEXT")))
    if key not in seen:
      seen.add(key)
      first.append(card)
  return first


def _clean(text: str | None) -> str:
  """Card markup (<b>, [x], $ and # damage marks, {0} slots) removed, whitespace collapsed."""
  text = re.sub(r"<[^>]+>|\[x\]|[$#]|\{\d\}", "", text or "")
  return re.sub(r"[\s_]+", " ", text).strip()


def table(cards: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """The converter's columns (item_id, text, one float 1/0 column per domain) and the sets."""
  cost = np.array([int(c.get("COST") or 0) for c in cards])
  dbf = np.array([c["dbf"] for c in cards])
  return {
      "item_id": np.array([c["card_id"] for c in cards]),
      "text": np.array([". ".join(t for t in (_clean(c["CARDNAME"]), _clean(c.get("CARDTEXT")),
                                              _clean(c.get("FLAVORTEXT"))) if t)
                        for c in cards]),
      "set": np.array([c.get("CARD_SET") or "" for c in cards]),
      "expensive": (cost >= 5).astype(np.float64),
      "elite": np.isin([c.get("RARITY") for c in cards], _ELITE_RARITIES).astype(np.float64),
      "neutral": (np.array([c.get("CLASS") for c in cards]) == _NEUTRAL_CLASS
                  ).astype(np.float64),
      "early": (dbf < np.median(dbf)).astype(np.float64),
  }


def set_sequences(item_id: np.ndarray, card_set: np.ndarray) -> np.ndarray:
  """The card ids of each set in id order, cut into rows of 16 ("" padded, 2 or more ids)."""
  return byo.group_sequences(item_id, card_set, item_id, _SEQUENCE_LENGTH)


def main(argv: Sequence[str]) -> None:
  del argv
  columns = table(read_cards(card_defs()))
  text_catalog.build_and_report("cards", columns, DOMAINS,
                                set_sequences(columns["item_id"], columns["set"]), _NUM_PATTERNS,
                                flags.FLAGS.out, flags.FLAGS.cache_dir)


if __name__ == "__main__":
  # Defined here, not at import: the tests import this file beside binaries that define theirs.
  flags.DEFINE_string("out", "out/cards/dataset", "New (or empty) catalog directory.")
  flags.DEFINE_string("cache_dir", "out/cards/cache", "Embedding cache ('' for none).")
  app.run(main)
