"""End-to-end retrieval throughput: seed sets per second through `Retriever.retrieve_batch`.

Run from the repository root:

  python bench/end_to_end.py                           # N = 100k and 1M, random-init model
  python bench/end_to_end.py --workdir=out/default/sft # a trained model
  python bench/end_to_end.py --pipeline=out/default     # what `make main` serves, as served
  python bench/end_to_end.py --sizes=20000 --seed_sets=256 --batch_sizes=64,256 --rounds=2
  python bench/end_to_end.py --pipeline=out/default --cpu_devices=1  # one CPU device

On CPU the bench splits the machine into JAX devices as the binaries do (`--cpu_devices`,
default 4), and sampling splits its rows over them (`engine.local_row_shardings`).

One answer is the serving path of `modit_jax.cli.retrieve`: `Retriever.retrieve_batch` parses the
seed ids, pads the contexts to the next power of two of the longest seed set (at most the
model's `max_context`), samples one query embedding per seed
set by DDIM with the configured `sample_steps` and classifier-free guidance
(`Generator.sample`), and searches it with ScaNN, the seeds excluded (`search_samples`). The
bench builds that `Retriever` from in-memory parts through its constructor, so it measures the
real calls, and it times in the same run:

- end to end: `retrieve_batch` on batches of B seed sets (`--batch_sizes`);
- sampling alone: `Generator.sample` with exactly the arguments `retrieve_batch` passes it
  (per-query seeds, per-query guidance scales);
- sampling alone through a plain `jax.jit(diffusion.sample_rows)` (one key per batch, as
  `Generator` builds it, its rows split over the devices the same way), to show what the
  per-query seeding costs (not for a model that reads neighbour evidence: this sampler has no
  evidence input, and `Generator.sample` computes it);
- sampling alone with the context padded to `max_context` (what serving did before it padded
  to a power of two of the seed-set size), to show what that padding costs;
- search alone: `search_samples` on the sampled queries, ScaNN, default parameters;
- end to end without the novelty gate (docs/novelty.md): the served path runs it, one more
  k = 20 search per seed set and a k = 200 one per seed set it calls novel (its fallback's
  neighbourhood); on the synthetic catalogs it is a gate with a random split (`_bench_gate`),
  with `--pipeline` the one the pipeline saved.
The remainder of the end-to-end time is the Python around them (parsing, padding, merging).

Guidance: the scale is a traced per-query array in `Generator.sample`, so serving always runs
both classifier-free-guidance branches (conditional and null domain), whatever its value; the
bench uses `--guidance_scale=2` to make that plain.

Model: `--workdir` loads a trained one (its dim and domain count then set the catalog's). By
default the bench makes a randomly initialised model of the default stage config
(`training.default_config()`, stage "sft", so queries are domain-conditioned as served after
SFT, reading the catalog offsets as the default SFT and HPPO models do), saved as a step-0 checkpoint of a temporary training workdir and loaded by
`Generator`. The throughput does not depend on the weights: the same matmuls run whatever their
values. DiT's adaLN-Zero init zeroes the output layer, which would make every sample the zero
vector (and a degenerate query for search), so every parameter gets N(0, 0.02^2) noise added.
With such a model the queries are not meaningful embeddings, so the recall@k printed (ScaNN
against `ExactIndex` on the generated queries, seeds excluded) speaks for ScaNN on arbitrary
directions, not on a trained model's queries; pass `--workdir` for that. Next to it the bench
prints ScaNN's recall@k on queries near catalog items (bench/retrieval.py's kind).

Catalog: synthetic, d = 64 (bench/common.py's Gaussian mixture), 4 domains; each seed set is
an item and its 7 nearest neighbours (exact), so seed sets are coherent as real ones are; one
random domain per seed set. A trained model has never seen such a catalog, so its queries there
say little about recall on the catalog it serves. `--pipeline=OUT` measures that instead:
`Retriever.from_workdir(OUT)` (the pipeline's catalog, its saved ScaNN index, the final model
and the guidance tuned per domain at evaluation), asked with the seed sets and domains of the
catalog's evaluation queries (item and pattern holdout, cycled to `--seed_sets`).

All functions are timed round-robin in one run (common.round_robin) and the fastest call is
reported. The last lines are machine-readable:
`seed_sets_per_s@N=<n>,batch=<b>=<x>` and `scann_recall@<k>@N=<n>=<x>`.
"""

