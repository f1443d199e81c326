"""The real-catalog examples on small inputs of their own (no data package needed):
examples/hearthstone_catalog.py on a small CardDefs.xml, examples/cities_catalog.py on a few
hand-made cities, examples/hpo_catalog.py on a small ontology and its annotations,
examples/redraw_catalog.py on a small converted table."""

import importlib.util
import os

import numpy as np
import pytest

from modit_jax import byo
from modit_jax import catalog as catalog_lib
from modit_jax import errors


def _load_example(name: str):
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "examples", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


cards_example = _load_example("hearthstone_catalog")
cities_example = _load_example("cities_catalog")
hpo_example = _load_example("hpo_catalog")
redraw_example = _load_example("redraw_catalog")

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


def _city(geonameid, name, country, admin1, population, latitude, longitude, names=0):
  return {"geonameid": geonameid, "name": name, "countrycode": country, "admin1code": admin1,
          "population": population, "latitude": latitude, "longitude": longitude,
          "alternatenames": [f"n{i}" for i in range(names)]}


def test_cities_are_labelled_against_their_own_country():
  cities = [_city(1, "Alpha", "AA", "01", 20_000, 10.0, 5.0, names=12),
            _city(2, "Beta", "AA", "01", 80_000, 30.0, 1.0),
            _city(3, "Gamma", "AA", "02", 50_000, 20.0, 9.0, names=3),
            _city(4, "Delta", "BB", "01", 16_000, -40.0, 100.0),
            _city(5, "Epsilon", "BB", "01", 400_000, -30.0, 90.0, names=40)]
  columns = cities_example.table(cities, {"AA": "Aland", "BB": "Bland"})
  assert columns["text"].tolist()[:2] == ["Alpha, Aland", "Beta, Aland"]
  np.testing.assert_array_equal(columns["large"], [0, 1, 1, 0, 1])   # 50,000 or more
  np.testing.assert_array_equal(columns["famous"], [1, 0, 0, 0, 1])  # 10 or more other names
  # North / east of the median city of its own country (strictly): AA's median latitude is 20
  # and longitude 5; BB's -35 and 95. Delta and Epsilon are south of every AA city.
  np.testing.assert_array_equal(columns["north"], [0, 1, 0, 0, 1])
  np.testing.assert_array_equal(columns["east"], [0, 0, 1, 1, 0])
  # A region's cities in descending population; a region of one city gives no sequence.
  assert cities_example.region_sequences(columns).tolist() == [
      ["2", "1"] + [""] * 14, ["5", "4"] + [""] * 14]
  with pytest.raises(errors.UserError, match="unknown countries: BB"):
    cities_example.table(cities, {"AA": "Aland"})


_OBO = """format-version: 1.2

[Term]
id: HP:0000001
name: All

[Term]
id: HP:0000118
name: Phenotypic abnormality
is_a: HP:0000001 ! All

[Term]
id: HP:0000200
name: Abnormal heart
is_a: HP:0000118 ! Phenotypic abnormality

[Term]
id: HP:0000300
name: Septal defect
is_a: HP:0000200 ! Abnormal heart

[Term]
id: HP:0000400
name: Retired term
is_a: HP:0000200 ! Abnormal heart
is_obsolete: true

[Term]
id: HP:0000500
name: Heart murmur
is_a: HP:0000200 ! Abnormal heart
is_a: HP:0000300 ! Septal defect

[Term]
id: HP:0000600
name: Autosomal dominant inheritance
is_a: HP:0000001 ! All
"""

_HPOA_ROWS = [  # database_id, qualifier, hpo_id, aspect
    ("OMIM:1", "", "HP:0000300", "P"), ("OMIM:1", "", "HP:0000200", "P"),
    ("OMIM:1", "", "HP:0000300", "P"),   # the same term again, from another source
    ("OMIM:1", "", "HP:0000600", "I"),   # inheritance: not a phenotype
    ("OMIM:2", "NOT", "HP:0000500", "P"),  # negated
    ("OMIM:2", "", "HP:0000300", "P"), ("OMIM:3", "", "HP:0000300", "P"),
    ("OMIM:4", "", "HP:0000300", "P"), ("ORPHA:5", "", "HP:0000500", "P"),
    ("ORPHA:5", "", "HP:0000300", "P"), ("OMIM:2", "", "HP:0000200", "P"),
    ("OMIM:3", "", "HP:0000200", "P"), ("OMIM:3", "", "HP:0000200", "P"),
    ("OMIM:3", "", "HP:0000200", "P")]  # HP:0000200: 5 positive rows, 3 diseases


