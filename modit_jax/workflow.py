"""The one-command pipeline: dataset, training runs, serving index, evaluation and report.

`run_pipeline(config, out)` lays out one directory:

  OUT/dataset/        the catalog (generated from `config.world`, or `config.dataset` is used)
  OUT/<run>/          one training workdir per run of `config.runs` (pretrain, cpt, sft, hppo,
                      and the ablations), each resumable; a finished run is skipped
  OUT/cache/          the predictor density and latent clusters, computed once for all runs
  OUT/index/          the serialized ScaNN index of the whole catalog (for `Retriever`)
  OUT/eval/           report.md, results.json, retrieved/ of the evaluation binary
  OUT/report.md       the pipeline report: the 8-cell table, plots (OUT/plots/), timings
  OUT/pipeline.json   what `Retriever.from_workdir(OUT)` reads: final run, dataset, index

`run_protocol(config, out)` runs the pipeline on each test world into OUT/world_<seed>/ and
pools them (modit_jax/pooling.py) into OUT/results.json and OUT/report.md.
"""

import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from modit_jax import baselines
from modit_jax import catalog as catalog_lib
from modit_jax import errors
from modit_jax import evaluation
from modit_jax import evidence
from modit_jax import hppo
from modit_jax import models
from modit_jax import novelty
from modit_jax import oracle as oracle_lib
from modit_jax import pooling
from modit_jax import properties
from modit_jax import report
from modit_jax import results_markdown
from modit_jax import retrieval
from modit_jax import retriever
from modit_jax import run_dir
from modit_jax import sequence_locality
from modit_jax import sizing
from modit_jax import synthetic
from modit_jax import training
from modit_jax import variants

DATASET_DIR = "dataset"
INDEX_DIR = "index"
EVAL_DIR = "eval"
EVAL_INPUTS_FILE = "inputs.json"  # in OUT/eval: what the saved results were computed from
CACHE_DIR = "cache"  # predictor density and latent clusters shared by the runs
SIZES_FILE = "sizes.json"  # the catalog-dependent sizes of every run, and their rules


ABLATION_CHOICES = ("auto", "all", "none")


def with_ablations(config: ml_collections.ConfigDict) -> bool:
  """Whether the ablation runs are trained: `config.ablations`, "auto" = on a generated world."""
  if config.ablations not in ABLATION_CHOICES:
    raise errors.UserError(f"ablations must be one of {', '.join(ABLATION_CHOICES)}; got "
                           f"{config.ablations!r}")
  return config.ablations == "all" or (config.ablations == "auto" and not config.dataset)


