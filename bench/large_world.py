"""A 10M-item catalog end to end: the `:large` synthetic world through the real binaries.

Run from the repository root (about 45 minutes on 2 cores; a catalog already there is reused):

  python bench/large_world.py --out=out/large
  python bench/large_world.py --out=out/large --steps=index,serve   # some steps again
  python bench/large_world.py --out=/tmp/l --world=configs/synthetic.py:tiny \
      --train_config=configs/cpt.py:tiny --train_steps=20 --seed_sets=64 --batch_sizes=32

Every step is one child process of a binary (or of a bench), so its wall time, its peak
resident memory (`os.wait4`'s ru_maxrss, which counts the memory-mapped catalog's pages it
read) and its peak anonymous memory (sampled from /proc: what it holds) are its own:

1. `dataset`: `modit_jax.cli.make_dataset` with `configs/synthetic.py:large` (10M items,
   d = 64, 4,000 topics, 10k train and 2x1k evaluation queries), skipped when OUT/dataset holds
   a catalog;
2. `index`: `modit_jax.cli.build_index`, ScaNN with `retrieval.scann_params(N)`;
3. `train`: `modit_jax.cli.train` of stage 2 (CPT) from scratch for `--train_steps` steps.
   What it costs beyond the steps is the training-side data work at this size: the metric
   predictor on the observed labels of the train items, the k-means latent clusters (one per
   10 seed sets of train items: two-level k-means here, `clusters.kmeans`) and the trajectory
   source;
4. `evaluate`: `modit_jax.cli.evaluate` of the baselines in `--methods` on both holdouts (its
   own full-catalog ScaNN index and the online oracle's index over the train items included);
5. `serve`: `bench/end_to_end.py --pipeline=OUT` on the model of step 3: `Retriever.from_workdir`
   with the index of step 2, seed sets/s of `retrieve_batch` and recall@20 of ScaNN against
   exact search on the model's queries.

Each step's output and log are under OUT (`<step>.log`); its row (wall s, peak RSS, peak
anonymous memory) is written to OUT/large_world.json as soon as it ends, and the table at the
end prints them all. The CPT model of step 3 is trained for a few steps only: serving
throughput does not depend on how good the model is, and recall is measured against exact
search on its own queries.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import common

_STEPS = ("dataset", "index", "train", "evaluate", "serve")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=os.path.join("out", "large"), help="output directory")
  parser.add_argument("--world", default="configs/synthetic.py:large",
                      help="world config of step 1 (the tests use :tiny)")
  parser.add_argument("--steps", default=",".join(_STEPS),
                      help=f"comma-separated steps to run, from {', '.join(_STEPS)}")
  parser.add_argument("--train_config", default="configs/cpt.py", help="stage config of step 3")
  parser.add_argument("--train_steps", type=int, default=100, help="CPT updates of step 3")
  parser.add_argument("--methods",
                      default="seed_centroid,centroid_global_shift,local_shift,oracle_shift",
                      help="baselines evaluated in step 4")
  parser.add_argument("--seed_sets", type=int, default=1024, help="seed sets served in step 5")
  parser.add_argument("--batch_sizes", default="256,1024", help="serving batches of step 5")
  parser.add_argument("--rounds", type=int, default=2, help="timed serving calls in step 5")
  args = parser.parse_args(argv)
  unknown = sorted(set(args.steps.split(",")) - set(_STEPS))
  if unknown:
    parser.error(f"unknown steps {', '.join(unknown)}; known: {', '.join(_STEPS)}")
  return args


# Peak RSS counts the pages of memory-mapped files a step has read (the catalog's embeddings:
# 2.6 GB at 10M), which the kernel can drop at will; what a step holds is its anonymous memory,
# sampled from /proc at this interval (Linux; 0 where /proc has no such field).
_SAMPLE_S = 0.25


def _anonymous_bytes(pid: int) -> int:
  """The process's resident anonymous memory now (RssAnon of /proc/PID/status), 0 if unknown."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("RssAnon:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _run(name: str, command: list[str], out: str) -> dict:
  """Runs one step's command as a child; its wall time, peak RSS and exit status."""
  log_path = os.path.join(out, f"{name}.log")
  print(f"[{name}] {' '.join(command)}  (log: {log_path})", flush=True)
  with open(log_path, "w") as log:
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT)
    peak_anon = 0
    while True:
      pid, status, usage = os.wait4(child.pid, os.WNOHANG)
      if pid:
        break
      peak_anon = max(peak_anon, _anonymous_bytes(child.pid))
      time.sleep(_SAMPLE_S)
    seconds = time.perf_counter() - start
  child.returncode = os.waitstatus_to_exitcode(status)
  row = {"step": name, "seconds": seconds, "peak_rss_gib": usage.ru_maxrss / 2**20,
         "peak_anon_gib": peak_anon / 2**30, "exit": child.returncode}
  print(f"[{name}] {seconds:,.1f} s, peak RSS {row['peak_rss_gib']:.2f} GiB (anonymous "
        f"{row['peak_anon_gib']:.2f} GiB), exit {child.returncode}", flush=True)
  if child.returncode:
    with open(log_path) as f:
      sys.stderr.write("".join(f.readlines()[-20:]))
    raise SystemExit(f"step {name} failed; see {log_path}")
  return row


