r"""The embedded synthetic world (DESIGN.md section 4).

Launch:
  python -m modit_jax.cli.make_dataset --config=configs/synthetic.py --out=out/default/dataset
Variants: `configs/synthetic.py:tiny` (tests, seconds), `configs/synthetic.py:large`
(10M items, generated in chunks; scale runs), and `diffuse` (alone or with a size, e.g.
`:tiny,diffuse`): sibling patterns that overlap, a stress world for the novelty gate
(docs/novelty.md, "A world whose patterns overlap").
"""

import ml_collections

from modit_jax import variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the world config; `arg`: a size in {'default', 'tiny', 'large'}, and 'diffuse'."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dim = 64
  c.num_topics = 40
  c.patterns_per_topic = 10          # 400 patterns
  c.items_per_pattern = 250          # 100k items
  c.topics_per_chunk = 40            # generation chunk; results do not depend on it
  c.sibling_spread = 0.6             # pattern centre offset from its topic (sets the tension)
  c.num_shared_axes = 4
  c.num_local_axes = 4
  c.shared_scale = 0.1
  c.local_scale = 0.1
  c.noise_scale = 0.01
  c.smooth_map_gain = 3.0            # slope of h_m's smooth random map of the pattern centre
  c.domains = ("quality", "safety", "popularity", "length")
  c.alpha = (0.8, 0.5, 0.3, 0.1)     # weight of the shared axis in w(m, p), per domain
  c.positive_rate = (0.08, 0.25)     # r(m, p) range
  c.seed_quantile = 0.6              # seeds come from the lower 60 % along w(m, p)
  c.seed_size = 8
  c.pattern_holdout_fraction = 0.15
  c.item_holdout_fraction = 0.2
  c.observed_fraction = 0.1
  c.num_queries = ml_collections.ConfigDict(
      dict(train=1000, item_holdout=250, pattern_holdout=250))  # per domain
  c.sequences_per_topic = 500
  c.sequence_length = 16
  c.min_sequence_length = 4
  c.sibling_hop_probability = 0.05
  # The property check after generation (DESIGN.md section 4) evaluates four baselines with
  # the evaluation defaults and this index kind.
  c.check_properties = True
  c.check_index_kind = "scann"
  # The properties are promised at the default size; smaller worlds print them for information.
  c.properties_required = True

  tokens = variants.parse(arg, ("tiny", "large", "diffuse"), "synthetic")
  diffuse = "diffuse" in tokens
  tokens = [t for t in tokens if t != "diffuse"]
  if len(tokens) > 1:
    raise ValueError(f"synthetic config variants {', '.join(tokens)}: choose one size")
  if tokens == ["tiny"]:
    c.num_topics = 6
    c.patterns_per_topic = 5         # 30 patterns
    c.items_per_pattern = 120        # 3,600 items
    c.topics_per_chunk = 2
    c.dim = 32
    c.item_holdout_fraction = 0.25
    c.observed_fraction = 0.3        # enough labels for a predictor on 2,400 train items
    c.num_queries = ml_collections.ConfigDict(
        dict(train=100, item_holdout=40, pattern_holdout=40))
    c.sequences_per_topic = 100
    c.check_index_kind = "exact"
    c.properties_required = False  # 120 items per pattern: too few positives for Bound@20 = 1
  elif tokens == ["large"]:
    c.num_topics = 4000
    c.items_per_pattern = 250        # 10M items
    c.topics_per_chunk = 100         # 250k items (64 MB of embeddings) per chunk
    c.num_queries = ml_collections.ConfigDict(
        dict(train=10000, item_holdout=1000, pattern_holdout=1000))
    # The check needs a full-catalog index; at 10M items run `evaluate` explicitly instead.
    c.check_properties = False
  if diffuse:
    # Sibling centres 3x closer and 10x the isotropic noise: a pattern's region holds its
    # siblings' items, as a text catalog's k-means clusters do (the Hearthstone cards,
    # docs/real_data.md). Seeds of an unseen pattern then often have train items nearby,
    # which the default world never shows (its regimes are separated by construction).
    c.sibling_spread = 0.2
    c.noise_scale = 0.1
    # Overlapping patterns break the separation the properties promise (the seed centroid's
    # Purity@20 falls): they are printed, not required.
    c.properties_required = False
  return c
