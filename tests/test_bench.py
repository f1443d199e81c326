"""bench/train_step.py: it runs, and its matmul breakdown covers the step it measures.

Nothing here times anything: performance is measured by running the bench (docs/benchmarks.md).
"""
# The bench is a script; its helpers are tested directly.
# pylint: disable=protected-access

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from modit_jax import engine

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH = os.path.join(_ROOT, "bench", "train_step.py")


@pytest.fixture(scope="module")
def bench():
  spec = importlib.util.spec_from_file_location("bench_train_step", _BENCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_per_device_matmuls_add_up_to_the_global_step(bench, fast_compile):
  """Traced at 1/8 of the batch and run on 8 devices, the matmuls do the global step's FLOPs."""
  del fast_compile
  args = bench._parse_args(["--config=configs/pretrain.py:tiny", "--batch=16"])
  config = bench._load_config(args.config, args)
  mesh = engine.make_mesh()
  assert mesh.size == 8
  _, loss_fn, tx, _, host_state, _, _ = bench._build_step(config, mesh)
  step = functools.partial(engine.train_step, loss_fn=loss_fn, tx=tx,
                           ema_decay=config.ema_decay)
  batch = bench._random_batch(16, int(config.model.max_context), seed=0)
  local = {k: v[:2] for k, v in batch.items()}
  rng = jax.random.PRNGKey(0)

  global_dots = bench.dot_group_fns(bench.step_dots(step, host_state, batch, rng))
  mesh_dots = bench.dot_group_fns(bench.step_dots(step, host_state, local, rng), mesh)
  total = lambda dots: sum(count * flops for count, _, _, flops, _ in dots)
  assert total(mesh_dots) == pytest.approx(total(global_dots), rel=1e-12)
  assert sum(d[0] for d in mesh_dots) == sum(d[0] for d in global_dots)
  # Every device runs the per-device shape: one output block per device, each the plain dot.
  _, shapes, dims, _, fn = mesh_dots[0]
  out = np.asarray(fn())
  assert out.shape[0] == 8
  expected = jax.lax.dot_general(np.asarray(jax.random.normal(jax.random.PRNGKey(0),
                                                              (8, *shapes[0])))[3],
                                 np.asarray(jax.random.normal(jax.random.PRNGKey(1),
                                                              (8, *shapes[1])))[3], dims)
  np.testing.assert_allclose(out[3], expected, rtol=1e-5, atol=1e-5)


def test_bench_runs_on_the_tiny_config():
  """The whole bench on 8 devices: the breakdown, its ceiling line and the promised last line."""
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  result = subprocess.run(
      [sys.executable, _BENCH, "--config=configs/pretrain.py:tiny", "--batch=16", "--steps=1",
       "--warmup=1", "--matmul_sizes=64"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert re.fullmatch(r"fraction_of_peak=\d+\.\d{3}", lines[-1]), lines[-1]
  assert float(lines[-1].split("=")[1]) > 0
  assert "model: width 32, depth 2" in result.stdout
  assert "each alone at its per-device shape on all 8 devices at once" in result.stdout
  # The tiny step's matmuls are so small that the dispatch may swallow them; either way the
  # bench must say which.
  assert re.search(r"one call of an 8x8 matmul the same way takes \d+ us; (less \d+ of those, "
                   r".*the step would reach \d+\.\d{3} of the peak|.*no ceiling to give)",
                   result.stdout)


def test_serving_bench_runs_on_a_synthetic_catalog_behind_a_gate():
  """`make bench`'s serving bench on its own synthetic catalog, served behind a novelty gate
  with the neighbourhood offset's fallback (it once built a gate without a threshold)."""
  result = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "bench", "end_to_end.py"), "--sizes=3000",
       "--seed_sets=16", "--batch_sizes=8", "--rounds=1", "--clusters=30"],
      cwd=_ROOT, env=dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1"),
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert re.search(r"^seed_sets_per_s@N=3000,batch=8=\d", result.stdout, re.MULTILINE)
  assert re.search(r"^scann_recall@20@N=3000=\d", result.stdout, re.MULTILINE)


def test_bench_rejects_a_missing_config():
  result = subprocess.run([sys.executable, _BENCH, "--config=configs/nope.py"], cwd=_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert "no such config file: configs/nope.py" in result.stderr
  assert "Traceback" not in result.stderr


def test_large_world_bench_runs_every_step_on_the_tiny_world(tmp_path):
  """bench/large_world.py's driver on the tiny world: each step a child, timed and measured."""
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  result = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "bench", "large_world.py"), f"--out={tmp_path}",
       "--world=configs/synthetic.py:tiny", "--train_config=configs/cpt.py:tiny",
       "--train_steps=20", "--methods=seed_centroid,centroid_global_shift", "--seed_sets=32",
       "--batch_sizes=16", "--rounds=1"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  with open(tmp_path / "large_world.json") as f:
    summary = json.load(f)
  assert [r["step"] for r in summary["steps"]] == ["dataset", "index", "train", "evaluate",
                                                   "serve"]
  for row in summary["steps"]:
    assert row["exit"] == 0 and row["seconds"] > 0
    assert 0.05 < row["peak_rss_gib"] < 64  # a child's own peak, in GiB (not KiB or bytes)
    # Anonymous memory is part of the resident set: sampled, it cannot exceed its peak.
    assert 0.01 < row["peak_anon_gib"] <= row["peak_rss_gib"]
  assert any(line.startswith("seed_sets_per_s@") for line in summary["serve"])
  assert any(line.startswith("scann_recall@") for line in summary["serve"])
  # A second run reuses the catalog rather than generating it again.
  again = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "bench", "large_world.py"), f"--out={tmp_path}",
       "--steps=dataset"], cwd=_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "holds a catalog: reused" in again.stdout
  with open(tmp_path / "large_world.json") as f:
    assert json.load(f) == summary  # the rows of the steps not run again are kept


@pytest.mark.parametrize("variant, message", [
    ("devices=3", "batch 16 does not split evenly over 3 devices"),
    ("xla_cpu_no_such_option=true", "XLA refuses its options: INVALID_ARGUMENT: No such compile "
     "option: 'xla_cpu_no_such_option'"),
])
def test_bench_rejects_a_variant_that_cannot_run(variant, message):
  """A variant the bench cannot run is named with the reason, before the step is built."""
  result = subprocess.run(
      [sys.executable, _BENCH, "--config=configs/pretrain.py:tiny", "--batch=16",
       f"--variants=devices=2;{variant}"],
      cwd=_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert f"--variants {variant!r}: {message}" in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert "model: width" not in result.stdout  # it stopped before building anything

