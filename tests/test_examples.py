"""examples/hearthstone_catalog.py on a small CardDefs.xml of its own (no card package needed)."""

import importlib.util
import os

import numpy as np

_EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "hearthstone_catalog.py")
_spec = importlib.util.spec_from_file_location("hearthstone_catalog", _EXAMPLE)
cards_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cards_example)

_XML = """<?xml version="1.0" encoding="utf-8"?>
<CardDefs build="1">
{entities}
</CardDefs>
"""


def _entity(card_id, dbf, name, text, cost, rarity, card_class, card_type="4", card_set="2",
            collectible="1"):
  return f"""<Entity CardID="{card_id}" ID="{dbf}" version="2">
  <Tag enumID="185" name="CARDNAME" type="LocString"><deDE>x</deDE><enUS>{name}</enUS></Tag>
  <Tag enumID="184" name="CARDTEXT" type="LocString"><enUS>{text}</enUS></Tag>
  <Tag enumID="48" name="COST" type="Int" value="{cost}"/>
  <Tag enumID="203" name="RARITY" type="Int" value="{rarity}"/>
  <Tag enumID="199" name="CLASS" type="Int" value="{card_class}"/>
  <Tag enumID="202" name="CARDTYPE" type="Int" value="{card_type}"/>
  <Tag enumID="183" name="CARD_SET" type="Int" value="{card_set}"/>
  <Tag enumID="321" name="COLLECTIBLE" type="Int" value="{collectible}"/>
</Entity>"""


def test_cards_are_read_deduplicated_and_labelled(tmp_path):
  entities = [
      _entity("B_002", 20, "Ogre", "&lt;b&gt;Taunt&lt;/b&gt;\nDeal $3 damage.", 6, "5", "12"),
      _entity("A_001", 10, "Imp", "Deal $1 damage.", 1, "1", "9", card_set="3"),
      _entity("CORE_A_001", 30, "Imp", "Deal $1 damage.", 1, "2", "9"),  # a reprint
      _entity("HERO_01", 40, "Hero", "", 0, "5", "9", card_type="3"),    # not playable
      _entity("TOKEN_01", 50, "Token", "", 0, "1", "9", collectible="0"),
      _entity("C_003", 60, "Priest", "Heal.", 5, "4", "6"),
  ]
  path = tmp_path / "CardDefs.xml"
  path.write_text(_XML.format(entities="\n".join(entities)))
  cards = cards_example.read_cards(str(path))
  assert [c["card_id"] for c in cards] == ["A_001", "B_002", "C_003"]  # database-id order
  columns = cards_example.table(cards)
  assert columns["text"][1] == "Ogre. Taunt Deal 3 damage."  # markup gone, one line
  np.testing.assert_array_equal(columns["expensive"], [0, 1, 1])
  np.testing.assert_array_equal(columns["elite"], [0, 1, 1])   # legendary, epic
  np.testing.assert_array_equal(columns["neutral"], [0, 1, 0])
  np.testing.assert_array_equal(columns["early"], [1, 0, 0])  # below the median id (20)


def test_set_sequences_are_sets_in_id_order_cut_into_rows():
  ids = np.array([f"S_{i:03d}" for i in range(40)] + ["T_001", "U_001", "U_000"])
  sets = np.array(["s"] * 40 + ["t", "u", "u"])
  rows = cards_example.set_sequences(ids[::-1].copy(), sets[::-1].copy())
  # Set s: 40 cards in rows of 16, 16, 8; set t: one card, no sequence; set u: two, in order.
  assert rows.shape == (4, 16)
  assert list(rows[0]) == [f"S_{i:03d}" for i in range(16)]
  assert list(rows[2][:8]) == [f"S_{i:03d}" for i in range(32, 40)] and rows[2][8] == ""
  assert list(rows[3][:2]) == ["U_000", "U_001"]
