r"""The whole job: dataset, the four training stages with their ablations, evaluation, report.

Launch (the README's main command runs this on the default synthetic world):
  python -m modit_jax.cli.pipeline --config=configs/pipeline.py --workdir=out/pipeline
On your own catalog (see docs/byo_catalog.md):
  python -m modit_jax.cli.pipeline --config=configs/pipeline.py --config.dataset=DIR --workdir=OUT
Variants: `configs/pipeline.py:tiny` (the tests' world and models), `:no_ablations` (the main
methods only), combinable as `:tiny,no_ablations`.

Every run holds its whole stage config (`runs.<name>.stage`, built here by the stage config
files of configs/, the `<file>:<variant>` in `runs.<name>.source`), so any field of any run can
be set from the command line, e.g. `--config.runs.hppo.stage.hppo.beta=300`. The sizes and the
seed are held at 0 (-1 for the seed) in every run: the pipeline fills them from its own fields
below, the sizes by the rules of docs/sizing.md, unless a run sets its own
(`--config.runs.hppo.stage.seed=1`). A run starts from the run named in
`runs.<name>.init_from`; `runs.<name>.method` is the evaluation method that reads it. A
finished run is skipped when the pipeline is run again.
"""

import ml_collections

from modit_jax import config_files
from modit_jax import hppo
from modit_jax import training
from modit_jax import variants
from modit_jax import workflow

# The stage config files beside this one, loaded by path: binaries run from any directory.
cpt_config = config_files.sibling(__file__, "cpt")
evaluate_config = config_files.sibling(__file__, "evaluate")
hppo_config = config_files.sibling(__file__, "hppo")
pretrain_config = config_files.sibling(__file__, "pretrain")
sft_config = config_files.sibling(__file__, "sft")
synthetic_config = config_files.sibling(__file__, "synthetic")

_STAGE_CONFIGS = {"pretrain": pretrain_config, "cpt": cpt_config, "sft": sft_config,
                  "hppo": hppo_config}


def _run(source: str, init_from: str, method: str,
         ablation: bool = False) -> ml_collections.ConfigDict:
  """A run: the stage config `source` ("<file>:<variant>" of configs/) and where it starts."""
  name, _, variant = source.partition(":")
  # The sizes and the seed are the pipeline's (`workflow.run_stage_config`) unless set per run.
  stage = workflow.mark_pipeline_fields(_STAGE_CONFIGS[name].get_config(variant or None))
  return ml_collections.ConfigDict(dict(stage=stage, source=source, init_from=init_from,
                                        method=method, ablation=ablation))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the pipeline config; `arg`: comma-separated from tiny, no_ablations."""
  tokens = variants.parse(arg, ("tiny", "no_ablations"), "pipeline")
  tiny = "tiny" in tokens
  variant = "tiny" if tiny else ""
  def with_variant(name: str, extra: str = "") -> str:
    joined = variants.join(variant, extra)
    return f"{name}:{joined}" if joined else name

  c = ml_collections.ConfigDict()
  c.dataset = ""                   # an existing catalog; "" generates `world` into OUT/dataset
  c.world = synthetic_config.get_config(variant or None)
  # The ablation runs (order, SFT-only, candidate policies): "all", "none", or "auto": on the
  # generated synthetic world only, where the paper's claims are checked. On a given catalog
  # the four main runs fit the time budget at the width its dimension needs (docs/sizing.md);
  # `--config.ablations=all` adds the ablations there.
  c.ablations = "none" if "no_ablations" in tokens else "auto"
  c.runs = ml_collections.ConfigDict()
  c.runs.pretrain = _run(with_variant("pretrain"), "", "pretrained_gr")
  c.runs.cpt = _run(with_variant("cpt"), "pretrain", "modit_cpt")
  c.runs.sft = _run(with_variant("sft"), "cpt", "modit_sft")
  c.runs.hppo = _run(with_variant("hppo"), "sft", "modit_hppo")
  c.runs.cpt_random = _run(with_variant("cpt", "random"), "pretrain", "order_random", True)
  c.runs.cpt_reversed = _run(with_variant("cpt", "reversed"), "pretrain", "order_reversed",
                             True)
  c.runs.sft_only = _run(with_variant("sft"), "pretrain", "modit_sft_only", True)
  for policy in hppo.DEFAULT_POLICIES:
    c.runs[f"hppo_no_{policy}"] = _run(with_variant("hppo", f"no_{policy}"), "sft",
                                       f"hppo_no_{policy}", True)
  # The training seed of every run (initialisation, clusters, batches, pools) and of the
  # evaluation's sampling and bootstrap; the protocol trains each test world with its own.
  c.seed = 0
  c.final_run = "hppo"             # what `Retriever.from_workdir(OUT)` serves
  # Catalog-dependent sizes applied to every run; 0 takes each from its rule on the catalog
  # (modit_jax/sizing.py, docs/sizing.md): the latent clusters, the seed-set size (the SFT
  # context size and the CPT trajectory length) and the model width.
  c.num_clusters = 0
  c.seed_size = 0
  c.model_width = 0
  if tiny:
    # The tests' sizes: the tiny stage configs' clusters and width, whatever the rules say.
    tiny_stage = training.default_config("tiny")
    c.num_clusters = tiny_stage.num_clusters
    c.model_width = tiny_stage.model.width
  # Whether SFT and HPPO read the catalog offsets (their evidence tokens, the anchor's step and
  # HPPO's `catalog_offset` candidates, docs/evidence.md): "auto" when a step along the offset
  # beats the seeds' mean on validation queries in more than half the domains
  # (workflow.catalog_offsets_rule, docs/sizing.md); "on" / "off" as the runs are configured /
  # none of them.
  c.catalog_offsets = "auto"
  # Every run's `model.dtype` ("": the stage configs' float32); bfloat16 is mixed precision,
  # faster on accelerators and CPUs with bfloat16 units (docs/engine.md).
  c.model_dtype = ""

  c.evaluate = evaluate_config.get_config(variant or None)
  # seed_centroid: what a generator must beat on real catalogs, where no baseline moves off it
  # (docs/real_data.md); centroid_global_shift, local_shift, neighbourhood_offset: the simple
  # competitors, each tested on its own beside the per-domain strongest (chosen on validation
  # queries, it can miss the one that is strongest on a test cell: docs/statistics.md);
  # order_random, order_reversed: does metric order beat them; modit_hppo: what each policy
  # ablation costs.
  c.evaluate.references = ",".join([
      "strongest_baseline", "modit_sft", "pretrained_gr", "seed_centroid",
      "centroid_global_shift", "local_shift", "neighbourhood_offset", "order_random",
      "order_reversed", "modit_hppo"])
  c.index_kind = "scann"           # OUT/index, the serving index of the Retriever
  return c