class _Rows:
  """The steps' rows in OUT/large_world.json, written after every step: a run stopped midway
  keeps the steps it finished, and a step run again replaces its row, keeping the others."""

  def __init__(self, path: str):
    self._path = path
    self.summary = {"steps": []}
    if os.path.isfile(path):
      with open(path) as f:
        self.summary = json.load(f)

  def append(self, row: dict) -> None:
    by_step = {r["step"]: r for r in self.summary["steps"] + [row]}
    self.summary["steps"] = [by_step[name] for name in _STEPS if name in by_step]
    self.summary["machine"] = common.machine()
    self.write()

  def write(self) -> None:
    with open(self._path, "w") as f:
      json.dump(self.summary, f, indent=1)


def _last_lines(path: str, prefixes: tuple[str, ...]) -> list[str]:
  with open(path) as f:
    return [line.strip() for line in f if line.startswith(prefixes)]


def main(argv: list[str]) -> None:
  args = _parse_args(argv)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  steps = args.steps.split(",")
  dataset, index, model = (os.path.join(out, n) for n in ("dataset", "index", "cpt"))
  py = sys.executable
  print(f"machine: {common.machine()}", flush=True)
  summary_path = os.path.join(out, "large_world.json")
  rows = _Rows(summary_path)
  if "dataset" in steps:
    if os.path.isfile(os.path.join(dataset, "manifest.json")):
      print(f"[dataset] {dataset} holds a catalog: reused", flush=True)
    else:
      rows.append(_run("dataset", [py, "-m", "modit_jax.cli.make_dataset",
                                   f"--config={args.world}", f"--out={dataset}"], out))
  if "index" in steps:
    rows.append(_run("index", [py, "-m", "modit_jax.cli.build_index", f"--dataset={dataset}",
                               f"--out={index}"], out))
  if "train" in steps:
    rows.append(_run("train", [
        py, "-m", "modit_jax.cli.train", f"--config={args.train_config}", "--config.init_from=",
        f"--config.num_steps={args.train_steps}", f"--config.checkpoint_every={args.train_steps}",
        f"--dataset={dataset}", f"--workdir={model}"], out))
  if "evaluate" in steps:
    rows.append(_run("evaluate", [
        py, "-m", "modit_jax.cli.evaluate", "--config=configs/evaluate.py",
        f"--config.methods={args.methods}", f"--dataset={dataset}",
        f"--workdir={os.path.join(out, 'eval')}"], out))
  if "serve" in steps:
    # What `Retriever.from_workdir(OUT)` reads: the model, the catalog and the saved index.
    with open(os.path.join(out, "pipeline.json"), "w") as f:
      json.dump({"final_workdir": model, "dataset": dataset, "index": index}, f, indent=1)
    rows.append(_run("serve", [
        py, os.path.join("bench", "end_to_end.py"), f"--pipeline={out}",
        f"--seed_sets={args.seed_sets}", f"--batch_sizes={args.batch_sizes}",
        f"--rounds={args.rounds}"], out))

  summary = rows.summary
  if "serve" in steps:
    summary["serve"] = _last_lines(os.path.join(out, "serve.log"),
                                   ("seed_sets_per_s", "scann_recall"))
    rows.write()
  print("\n| step | wall s | peak RSS GiB | peak anonymous GiB |\n|---|---|---|---|")
  for row in summary["steps"]:
    anon = row.get("peak_anon_gib")  # absent in rows written before it was sampled
    print(f"| {row['step']} | {row['seconds']:,.1f} | {row['peak_rss_gib']:.2f} | "
          f"{'-' if anon is None else f'{anon:.2f}'} |")
  print("\n".join(summary.get("serve", [])))


if __name__ == "__main__":
  main(sys.argv[1:])