def test_hpo_terms_are_the_abnormalities_labelled_by_their_annotations():
  terms = hpo_example.read_terms(_OBO)
  assert "HP:0000400" not in terms and terms["HP:0000500"]["parents"] == ["HP:0000200",
                                                                          "HP:0000300"]
  hpoa = "#version: x\n" + "\t".join(
      ["database_id", "disease_name", "qualifier", "hpo_id", "aspect"]) + "\n" + "\n".join(
          "\t".join([d, "name", q, t, a]) for d, q, t, a in _HPOA_ROWS)
  diseases, annotated = hpo_example.read_annotations(hpoa)
  # The negated and the inheritance rows are left out, and each repeated pair is read once.
  assert list(zip(diseases, annotated))[:3] == [("OMIM:1", "HP:0000300"), ("OMIM:1", "HP:0000200"),
                                                ("OMIM:2", "HP:0000300")]
  assert len(diseases) == 9
  columns = hpo_example.table(terms, diseases, annotated)
  # Below "Phenotypic abnormality", in id order; the obsolete and the inheritance term are out.
  assert columns["item_id"].tolist() == ["HP:0000200", "HP:0000300", "HP:0000500"]
  assert columns["text"].tolist() == ["Abnormal heart", "Septal defect", "Heart murmur"]
  np.testing.assert_array_equal(columns["frequent"], [0, 1, 0])  # 5 or more diseases, not rows
  np.testing.assert_array_equal(columns["orphanet"], [0, 1, 1])
  np.testing.assert_array_equal(columns["leaf"], [0, 0, 1])      # 300 is 500's second parent
  np.testing.assert_array_equal(columns["recent"], [0, 0, 1])    # above the median id (300)
  # Each disease's terms in the file's order, a repeat once; a disease of one term gives none.
  assert hpo_example.disease_sequences(diseases, annotated, columns["item_id"]).tolist() == [
      ["HP:0000300", "HP:0000200"] + [""] * 14] * 3 + [["HP:0000500", "HP:0000300"] + [""] * 14]
  with pytest.raises(errors.UserError, match="no term below"):
    hpo_example.table({}, diseases, annotated)


def test_seed_average_probes_reduce_to_the_seed_average(tiny_world):
  probes = _load_example("seed_average_probes")
  from modit_jax import catalog as catalog_lib  # pylint: disable=g-import-not-at-top
  from modit_jax import retrieval  # pylint: disable=g-import-not-at-top
  catalog = catalog_lib.load_catalog(tiny_world)
  queries = catalog.queries["item_holdout"]
  index = retrieval.build_index(np.asarray(catalog.embeddings, np.float32), kind="exact")
  flat = np.zeros(catalog.attributes.shape, np.float32)  # a predictor that knows nothing
  rows = {name: (joint, purity) for name, joint, purity in
          probes._rows(catalog, index, flat, queries)}
  base_joint, base_purity = rows["seed average"]
  assert base_joint.shape == (len(queries),) and base_purity.mean() > 0
  for name, (joint, purity) in rows.items():
    assert ((0 <= joint) & (joint <= purity) & (purity <= 1)).all(), name
    if name.startswith("predictor"):
      # A constant logit re-scores nothing: the pool's first K are the seed average's top K.
      np.testing.assert_array_equal(joint, base_joint)
      np.testing.assert_array_equal(purity, base_purity)


def _converted(tmp_path, seed: int) -> str:
  """A small table (12 groups x 30 items, complete labels) converted with derived patterns."""
  rng = np.random.default_rng(7)
  group = np.repeat(np.arange(12), 30)
  emb = rng.normal(size=(12, 8))[group] + 0.3 * rng.normal(size=(360, 8))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = {name: (rng.random(360) < 0.3).astype(np.int8) for name in ("quality", "safety")}
  out = os.fspath(tmp_path / f"seed{seed}")
  byo.convert_arrays(np.asarray([f"sku-{i}" for i in range(360)]), emb.astype(np.float32),
                     labels, out, byo.Options(attributes=("quality", "safety"), seed_size=3,
                                              queries_per_cell=5, cluster_patterns=12,
                                              pattern_holdout_fraction=0.34, seed=seed))
  return out


def _draw(catalog: catalog_lib.Catalog) -> list[np.ndarray]:
  queries = [getattr(catalog.queries[s], f) for s in catalog_lib.SPLITS
             for f in ("seeds", "pattern", "domain")]
  return [np.asarray(catalog.patterns), np.asarray(catalog.item_split),
          np.asarray(catalog.observed), *queries]


def test_a_redraw_at_the_catalogs_seed_is_the_catalog_and_another_seed_is_a_new_draw(tmp_path):
  source = _converted(tmp_path, seed=0)
  original = catalog_lib.load_catalog(source)
  same = redraw_example.redraw(source, os.fspath(tmp_path / "again"), seed=0).catalog
  for a, b in zip(_draw(original), _draw(same)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(same.attributes, original.attributes)
  # Another seed: the conversion with that seed from the table itself, not the original draw.
  other = redraw_example.redraw(source, os.fspath(tmp_path / "other"), seed=1).catalog
  direct = catalog_lib.load_catalog(_converted(tmp_path, seed=1))
  for a, b in zip(_draw(other), _draw(direct)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(other.item_split, original.item_split)
  assert other.manifest["generator"]["options"]["seed"] == 1


def test_a_catalog_without_derived_patterns_is_refused(tiny_world, tmp_path):
  with pytest.raises(errors.UserError, match="derived patterns and a seeded split"):
    redraw_example.redraw(tiny_world, os.fspath(tmp_path / "x"), seed=1)