import argparse
import functools
import os
import sys
import tempfile
import time

import jax
import numpy as np

import common
from modit_jax import catalog as catalog_lib
from modit_jax import diffusion
from modit_jax import dit
from modit_jax import engine
from modit_jax import evaluation
from modit_jax import generator as generator_lib
from modit_jax import models
from modit_jax import novelty
from modit_jax import retrieval
from modit_jax import retriever as retriever_lib
from modit_jax import run_dir
from modit_jax import stages
from modit_jax import training

_TARGET_SEED_SETS_PER_S = 1000  # the target, at 100k items on 2 cores
_PARAM_NOISE = 0.02  # std of the noise on a random model's parameters (see the docstring)


def _parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default=None,
                      help="training workdir of a trained model; default: random-init model")
  parser.add_argument("--pipeline", default=None,
                      help="a pipeline output directory (make main's out/default): serve its "
                           "catalog, index, final model and tuned guidance, asked with its "
                           "evaluation queries' seed sets; replaces --workdir and --sizes")
  parser.add_argument("--sizes", default="100000,1000000", help="catalog sizes N")
  parser.add_argument("--dim", type=int, default=64,
                      help="embedding dimension (random model only; a workdir sets its own)")
  parser.add_argument("--domains", type=int, default=4,
                      help="number of domains (random model only)")
  parser.add_argument("--clusters", type=int, default=3000, help="mixture components")
  parser.add_argument("--seed_size", type=int, default=8, help="items per seed set")
  parser.add_argument("--seed_sets", type=int, default=2048,
                      help="seed sets per timed call (split into batches)")
  parser.add_argument("--batch_sizes", default="256,1024",
                      help="seed sets per retrieve_batch call")
  parser.add_argument("--k", type=int, default=20, help="items per answer")
  parser.add_argument("--guidance_scale", type=float, default=2.0)
  parser.add_argument("--rounds", type=int, default=3, help="timed calls per function")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cpu_devices", type=int, default=None,
                      help="JAX devices on CPU, as the binaries' --cpu_devices (default: theirs, "
                      f"{engine.DEFAULT_CPU_DEVICES}); sampling splits its rows over them")
  return parser.parse_args(argv)


def random_workdir(root: str, dim: int, num_domains: int, guidance_scale: float,
                   seed: int) -> str:
  """Writes a training workdir holding a random-init default model; returns its path."""
  config = training.default_config()
  config.stage = "sft"  # domain-conditioned, as served after SFT or HPPO
  # It reads the catalog around its seeds and is anchored along it, as the default SFT and
  # HPPO models are (configs/sft.py): serving computes those offsets per seed set.
  training.set_catalog_offsets(config, True)
  config.diffusion.guidance_scale = guidance_scale
  model = models.make_model(config.model, dim, num_domains)
  init_rng, noise_rng = jax.random.split(jax.random.PRNGKey(seed))
  params = dit.init_params(model, init_rng)
  # adaLN-Zero leaves the output layer at zero; noise makes the samples non-degenerate.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(noise_rng, len(leaves))
  params = jax.tree.unflatten(treedef, [
      p + _PARAM_NOISE * jax.random.normal(key, p.shape, p.dtype)
      for p, key in zip(leaves, keys)])
  workdir = os.path.join(root, "random_model")
  run_dir.write_run_config(workdir, config, dim, num_domains, stages.get("sft").facts(config))
  checkpointer = engine.Checkpointer(workdir)
  checkpointer.save(0, engine.create_train_state(params, engine.make_optimizer(config)),
                    force=True)
  checkpointer.close()
  return workdir


