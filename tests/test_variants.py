"""Comma-separated config strings: one splitting rule for variants and name lists."""

import pytest

from modit_jax import variants


def test_split_strips_and_drops_blanks_in_order():
  assert variants.split(" b, a ,,c ") == ["b", "a", "c"]
  assert variants.split("") == [] and variants.split(None) == [] and variants.split(" , ") == []


def test_parse_drops_default_and_names_the_known_tokens_on_an_unknown_one():
  assert variants.parse("tiny, default,,no_policy", ("tiny", "no_policy"), "hppo") == [
      "tiny", "no_policy"]
  assert variants.parse(None, ("tiny",), "stage") == []
  with pytest.raises(ValueError, match="unknown stage config variant magic; known: tiny"):
    variants.parse("tiny,magic", ("tiny",), "stage")


def test_join_is_the_inverse_of_split_for_non_empty_tokens():
  assert variants.split(variants.join("tiny", "", "no_policy")) == ["tiny", "no_policy"]