def _training_of(run: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a run trains: its start and stage config, an HPPO run's policies as trained on."""
  stage = run.stage.to_dict()
  if run.stage.stage == "hppo":
    stage["hppo"]["policies"] = ",".join(hppo.policies_trained_on(run.stage))
  return {"init_from": run.init_from, "stage": stage}


def twin_runs(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Ablation runs that would train exactly what a main run trains: {ablation: main run}.

  An HPPO ablation of a policy that only enters the pools is one, when its run builds no pool
  (`hppo.policies_trained_on`): it is not trained or evaluated, and the report says so.
  """
  main = {name: _training_of(run) for name, run in config.runs.items() if not run.ablation}
  twins = {}
  for name, run in config.runs.items():
    if run.ablation:
      training_of = _training_of(run)
      twins.update({name: m for m, t in main.items() if t == training_of})
  return twins


def target_twin(config: ml_collections.ConfigDict, name: str,
                workdirs: dict[str, str]) -> tuple[str, list[str]] | None:
  """The finished main run an HPPO ablation would train again exactly, judged by its targets.

  A run that is HPPO's regression phase alone (`hppo.regression_only`) trains on each fit
  query's best candidate and on nothing else of its candidates. An ablation that leaves out
  policies none of whose candidates was any query's best in a main run's targets (the shares
  that run logged, `hppo.BEST_SHARE_KEY`) draws the same targets, so the same batches and
  updates: the other policies' candidates do not depend on which policies are in the pool.

  Returns:
    (the main run, the policies left out), or None when `name` is not such a twin of a run in
    `workdirs` (runs trained or found finished so far).
  """
  run = config.runs[name]
  if not run.ablation or run.stage.stage != "hppo" or not hppo.regression_only(run.stage):
    return None

  def policies_and_rest(training_of: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    stage = dict(training_of["stage"])
    stage["hppo"] = dict(stage["hppo"])
    return variants.split(stage["hppo"].pop("policies")), {**training_of, "stage": stage}

  own, rest = policies_and_rest(_training_of(run))
  for main, workdir in workdirs.items():
    main_run = config.runs[main]
    if main_run.ablation or main_run.stage.stage != "hppo":
      continue
    policies, main_rest = policies_and_rest(_training_of(main_run))
    left_out = [p for p in policies if p not in own]
    if (rest != main_rest or not left_out or not set(own) <= set(policies)
        or run_dir.latest_step(workdir) < int(main_run.stage.num_steps)):
      continue
    try:
      metrics = report.load_metrics(workdir)
    except FileNotFoundError:
      continue
    shares = [metrics.get(hppo.BEST_SHARE_KEY + p) for p in left_out]
    logged = [s[~np.isnan(s)] if s is not None else np.empty(0) for s in shares]
    if all(len(s) and np.all(s == 0.0) for s in logged):
      return main, left_out
  return None


def ordered_runs(config: ml_collections.ConfigDict) -> list[str]:
  """Run names in an order where each run comes after the run it starts from.

  Ablations are left out where `with_ablations` says so, and where they are `twin_runs`.
  """
  ablations = with_ablations(config)
  twins = twin_runs(config) if ablations else {}
  runs = {name: run for name, run in config.runs.items()
          if (ablations or not run.ablation) and name not in twins}
  order: list[str] = []

  def visit(name: str, path: tuple[str, ...]) -> None:
    if name in order:
      return
    if name in path:
      raise errors.UserError(f"runs form a cycle: {' -> '.join(path + (name,))}")
    if name not in runs:
      raise errors.UserError(f"run {path[-1]!r} starts from unknown run {name!r}")
    parent = runs[name].init_from
    if parent:
      visit(parent, path + (name,))
    order.append(name)

  for name in runs:
    visit(name, ())
  if config.final_run not in runs:
    raise errors.UserError(f"final_run {config.final_run!r} is not among the runs "
                           f"({', '.join(runs)})")
  return order


def _dataset(config: ml_collections.ConfigDict, out: str,
             notes: list[str]) -> tuple[str, catalog_lib.Catalog]:
  """(path, loaded catalog): the given one, OUT/dataset reused, or a generated world.

  Loaded (so validated) here, before hours of training, and once for the whole pipeline.
  """
  if config.dataset:
    notes.append(f"dataset: `{os.path.abspath(config.dataset)}` (given)")
    return config.dataset, catalog_lib.load_catalog(config.dataset, mmap=True)
  path = os.path.join(out, DATASET_DIR)
  if os.path.isfile(os.path.join(path, "manifest.json")):
    logging.info("Reusing the dataset in %s", path)
    notes.append(f"dataset: `{path}` (reused)")
    return path, catalog_lib.load_catalog(path, mmap=True)
  start = time.perf_counter()
  synthetic.write_world(config.world, path)
  catalog = catalog_lib.load_catalog(path, mmap=True)
  note = f"dataset: `{path}`, generated in {time.perf_counter() - start:.0f} s"
  if config.world.check_properties:
    found, table, _ = properties.check_world(catalog, config.world)
    with open(os.path.join(path, "properties.md"), "w") as f:
      f.write(table)
    failed = [p.name for p in found if not p.holds]
    if failed and config.world.properties_required:
      raise errors.UserError(f"the generated world fails required properties: {failed}; "
                             f"see {path}/properties.md")
    note += ("; all properties hold" if not failed else
             f"; properties not holding (not required here): {len(failed)}")
  notes.append(note)
  return path, catalog


def _sizes(config: ml_collections.ConfigDict, catalog: catalog_lib.Catalog, out: str,
           notes: list[str], index: retrieval.Index | None = None) -> sizing.Sizes:
  """The catalog-dependent sizes (sizing.choose) and whether the conditioned runs read the
  catalog offsets (`catalog_offsets_rule`), printed and written to OUT/sizes.json."""
  sizes = sizing.choose(catalog, seed_size=int(config.seed_size),
                        num_clusters=int(config.num_clusters), width=int(config.model_width))
  read, rule = catalog_offsets_rule(config, catalog, index)
  sizes = dataclasses.replace(sizes, catalog_offsets=read,
                              rules={**sizes.rules, "catalog_offsets": rule})
  for line in sizes.lines():
    logging.info("Size from the catalog: %s", line)
    print(f"size: {line}", flush=True)
  notes.append("sizes from the catalog (docs/sizing.md): " + "; ".join(sizes.lines()))
  with open(os.path.join(out, SIZES_FILE), "w") as f:
    json.dump(sizes.as_dict(), f, indent=1)
  return sizes


CATALOG_OFFSET_CHOICES = ("auto", "on", "off")


def catalog_offsets_rule(config: ml_collections.ConfigDict, catalog: catalog_lib.Catalog,
                         index: retrieval.Index | None = None) -> tuple[bool, str]:
  """Whether the conditioned runs read the catalog offsets, and the rule that said so.

  `config.catalog_offsets` "on" / "off" decides; "auto" asks the validation queries (train
  queries, the train oracle's labels: what the baselines' knobs read) the question the
  anchor's step answers: per domain, does stepping `training.ANCHOR_OFFSET_STEP` from the
  seeds' mean along the offset of their `training.CATALOG_OFFSETS[0]` nearest catalog items
  beat the seeds' mean by more than the knobs' noise tolerance (`neighbourhood_offset` tuned
  on that two-point grid)? The runs read the offsets when it does in more than half the
  domains (a strict majority: with random labels a step passed the tolerance in up to 2 of 4
  domains). On catalogs where it does not (the music catalog: in no domain), the anchor moved
  the model off the seeds' pattern (docs/sizing.md, "Catalog offsets by validation").
  `index`: the pipeline's index over the catalog, searched when it is the default one
  (`evidence.offset_index`).
  """
  choice = config.catalog_offsets
  if choice not in CATALOG_OFFSET_CHOICES:
    raise errors.UserError(f"catalog_offsets must be one of {', '.join(CATALOG_OFFSET_CHOICES)}"
                           f"; got {choice!r}")
  if choice != "auto":
    return choice == "on", "set in the config"
  if len(catalog.queries["train"]) < 2:
    return False, "no validation queries to decide on: not read"
  size, step = training.CATALOG_OFFSETS[0], training.ANCHOR_OFFSET_STEP
  evaluate = config.evaluate
  oracle = oracle_lib.OnlineOracle(catalog, evaluate.oracle_k, evaluate.oracle_index_kind,
                                   evaluate.search_share)
  fitted = baselines.fit_neighbourhood_offset(
      catalog, oracle, evidence.offset_index(catalog.embeddings, index), [size], [0.0], [step])
  stepped = [d for d, knob in fitted.knob.items() if knob["step"] > 0]
  read = 2 * len(stepped) > catalog.num_domains
  return read, (f"validation Joint@{oracle.k}: a step of {step:g} along the {size}-item "
                f"catalog offset beats the seeds' mean in {len(stepped)} of "
                f"{catalog.num_domains} domains ({', '.join(stepped) or 'none'}); read in more "
                f"than half")


def without_catalog_offsets(config: ml_collections.ConfigDict) -> list[str]:
  """Sets every run of `config` to read no catalog offsets (`training.set_catalog_offsets`:
  no offset tokens, no anchor step along them, no `catalog_offset` candidates in HPPO's
  pools); returns the runs it changed."""
  changed = []
  for name, run in config.runs.items():
    before = run.stage.to_dict()
    training.set_catalog_offsets(run.stage, False)
    if run.stage.to_dict() != before:
      changed.append(name)
  return changed


def _sequence_note(catalog: catalog_lib.Catalog, notes: list[str]) -> None:
  """Prints and notes how local the raw sequences are (what stage 1 can learn from them)."""
  found = sequence_locality.measure(catalog)
  if found is None:
    return
  line = found.line()
  (logging.warning if found.low else logging.info)("%s", line)
  print(found.message(), flush=True)
  notes.append(line)


# Run fields the pipeline fills from its sizes (docs/sizing.md) where the run leaves them at 0,
# the mark `mark_pipeline_fields` puts on every run that configs/pipeline.py builds; a run that
# sets its own value keeps it (`--config.runs.<name>.stage.model.width=...`).
SIZED_FIELDS = {"num_clusters": "num_clusters", "sft.context_size": "seed_size",
                "cpt.trajectory_length": "seed_size", "model.width": "width",
                "model.max_context": "max_context", "diffusion.target_scale": "target_scale"}
# A run's `seed` at this mark is the pipeline's `seed`.
PIPELINE_SEED = -1


def _parent(stage: ml_collections.ConfigDict, field: str) -> tuple[ml_collections.ConfigDict, str]:
  """The ConfigDict holding a dotted `field` of `stage`, and the field's last name."""
  *parents, leaf = field.split(".")
  for parent in parents:
    stage = stage[parent]
  return stage, leaf


def mark_pipeline_fields(stage: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`stage` with the fields the pipeline fills (sizes, seed) at their marks; returns it."""
  for field in SIZED_FIELDS:
    node, leaf = _parent(stage, field)
    node[leaf] = type(node[leaf])(0)
  stage.seed = PIPELINE_SEED
  return stage


def run_stage_config(config: ml_collections.ConfigDict, name: str, sizes: sizing.Sizes,
                     out: str) -> ml_collections.ConfigDict:
  """The stage config that run `name` trains with: its own, the pipeline's fields filled in."""
  run = config.runs[name]
  stage = ml_collections.ConfigDict(run.stage.to_dict())  # the pipeline's config stays as given
  stage.init_from = os.path.join(out, run.init_from) if run.init_from else ""
  stage.data_cache = os.path.join(out, CACHE_DIR)
  if stage.seed == PIPELINE_SEED:
    stage.seed = int(config.seed)
  for field, size in SIZED_FIELDS.items():
    node, leaf = _parent(stage, field)
    if not node[leaf]:
      node[leaf] = getattr(sizes, size)
    else:
      logging.info("Run %s keeps its own %s = %s (the pipeline's: %s)", name, field, node[leaf],
                   getattr(sizes, size))
  if config.model_dtype:
    stage.model.dtype = config.model_dtype
  return stage


def _train_runs(config: ml_collections.ConfigDict, sizes: sizing.Sizes, dataset: str, out: str,
                notes: list[str], index: retrieval.Index | None = None) -> dict[str, str]:
  workdirs = {}
  if with_ablations(config):
    for name, twin in twin_runs(config).items():
      notes.append(f"run `{name}`: not trained, it would train exactly what `{twin}` trains "
                   "(the same start and config once the candidate policies that never reach "
                   "its updates are set aside: they only enter HPPO's pools, and it builds none)")
  for name in ordered_runs(config):
    run = config.runs[name]
    twin = target_twin(config, name, workdirs)
    if twin:
      main, left_out = twin
      logging.info("Run %s: not trained, it would train %s again exactly", name, main)
      notes.append(
          f"run `{name}`: not trained, it would train exactly what `{main}` trains: "
          f"{', '.join(left_out)} gave no fit query its best candidate in `{main}`'s "
          f"regression targets (its logged best share is 0), so its targets, batches and "
          f"updates are `{main}`'s")
      continue
    stage = run_stage_config(config, name, sizes, out)
    workdir = os.path.join(out, name)
    workdirs[name] = workdir
    if run_dir.latest_step(workdir) >= stage.num_steps:
      training.check_finished_run(stage, dataset, workdir)
      logging.info("Run %s is finished (%s); skipped", name, workdir)
      notes.append(f"run `{name}` ({run.source}): finished earlier, skipped")
      continue
    logging.info("Run %s: %s from %s", name, run.source, stage.init_from or "scratch")
    start = time.perf_counter()
    training.train(stage, dataset, workdir, catalog_index=index)
    notes.append(f"run `{name}` ({run.source}, {stage.num_steps} steps): "
                 f"{time.perf_counter() - start:.0f} s")
  return workdirs


def _evaluate(config: ml_collections.ConfigDict, catalog: catalog_lib.Catalog, dataset: str,
              out: str, workdirs: dict[str, str], notes: list[str],
              index: retrieval.Index | None = None) -> dict[str, Any]:
  eval_config = ml_collections.ConfigDict(config.evaluate.to_dict())
  eval_config.seed = int(config.seed)
  methods = evaluation.split_names(eval_config.methods, "methods")
  if catalog.attribute_directions is None:
    # The oracle yardstick reads the true attribute directions only a synthetic world has.
    methods = [m for m in methods
               if not (m in baselines.REGISTRY and baselines.REGISTRY[m].needs_truth)]
    notes.append("oracle baselines skipped: the catalog has no true attribute directions")
  for name, workdir in workdirs.items():
    method = config.runs[name].method
    if method in baselines.REGISTRY:
      raise errors.UserError(f"run {name}'s method name {method!r} is a baseline's: name the "
                             "run's method otherwise (runs.<name>.method)")
    eval_config.workdirs[method] = workdir
    if method not in methods:
      methods.append(method)
  eval_config.methods = ",".join(methods)
  eval_dir = os.path.join(out, EVAL_DIR)
  # What the evaluation depends on besides the dataset: its config and each model's checkpoint.
  inputs = {"config": json.loads(eval_config.to_json_best_effort()),
            "checkpoints": {name: run_dir.latest_step(workdir)
                            for name, workdir in workdirs.items()}}
  inputs_path = os.path.join(eval_dir, EVAL_INPUTS_FILE)
  results_path = os.path.join(eval_dir, "results.json")
  if os.path.isfile(results_path) and os.path.isfile(inputs_path):
    with open(inputs_path) as f:
      if json.load(f) == inputs:
        notes.append(f"evaluation of {len(methods)} methods: unchanged inputs, reused")
        with open(results_path) as g:
          return json.load(g)
  start = time.perf_counter()
  result = evaluation.evaluate(catalog, eval_config, index)
  results = evaluation.write(result, eval_dir, dataset)
  results_markdown.write_evaluation_report(eval_dir, results)
  with open(inputs_path, "w") as f:
    json.dump(inputs, f, indent=1)
  notes.append(f"evaluation of {len(methods)} methods: {time.perf_counter() - start:.0f} s")
  with open(results_path) as f:
    return json.load(f)


def _write_serving_files(config: ml_collections.ConfigDict, out: str, dataset: str,
                         results: dict[str, Any]) -> None:
  """pipeline.json for `Retriever.from_workdir(OUT)`, and the final run's tuned guidance."""
  final = config.runs[config.final_run]
  knob = results.get("knobs", {}).get(final.method)
  saved = {"guidance_scale": knob} if knob else {}
  # The novelty gate serves as it was evaluated, when the final method was evaluated gated.
  gate = results.get(novelty.JSON_KEY)
  if gate and final.method in gate["methods"]:
    saved[novelty.JSON_KEY] = gate["gate"]
  if saved:
    with open(os.path.join(out, config.final_run, retriever.GUIDANCE_FILE), "w") as f:
      json.dump(saved, f, indent=1)
  with open(os.path.join(out, retriever.PIPELINE_FILE), "w") as f:
    json.dump({"final_workdir": config.final_run,
               "dataset": os.path.relpath(os.path.abspath(dataset), os.path.abspath(out)),
               "index": INDEX_DIR}, f, indent=1)


def use_compilation_cache(out: str) -> None:
  """Points JAX's persistent compilation cache at OUT/cache/xla, unless one is set already.

  For the binaries, before anything compiles: runs of the same shapes (an ablation and its main
  run, a resumed run, another test world, the evaluation's samplers) then compile once, about
  6 s of each HPPO ablation's start on 2 CPU cores. A cached executable is the one a compile
  would give, so results do not change. JAX reads the setting at its first compile, so a
  process that has compiled before keeps what it had (a process-wide setting, which is why the
  library functions leave it alone).
  """
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, CACHE_DIR, "xla"))


def run_pipeline(config: ml_collections.ConfigDict, out: str) -> str:
  """Runs everything into `out` (resumable); returns the path of OUT/report.md."""
  start = time.perf_counter()
  # Checked before the dataset is made, which can take minutes.
  if config.model_dtype:
    models.compute_dtype(config.model_dtype, "model_dtype", may_be_empty=True)
  os.makedirs(out, exist_ok=True)
  notes: list[str] = []
  dataset, catalog = _dataset(config, out, notes)
  # The serving index first: the offsets rule, the runs that read the catalog offsets and the
  # evaluation search it (when it is the default index) instead of each building its own.
  index_start = time.perf_counter()
  index = retrieval.load_or_build_index(os.path.join(out, INDEX_DIR), catalog.embeddings,
                                        config.index_kind)
  notes.append(f"serving index ({config.index_kind}): {time.perf_counter() - index_start:.0f} s")
  sizes = _sizes(config, catalog, out, notes, index)
  if not sizes.catalog_offsets:
    config = ml_collections.ConfigDict(config.to_dict())  # the caller's config stays as given
    changed = without_catalog_offsets(config)
    if changed:
      notes.append(f"catalog offsets not read by {', '.join(changed)} "
                   f"({sizes.rules['catalog_offsets']})")
  _sequence_note(catalog, notes)
  workdirs = _train_runs(config, sizes, dataset, out, notes, index)
  results = _evaluate(config, catalog, dataset, out, workdirs, notes, index)
  _write_serving_files(config, out, dataset, results)
  notes.append(f"total: {time.perf_counter() - start:.0f} s")
  return report.write_pipeline_report(out, results, workdirs, title="MO-DiT+HPPO pipeline report",
                                      notes=notes)


def _properties_note(dataset: str) -> str:
  """Which design properties (DESIGN.md section 4) a generated world's properties.md misses."""
  path = os.path.join(dataset, "properties.md")
  if not os.path.isfile(path):
    return "properties not checked"
  with open(path) as f:
    missed = [line.split("|")[1].strip() for line in f if line.rstrip().endswith("| NO |")]
  return ("all design properties hold" if not missed else
          "properties that do not hold: " + "; ".join(missed))


def world_pipeline(config: ml_collections.ConfigDict, world: int) -> ml_collections.ConfigDict:
  """The pipeline config of test world `world`: its generator seed, and its training seed.

  The training seed is the world's seed plus `config.training_seed_offset` (0 by default), so
  the same worlds can be retrained with other seeds to see what the training seed alone moves.
  """
  offset = int(config.get("training_seed_offset", 0))
  if offset < 0:
    raise errors.UserError(f"config.training_seed_offset must be >= 0, got {offset}")
  pipeline = ml_collections.ConfigDict(config.pipeline.to_dict())
  pipeline.world.seed = int(world)
  pipeline.seed = int(world) + offset
  return pipeline


def run_protocol(config: ml_collections.ConfigDict, out: str) -> str:
  """Runs the pipeline on every test world and pools them; returns OUT/report.md's path."""
  start = time.perf_counter()
  worlds = [int(w) for w in config.worlds]
  if not worlds or len(set(worlds)) != len(worlds):
    raise errors.UserError(f"config.worlds must be distinct generator seeds, got {worlds}")
  if 0 in worlds:
    raise errors.UserError("world 0 is the development world every decision looked at; the "
                           "protocol's test worlds must be other seeds")
  if config.pipeline.dataset:
    raise errors.UserError("the protocol generates its worlds; config.pipeline.dataset must "
                           "be empty")
  references = evaluation.split_names(config.references, "references")
  os.makedirs(out, exist_ok=True)
  notes, world_data = [], {}
  for world in worlds:
    pipeline = world_pipeline(config, world)
    world_dir = os.path.join(out, f"world_{world}")
    world_start = time.perf_counter()
    logging.info("Protocol: world %d into %s", world, world_dir)
    print(f"protocol: world {world} ({world_dir})", flush=True)
    run_pipeline(pipeline, world_dir)
    world_data[str(world)] = (os.path.join(world_dir, DATASET_DIR),
                              os.path.join(world_dir, EVAL_DIR))
    notes.append(f"world {world}: generator seed {world}, training seed {pipeline.seed}, "
                 f"`{world_dir}` "
                 f"({time.perf_counter() - world_start:.0f} s); "
                 + _properties_note(os.path.join(world_dir, DATASET_DIR)))
  pooled = pooling.pool(world_data, references, int(config.num_resamples), int(config.seed))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(pooled, f, indent=1)
    f.write("\n")
  notes.append(f"total: {time.perf_counter() - start:.0f} s")
  gaps = pooling.gap_closed(pooled["records"])
  sections = [f"## Per world: significant cells against `{ref}`\n\n"
              + pooling.per_world_table(pooled, ref) for ref in references]
  sections.append("## Spread over worlds: lowest–highest world's Joint@20 per cell\n\n"
                  + pooling.spread_table(pooled))
  if gaps:
    sections.append("## Share of the Joint@20 gap from `seed_centroid` to `oracle_shift` "
                    "closed (mean over the pooled cells)\n\n"
                    + "\n".join(f"- `{m}`: {g:.2f}" for m, g in gaps.items()) + "\n")
  return report.write_pipeline_report(
      out, pooled, {}, title=f"Protocol report: {len(worlds)} test worlds, cells pooled",
      notes=notes, sections=sections)