def synthetic_catalog(items: np.ndarray, num_domains: int, seed_size: int) -> catalog_lib.Catalog:
  """An in-memory catalog of `items`: only what `Retriever` reads is real.

  Patterns, splits, sequences and query files only matter to training and evaluation; they
  are empty or zero here. Attributes are random, a tenth of them observed: the model's global
  direction per domain (an evidence token) needs observed positives, and timing does not
  depend on which they are.
  """
  n, d = items.shape
  rng = np.random.default_rng(0)
  attributes = rng.random((n, num_domains)) < 0.3
  observed = rng.random((n, num_domains)) < 0.1
  observed[0] = attributes[0] = True  # every domain has an observed positive
  manifest = {"format": catalog_lib.FORMAT, "num_items": n, "dim": d,
              "domains": [f"domain{m}" for m in range(num_domains)], "seed_size": seed_size}
  return catalog_lib.Catalog(
      manifest=manifest, embeddings=items, patterns=np.zeros(n, np.int32),
      attributes=attributes, observed=observed,
      item_split=np.zeros(n, np.int8), sequences=np.zeros((0, 2), np.int32), queries={})


def seed_sets(items: np.ndarray, num: int, size: int, seed: int) -> np.ndarray:
  """int [num, size]: random anchor items, each with its size - 1 nearest neighbours."""
  rng = np.random.default_rng(seed + 3)
  anchors = rng.choice(items.shape[0], size=num, replace=False)
  ids, _ = retrieval.ExactIndex(items).search(items[anchors], size, parallel=True)
  return ids.astype(np.int64)


def _synthetic_catalogs(args: argparse.Namespace, generator: generator_lib.Generator,
                        num: int) -> list[dict]:
  """One entry per `--sizes` N: nested mixture catalogs, a ScaNN index, random domains."""
  rng = np.random.default_rng(args.seed + 4)
  domains = rng.integers(0, generator.num_domains, num).astype(np.int32)
  scales = np.full(num, args.guidance_scale, np.float32)
  sizes = [int(s) for s in args.sizes.split(",")]
  all_items = common.synthetic_items(max(sizes), generator.dim, args.clusters, args.seed)
  entries = []
  for n in sizes:
    items = all_items[:n]  # nested catalogs: every prefix is a sample of the same mixture
    start = time.perf_counter()
    index = retrieval.build_index(items, "scann")
    build_s = time.perf_counter() - start
    catalog = synthetic_catalog(items, generator.num_domains, args.seed_size)
    retriever = retriever_lib.Retriever(generator, catalog, index, args.guidance_scale,
                                        num_samples=1, seed=args.seed,
                                        gate=_bench_gate(items, generator, args.seed))
    entries.append({"n": n, "items": items, "build_s": build_s, "retriever": retriever,
                    "ids": seed_sets(items, num, args.seed_size, args.seed),
                    "domains": domains, "scales": scales})
  return entries


def _bench_gate(items: np.ndarray, generator: generator_lib.Generator,
                seed: int) -> novelty.Gate:
  """A novelty gate as a pipeline's final run is served with: 68 % train items (the default
  world's share), random unit directions, shift 0.5, and the neighbourhood offset's step 8 over
  200 items (the development world's choices). Its cost is one k = 20 search per seed set, and
  a k = 200 search per seed set it calls novel; the decision itself means nothing on this
  catalog."""
  rng = np.random.default_rng(seed + 5)
  m = generator.num_domains
  directions = rng.normal(size=(m, generator.dim)).astype(np.float32)
  return novelty.Gate(rng.random(len(items)) < 0.68,
                      directions / np.linalg.norm(directions, axis=1, keepdims=True),
                      np.full(m, 0.5, np.float32), 0.5, novelty.NEIGHBOURS,
                      np.full(m, 200, np.int64), np.full(m, 8.0, np.float32), items)


def _ungated(retriever: retriever_lib.Retriever) -> retriever_lib.Retriever:
  """The same retriever without its novelty gate: the model answers every seed set."""
  scales = dict(zip(retriever.domains, retriever.guidance_scale.tolist()))
  return retriever_lib.Retriever(retriever.generator, retriever.catalog, retriever.index,
                                 scales, retriever.num_samples, retriever.seed)


