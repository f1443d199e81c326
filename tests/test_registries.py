"""The stage and method registries: what they hold, and that a new stage or method is one module.

docs/architecture.md says which module a new stage, baseline or generative method is.
"""

import textwrap

import numpy as np
import pytest

from configs import evaluate as evaluate_config
from configs import pretrain as pretrain_config
from modit_jax import baselines
from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import evaluation
from modit_jax import run_dir
from modit_jax import stages
from modit_jax import training


def test_the_four_stages_in_pipeline_order_with_their_facts():
  assert stages.names() == ("pretrain", "cpt", "sft", "hppo")
  config = pretrain_config.get_config("tiny")
  facts = {name: stages.get(name).facts(config) for name in stages.names()}
  assert facts["pretrain"] == run_dir.ModelFacts("pretrain", False, False)
  assert all(facts[name].conditioned for name in ("cpt", "sft", "hppo"))
  # The legacy rule for runs written before facts were recorded agrees with every stage.
  for name in stages.names():
    config.stage = name
    assert run_dir.ModelFacts.of_legacy_run(config) == facts[name]
  with pytest.raises(errors.UserError, match="unknown stage 'x'; known: pretrain, cpt, sft"):
    stages.get("x")


@pytest.fixture
def extra_stage(tmp_path, monkeypatch):
  """A fifth stage in a module of its own, found by the registry like the built-in ones.

  Stage 1's sequence batches, but domain-conditioned: each example gets a random domain.
  """
  (tmp_path / "conditioned_prefixes.py").write_text(textwrap.dedent('''
      import numpy as np
      from modit_jax import data
      from modit_jax.stages import base

      def _loop_args(inputs):
        config, catalog = inputs.config, inputs.catalog
        prefixes = data.SequencePrefixes(catalog.sequences, np.asarray(catalog.embeddings),
                                         config.model.max_context, inputs.model.num_domains,
                                         config.seed)

        def source(step, batch_size, pi, pc):
          batch = prefixes(step, batch_size, pi, pc)
          rng = np.random.default_rng(step)
          batch["domain"] = rng.integers(0, catalog.num_domains, len(batch["domain"]))
          return batch

        return base.denoising_loop_args(inputs, source)

      STAGE = base.Stage("conditioned_prefixes", order=5, conditioned=True,
                         reads_evidence=False, loop_args=_loop_args)
  '''))
  monkeypatch.setattr(stages, "__path__", [*stages.__path__, str(tmp_path)])
  stages._registry.cache_clear()  # pylint: disable=protected-access
  yield "conditioned_prefixes"
  monkeypatch.undo()
  stages._registry.cache_clear()  # pylint: disable=protected-access


def test_a_new_stage_is_one_module(extra_stage, tiny_world, tmp_path, fast_compile):
  del fast_compile
  assert stages.names()[-1] == extra_stage
  config = pretrain_config.get_config("tiny")
  config.stage, config.num_steps, config.checkpoint_every = extra_stage, 4, 4
  config.warmup_steps = 2
  workdir = str(tmp_path / "run")
  training.train(config, str(tiny_world), workdir)
  # Its run directory records its facts, which is what inference reads.
  assert run_dir.read_facts(workdir) == run_dir.ModelFacts(extra_stage, True, False)


def test_baselines_declare_what_they_read():
  registry = baselines.REGISTRY
  assert list(registry)[:4] == ["seed_centroid", "global_attribute", "centroid_global_shift",
                                "rerank"]
  yardsticks = {name for name, b in registry.items() if b.yardstick}
  assert yardsticks == {"local_shift_train_oracle", "oracle_shift"}
  assert {name for name, b in registry.items() if b.needs_truth} == {"oracle_shift"}
  assert registry["seed_centroid"].reads == frozenset()
  with pytest.raises(errors.UserError, match="unknown baseline 'x'; known: seed_centroid"):
    baselines.fit("x", None, None, None)


def test_a_new_baseline_is_one_registry_row(tiny_world, monkeypatch):
  """A row added to the registry is evaluated, reported, and can be the strongest competitor."""
  registry = dict(baselines.REGISTRY)
  registry["seed_centroid_again"] = baselines.Baseline(
      "seed_centroid_again", frozenset(), registry["seed_centroid"].fit)
  monkeypatch.setattr(baselines, "REGISTRY", registry)
  cat = catalog_lib.load_catalog(tiny_world)
  config = evaluate_config.get_config("tiny")
  config.methods = "seed_centroid,seed_centroid_again"
  config.splits = "item_holdout"
  result = evaluation.evaluate(cat, config)
  np.testing.assert_array_equal(result.retrieved["seed_centroid_again"]["item_holdout"],
                                result.retrieved["seed_centroid"]["item_holdout"])
  assert set(result.meta["validation"]) == {"seed_centroid", "seed_centroid_again"}
  assert {r["method"] for r in result.records} == {"seed_centroid", "seed_centroid_again"}