def _pipeline_catalog(retriever: retriever_lib.Retriever, num: int) -> dict:
  """The pipeline's catalog and index, its evaluation queries cycled to `num` seed sets."""
  catalog = retriever.catalog
  queries = [catalog.queries[split] for split in evaluation.EVAL_SPLITS]
  seeds = np.concatenate([q.seeds for q in queries])
  rows = np.arange(num) % len(seeds)
  domains = np.concatenate([q.domain for q in queries])[rows].astype(np.int32)
  return {"n": catalog.num_items, "items": np.asarray(catalog.embeddings), "build_s": None,
          "retriever": retriever, "ids": seeds[rows].astype(np.int64), "domains": domains,
          # As retrieve_batch asks: each query at its domain's tuned scale.
          "scales": retriever.guidance_scale[domains].astype(np.float32)}


def _plain_call(sample, generator, context, mask, domain, scales, rng) -> np.ndarray:
  """`sample` with its rows split over the devices as `Generator.sample` splits them."""
  rows, replicated = engine.local_row_shardings(context.shape[0])
  return np.asarray(sample(generator.params_on(replicated),
                           *jax.device_put((context, mask, domain, scales), rows),
                           jax.device_put(rng, replicated)))


def main(argv: list[str]) -> None:
  args = _parse_args(argv)
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  engine.configure_cpu_devices(args.cpu_devices)  # as modit_jax.cli.retrieve does
  print(f"machine: {common.machine()}", flush=True)
  print(f"JAX {jax.__version__} on {jax.devices()[0].platform}, "
        f"{jax.device_count()} device(s)", flush=True)

  pipeline = (retriever_lib.Retriever.from_workdir(args.pipeline) if args.pipeline
              else None)
  with tempfile.TemporaryDirectory(prefix="bench_end_to_end_") as tmp:
    if pipeline is not None:
      generator = pipeline.generator
      what = f"final model of the pipeline {args.pipeline}"
    elif args.workdir:
      generator = generator_lib.Generator(args.workdir)
      what = f"trained model {args.workdir}"
    else:
      generator = generator_lib.Generator(random_workdir(
          tmp, args.dim, args.domains, args.guidance_scale, args.seed))
      what = "random-init model of training.default_config() (stage sft)"
  model, dim, num_domains = generator.model, generator.dim, generator.num_domains
  max_context = int(generator.config.model.max_context)
  num = args.seed_sets
  if pipeline is not None:
    catalogs = [_pipeline_catalog(pipeline, num)]
    guidance = ", ".join(f"{name} {scale:g}" for name, scale in
                         zip(pipeline.domains, pipeline.guidance_scale))
  else:
    catalogs = _synthetic_catalogs(args, generator, num)
    guidance = f"{args.guidance_scale:g}"
  seed_size = catalogs[0]["ids"].shape[1]
  if seed_size > max_context:
    raise SystemExit(f"seed sets of {seed_size} exceed the model's max_context {max_context}")
  # Retriever pads a context to the next power of two of its longest seed set.
  served = min(max_context, 1 << (seed_size - 1).bit_length())
  print(f"{what}: width {model.width}, depth {model.depth}, max_context {max_context}, "
        f"d={dim}, {num_domains} domains; {generator.num_steps} DDIM steps, guidance "
        f"{guidance} (both CFG branches)", flush=True)

  query_seeds = np.full(num, args.seed)  # what Retriever passes: one seed for every query
  chunks = {b: [slice(s, min(s + b, num)) for s in range(0, num, b)] for b in batch_sizes}
  plain_sample = jax.jit(functools.partial(
      diffusion.sample_rows, apply=models.apply_fn(model), dim=dim,
      num_steps=generator.num_steps, null_domain=num_domains,
      space=models.target_space(generator.config, dim),
      temperature=models.sample_temperature(generator.config)))
  fns, setups = {}, []
  for entry in catalogs:
    n, items, ids, domains = entry["n"], entry["items"], entry["ids"], entry["domains"]
    retriever, scales = entry["retriever"], entry["scales"]
    # The padded contexts, masks and excludes `retrieve_batch` builds, for the parts alone;
    # padded to max_context too, for the padding variant.
    context = np.zeros((num, max_context, dim), np.float32)
    context[:, :seed_size] = items[ids]
    mask = np.zeros((num, max_context), bool)
    mask[:, :seed_size] = True
    exclude = np.full((num, served), -1, np.int64)
    exclude[:, :seed_size] = np.sort(ids, axis=1)
    dom = domains if retriever.conditioned else np.full(num, num_domains, np.int32)
    # The query embeddings retrieve_batch makes for these seed sets (per-query seeds: they do
    # not depend on the batch), for the search alone and for the recall.
    samples = np.concatenate([  # in served batches: no compilation for a bucket of `num`
        generator.sample(context[c, :served], mask[c, :served], dom[c], query_seeds[c], 1,
                         scales[c], exclude_items=exclude[c])
        for c in chunks[batch_sizes[-1]]])
    if retriever.gate is not None:
      # The gate's queries where it answers: the search alone and the recall are of what is
      # served.
      samples, _ = retriever.gate.apply(
          retriever.index, items[ids].mean(axis=1), domains, exclude, samples)
    exact = retrieval.ExactIndex(items)
    near = common.near_queries(items, min(num, n), args.seed)
    index = retriever.index
    setups.append({
        "n": n, "build_s": entry["build_s"], "index": index, "exclude": exclude,
        "samples": samples, "exact_ids": generator_lib.search_samples(exact, samples, exclude, args.k),
        "near_recall": common.recall(index.search(near, args.k)[0],
                                     exact.search(near, args.k)[0])})
    print(f"N={n:,}: {num} seed sets of {seed_size}", flush=True)

    for b in batch_sizes:
      fns[f"end to end N={n} B={b}"] = (
          lambda r=retriever, b=b, ids=ids, domains=domains: [
              r.retrieve_batch(ids[c], domains[c], args.k) for c in chunks[b]])
      if retriever.gate is not None:
        fns[f"end to end, no gate N={n} B={b}"] = (
            lambda r=_ungated(retriever), b=b, ids=ids, domains=domains: [
                r.retrieve_batch(ids[c], domains[c], args.k) for c in chunks[b]])
    if entry is catalogs[0]:
      # Sampling does not depend on N: timed once, on the first catalog's seed sets. A stage-1
      # model is asked with the null domain, as Retriever does.
      for b in batch_sizes:
        fns[f"sample B={b}"] = (
            lambda b=b, ctx=context[:, :served], m=mask[:, :served], d=dom, sc=scales: [
                generator.sample(ctx[c], m[c], d[c], query_seeds[c], 1, sc[c],
                                 exclude_items=exclude[c])
                for c in chunks[b]])
        if not generator.reads_evidence:
          # The plain sampler has no neighbour-evidence input; a model that reads evidence is
          # timed as served only (its `sample` rows include computing the evidence).
          fns[f"sample_rows B={b}"] = (
              lambda b=b, ctx=context[:, :served], m=mask[:, :served], d=dom, sc=scales: [
                  _plain_call(plain_sample, generator, ctx[c], m[c], d[c], sc[c],
                              jax.random.PRNGKey(args.seed))
                  for c in chunks[b]])
        fns[f"sample L={max_context} B={b}"] = (
            lambda b=b, ctx=context, m=mask, d=dom, sc=scales: [
                generator.sample(ctx[c], m[c], d[c], query_seeds[c], 1, sc[c],
                                 exclude_items=exclude[c])
                for c in chunks[b]])
  for s in setups:
    for b in batch_sizes:
      fns[f"search N={s['n']} B={b}"] = (
          lambda ix=s["index"], q=s["samples"], ex=s["exclude"], b=b: [
              generator_lib.search_samples(ix, q[c], ex[c], args.k, return_scores=True)
              for c in chunks[b]])

  print(f"timing {len(fns)} functions, {args.rounds} rounds, {num} seed sets per call "
        f"(the first call of each compiles); {common.load()}", flush=True)
  times, results = common.round_robin(fns, args.rounds)

  flops = 2 * generator.num_steps * dit.flops_per_example(model, served)
  flops_padded = 2 * generator.num_steps * dit.flops_per_example(model, max_context)
  print()
  print(f"{what}; {generator.num_steps} DDIM steps x 2 CFG branches; k={args.k}; "
        f"{num} seed sets per call; fastest of {args.rounds} round-robin calls "
        f"(median in brackets)")
  print(f"sampling: {flops / 1e6:.0f} MFLOP per seed set (analytic, context padded to "
        f"{served} as served)")
  print("| what | N | batch | seed sets/s | share of end to end |")
  print("|---|---|---|---|---|")
  rate = lambda name: (num / times[name][0], num / times[name][1])
  summary = []
  for s in setups:
    n = s["n"]
    for b in batch_sizes:
      e2e = times[f"end to end N={n} B={b}"][0]
      names = (f"end to end N={n} B={b}", f"end to end, no gate N={n} B={b}",
               f"sample B={b}", f"search N={n} B={b}")
      for name in (name for name in names if name in times):
        fast, median = rate(name)
        label = name.split(" N=")[0].split(" B=")[0]
        print(f"| {label} | {n:,} | {b} | {fast:,.0f} ({median:,.0f}) "
              f"| {times[name][0] / e2e:.0%} |")
      other = e2e - times[f"sample B={b}"][0] - times[f"search N={n} B={b}"][0]
      print(f"| other (parse, pad, merge) | {n:,} | {b} | | {other / e2e:.0%} |")
      summary.append(f"seed_sets_per_s@N={n},batch={b}={num / e2e:.1f}")
    e2e_ids = np.concatenate(
        [ids for ids, _ in results[f"end to end N={n} B={batch_sizes[0]}"]], axis=0)
    search_ids = np.concatenate(
        [ids for ids, _ in results[f"search N={n} B={batch_sizes[0]}"]], axis=0)
    if not np.array_equal(e2e_ids, search_ids):
      print(f"  note: N={n:,}: retrieve_batch and search-alone ids differ on "
            f"{(e2e_ids != search_ids).any(axis=1).sum()} seed sets")
    s["recall"] = common.recall(e2e_ids, s["exact_ids"])
    summary.append(f"scann_recall@{args.k}@N={n}={s['recall']:.4f}")
  print("other = end to end - sample - search, each timed alone; on a busy machine it can come "
        "out negative (noise)")
  print()
  print("sampling variants (N-independent):")
  print("| sampler | batch | seed sets/s | analytic GFLOP/s |")
  print("|---|---|---|---|")
  for b in batch_sizes:
    for name, note in ((f"sample B={b}", "Generator.sample, per-query seeds (as served)"),
                       (f"sample_rows B={b}", "jit(diffusion.sample_rows), one key per batch"),
                       (f"sample L={max_context} B={b}",
                        f"Generator.sample, context padded to max_context {max_context}")):
      if name not in times:
        print(f"| {note} | {b} | not timed: the model reads neighbour evidence | |")
        continue
      fast, median = rate(name)
      gflops = (flops_padded if "L=" in name else flops) * fast / 1e9
      print(f"| {note} | {b} | {fast:,.0f} ({median:,.0f}) | {gflops:.1f} |")
  print()
  for s in setups:
    built = "loaded" if s["build_s"] is None else f"build {s['build_s']:.1f} s"
    print(f"N={s['n']:,}: ScaNN {built}, {s['index'].params}; "
          f"recall@{args.k} vs exact: {s['recall']:.4f} on the generated queries, "
          f"{s['near_recall']:.4f} on queries near items (bench/retrieval.py's)")
  print(f"target: >= {_TARGET_SEED_SETS_PER_S} seed sets/s at 100k items on 2 cores with "
        f"recall@20 >= 0.95")
  print(f"machine at the end: {common.load()}")
  print("\n".join(summary))


if __name__ == "__main__":
  main(sys.argv[1:])
