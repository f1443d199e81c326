"""Tests for modit_jax.engine: layout equivalence, exact resume, metrics, EMA, multi-process.

The session has 8 forced CPU devices (tests/conftest.py). The problem is a tiny MLP
regression shared with tests/multiprocess_worker.py.
"""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from modit_jax import engine
from modit_jax import errors
from modit_jax import stopping
import multiprocess_worker as tiny

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")
REPO = os.path.dirname(os.path.dirname(WORKER))


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_trees_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _run_steps(mesh, fsdp: bool, num_steps: int = 4):
  """Drives the jitted step directly; returns (final state, per-step losses, shardings)."""
  config = tiny.make_config(num_steps=num_steps)
  tx = engine.make_optimizer(config)
  host_state = engine.create_train_state(tiny.init_params(), tx)
  # min_size=64 so that, with 8 devices, the 8x32 and 32x1 kernels really are sharded.
  shardings = engine.param_sharding(host_state, mesh, fsdp=fsdp, min_size=64)
  state = engine.device_put_global(host_state, shardings)
  step_fn = engine.jit_train_step(tiny.loss_fn, tx, config.ema_decay, mesh, shardings)
  rng = engine.device_put_global(jax.random.PRNGKey(3), engine.replicated(mesh))
  losses = []
  for step in range(num_steps):
    batch = engine.shard_batch(tiny.global_batch(step, config.batch_size), mesh)
    state, metrics = step_fn(state, batch, rng)
    losses.append(float(metrics["loss"]))
  return state, losses, shardings


@pytest.fixture(scope="module")
def single_device_run():
  assert jax.device_count() == 8, "tests/conftest.py should force 8 host devices"
  return _run_steps(engine.make_mesh(1), fsdp=False)


@pytest.mark.parametrize("fsdp", [False, True])
def test_sharded_step_matches_single_device(single_device_run, fsdp):
  single, single_losses, _ = single_device_run
  sharded, sharded_losses, shardings = _run_steps(engine.make_mesh(8), fsdp=fsdp)
  np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
  _assert_trees_close(sharded.params, single.params)
  _assert_trees_close(sharded.ema_params, single.ema_params)
  assert int(sharded.step) == 4
  kernel = sharded.params["Dense_0"]["kernel"]
  if fsdp:
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "data")
    assert shardings.opt_state[1][0].mu["Dense_0"]["kernel"].spec == kernel.sharding.spec
    assert shardings.params["Dense_0"]["bias"].spec == jax.sharding.PartitionSpec()
  else:
    assert kernel.sharding.is_fully_replicated


def test_param_sharding_rule():
  mesh = engine.make_mesh(8)
  tree = {"big": np.zeros((24, 64)), "odd": np.zeros((7, 9, 5)), "small": np.zeros((8,))}
  specs = jax.tree.map(lambda s: s.spec,
                       engine.param_sharding(tree, mesh, fsdp=True, min_size=64))
  assert specs == {"big": jax.sharding.PartitionSpec(None, "data"),
                   "odd": jax.sharding.PartitionSpec(), "small": jax.sharding.PartitionSpec()}
  replicated = engine.param_sharding(tree, mesh, fsdp=False)
  assert all(s.is_fully_replicated for s in jax.tree.leaves(replicated))


def test_schedule_and_config_checks():
  config = tiny.make_config(num_steps=10, warmup_steps=4, learning_rate=1.0)
  lrs = [engine.learning_rate_at(config, s) for s in range(10)]
  np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
  assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and 0 < lrs[-1] < 0.1
  with pytest.raises(errors.UserError, match="warmup_steps"):
    engine.make_optimizer(tiny.make_config(warmup_steps=100))
  del config.b1
  with pytest.raises(errors.UserError, match="b1"):
    engine.make_optimizer(config)


def _train(workdir, config, batch_fn=None, mesh=None, resume_every=1):
  return engine.train_loop(
      config, str(workdir), init_params=tiny.init_params(), loss_fn=tiny.loss_fn,
      batch_fn=batch_fn or tiny.make_batch_fn(config.batch_size), mesh=mesh,
      resume_every=resume_every)


class _Killed(Exception):
  pass


def _interrupted_at_step_4(workdir, config, interrupt, expected, **train_kwargs):
  """Trains with `interrupt()` called while step 4's batch is built; returns the `expected`
  exception the run ends with."""
  batches = tiny.make_batch_fn(config.batch_size)

  def interrupted_at_step_4(step, process_index, process_count):
    if step == 4:
      interrupt()
    return batches(step, process_index, process_count)

  with pytest.raises(expected) as raised:
    _train(workdir, config, batch_fn=interrupted_at_step_4, **train_kwargs)
  return raised.value


def _killed_after_checkpoint_3(workdir, config, mesh=None) -> None:
  """Trains until the batch of step 4 and dies there, as in a real kill.

  Step 4 is one update past the checkpoint at 3: that update is lost.
  """
  def die():
    raise _Killed()

  _interrupted_at_step_4(workdir, config, die, _Killed, mesh=mesh)


def test_resume_after_kill_is_exact(tmp_path):
  config = tiny.make_config(num_steps=7, checkpoint_every=3)
  full = _train(tmp_path / "full", config)
  workdir = tmp_path / "resumed"
  _killed_after_checkpoint_3(workdir, config)
  assert engine.Checkpointer(str(workdir)).latest_step() == 3
  resumed = _train(workdir, config)

  assert int(resumed.step) == 7
  _assert_trees_equal(resumed.params, full.params)
  _assert_trees_equal(resumed.ema_params, full.ema_params)
  _assert_trees_equal(resumed.opt_state, full.opt_state)
  # keep_checkpoints=2: steps 3 and 6 were periodic, 7 is the final save.
  assert engine.Checkpointer(str(workdir)).all_steps() == [6, 7]

  # A finished run restarted does no more work.
  again = _train(workdir, config)
  _assert_trees_equal(again.params, full.params)

  # A later stage starts from this one's parameters.
  ema = engine.restore_params(str(workdir))
  _assert_trees_equal(ema, full.ema_params)
  raw = engine.restore_params(str(workdir / "checkpoints"), step=6, use_ema=False)
  assert jax.tree.structure(raw) == jax.tree.structure(full.params)
  with pytest.raises(errors.UserError, match="no checkpoint for step 5"):
    engine.restore_params(str(workdir), step=5)


def _signalled_at_step_4(workdir, config, signal_number, resume_every=1):
  """Trains, with `signal_number` sent to this process while step 4's batch is built."""
  return _interrupted_at_step_4(workdir, config, lambda: os.kill(os.getpid(), signal_number),
                                stopping.TrainingStopped, resume_every=resume_every)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_update_in_flight_and_the_resume_is_exact(tmp_path, signal_number):
  config = tiny.make_config(num_steps=7, checkpoint_every=3)
  full = _train(tmp_path / "full", config)
  workdir = tmp_path / "stopped"
  before = signal.getsignal(signal_number)
  stopped = _signalled_at_step_4(workdir, config, signal_number)

  # The update on batch 4 finished (step 5), was saved, and the handlers are back.
  assert (stopped.step, stopped.saved_step) == (5, 5)
  assert stopped.exit_code == 128 + signal_number
  name = signal.Signals(signal_number).name
  assert str(stopped).startswith(f"stopped by {name} after step 5 of 7: its checkpoint is in ")
  assert signal.getsignal(signal_number) is before
  assert engine.Checkpointer(str(workdir)).latest_step() == 5

  resumed = _train(workdir, config)
  _assert_trees_equal(resumed.params, full.params)
  _assert_trees_equal(resumed.ema_params, full.ema_params)
  _assert_trees_equal(resumed.opt_state, full.opt_state)


def test_a_signal_between_exact_resume_points_keeps_the_last_one(tmp_path):
  """With resume_every=3 (HPPO's pool period), step 5 is not saved: 3 is where it resumes."""
  config = tiny.make_config(num_steps=7, checkpoint_every=3)
  full = _train(tmp_path / "full", config, resume_every=3)
  workdir = tmp_path / "stopped"
  stopped = _signalled_at_step_4(workdir, config, signal.SIGTERM, resume_every=3)
  assert (stopped.step, stopped.saved_step) == (5, 3)
  assert "the last checkpoint is step 3" in str(stopped)
  assert "multiple of 3 steps" in str(stopped)
  assert engine.Checkpointer(str(workdir)).all_steps() == [3]
  resumed = _train(workdir, config, resume_every=3)
  _assert_trees_equal(resumed.params, full.params)


def test_metrics_files(tmp_path):
  config = tiny.make_config(num_steps=4, log_every=2, checkpoint_every=4)
  _train(tmp_path, config)
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [2, 4]
  for record in records:
    for key in ("loss", "grad_norm", "lr", "steps_per_sec", "examples_per_sec", "pred_mean"):
      assert np.isfinite(record[key]), key
  assert records[0]["lr"] == pytest.approx(engine.learning_rate_at(config, 1))
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_non_finite_loss_names_the_step(tmp_path):
  config = tiny.make_config(num_steps=6, log_every=100, checkpoint_every=100)
  batches = tiny.make_batch_fn(config.batch_size)

  def poisoned(step, process_index, process_count):
    batch = batches(step, process_index, process_count)
    if step == 2:
      batch["y"] = np.full_like(batch["y"], np.nan)
    return batch

  with pytest.raises(engine.NonFiniteLossError, match=r"at step 3 .*learning_rate"):
    _train(tmp_path, config, batch_fn=poisoned)
  # Nothing diverged was saved.
  assert engine.Checkpointer(str(tmp_path)).latest_step() is None


def test_ema_is_the_bias_corrected_average_of_the_updated_parameters(tmp_path):
  mesh = engine.make_mesh(1)
  rng = jax.random.PRNGKey(0)
  for decay in (0.0, 0.9):
    tx = engine.make_optimizer(tiny.make_config())
    state = engine.create_train_state(tiny.init_params(), tx)
    step_fn = jax.jit(functools.partial(engine.train_step, loss_fn=tiny.loss_fn, tx=tx,
                                        ema_decay=decay))
    trajectory = []
    for step in range(3):
      state, _ = step_fn(state, engine.shard_batch(tiny.global_batch(step, 16), mesh), rng)
      trajectory.append(state.params)
      if step == 0:
        # The first update replaces the starting parameters: they never weigh in.
        _assert_trees_equal(state.ema_params, state.params)
    # sum_i decay**(t - i) * params_i / sum_i decay**(t - i), over updates i = 1..t.
    weights = np.array([decay ** (len(trajectory) - 1 - i) for i in range(len(trajectory))])
    expected = jax.tree.map(lambda *ps: sum(w * p for w, p in zip(weights, ps)) / weights.sum(),
                            *trajectory)
    _assert_trees_close(state.ema_params, expected)
    if decay:
      # A real average: not the last parameters.
      assert any(not np.allclose(e, p) for e, p in zip(_leaves(state.ema_params),
                                                       _leaves(state.params)))


def test_resume_on_another_device_count_continues_the_run(tmp_path):
  # Checkpointed on 1 device, resumed on 8 (e.g. --cpu_devices changed): the restore lays the
  # state out on the new mesh, and the run ends where an 8-device run does, up to rounding.
  config = tiny.make_config(num_steps=7, checkpoint_every=3)
  full = _train(tmp_path / "full", config, mesh=engine.make_mesh(8))
  workdir = tmp_path / "moved"
  _killed_after_checkpoint_3(workdir, config, mesh=engine.make_mesh(1))
  batches = tiny.make_batch_fn(config.batch_size)
  asked = []

  def recorded(step, process_index, process_count):
    asked.append(step)
    return batches(step, process_index, process_count)

  resumed = _train(workdir, config, batch_fn=recorded, mesh=engine.make_mesh(8))
  assert asked == [3, 4, 5, 6]  # from the step-3 checkpoint, not from scratch
  assert int(resumed.step) == 7
  assert resumed.params["Dense_0"]["kernel"].sharding.mesh.size == 8
  _assert_trees_close(resumed.params, full.params)
  _assert_trees_close(resumed.ema_params, full.ema_params)


def test_shard_batch_rejects_uneven_batch():
  with pytest.raises(errors.UserError, match="divisible"):
    engine.shard_batch({"x": np.zeros((12, 2))}, engine.make_mesh(8))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(tmp_path, num_steps, *extra_args):
  """Starts the two loopback processes of tests/multiprocess_worker.py."""
  port = _free_port()
  procs = []
  for process_id in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               MODIT_COORDINATOR=f"localhost:{port}", MODIT_NUM_PROCESSES="2",
               MODIT_PROCESS_ID=str(process_id))
    procs.append(subprocess.Popen(
        [sys.executable, WORKER, str(tmp_path / "multi"), str(tmp_path / "params.npz"),
         str(num_steps), *extra_args],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _logs(procs, timeout=120) -> list[str]:
  logs = []
  try:
    for proc in procs:
      logs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return logs


def test_two_processes_match_single_process(tmp_path):
  if "jax_cpu_collectives_implementation" not in jax.config.values:
    pytest.skip("this jax build has no CPU cross-process collectives")
  num_steps = 4
  out = tmp_path / "params.npz"
  procs = _two_processes(tmp_path, num_steps)
  for proc, log in zip(procs, _logs(procs)):
    assert proc.returncode == 0, log[-4000:]

  config = tiny.make_config(num_steps=num_steps)
  single = _train(tmp_path / "single", config, mesh=engine.make_mesh(2))
  got = np.load(out)
  assert int(got["process_count"]) == 2
  expected = {"params": single.params, "ema_params": single.ema_params}
  for path, leaf in jax.tree_util.tree_leaves_with_path(expected):
    np.testing.assert_allclose(got[jax.tree_util.keystr(path)], np.asarray(leaf),
                               rtol=1e-5, atol=1e-6)


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path):
  """JAX's preemption service: every process stops after the same update, which is saved."""
  if "jax_cpu_collectives_implementation" not in jax.config.values:
    pytest.skip("this jax build has no CPU cross-process collectives")
  started = tmp_path / "started"
  procs = _two_processes(tmp_path, 1_000_000, str(started))
  try:
    deadline = time.monotonic() + 120
    while not started.exists() and all(p.poll() is None for p in procs):
      assert time.monotonic() < deadline, "training did not start"
      time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
  finally:
    logs = _logs(procs)
  stops = []
  for proc, log in zip(procs, logs):
    assert proc.returncode == 128 + signal.SIGTERM, log[-4000:]
    stops.append([line for line in log.splitlines() if line.startswith("stopped ")][-1])
  assert stops[0] == stops[1]
  step, saved = (int(x) for x in stops[0].split()[1:])
  assert step == saved > 3
  assert engine.Checkpointer(str(tmp_path / "multi")).latest_step() == step


def _cpu_device_count(count, **env) -> int:
  """jax.device_count() in a fresh process after `engine.configure_cpu_devices(count)`."""
  clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  code = ("import sys; from modit_jax import engine; engine.configure_cpu_devices(eval(sys.argv[1]));"
          " import jax; print(jax.device_count())")
  result = subprocess.run([sys.executable, "-c", code, repr(count)], cwd=REPO, text=True,
                          env=dict(clean, JAX_PLATFORMS="cpu", **env), capture_output=True,
                          check=True)
  return int(result.stdout.split()[-1])


@pytest.mark.parametrize("count, env, expected", [
    (None, {}, engine.DEFAULT_CPU_DEVICES),
    (2, {}, 2),
    (None, {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, 3),  # kept
    (2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, 2),     # the flag wins
    (None, {"JAX_NUM_CPU_DEVICES": "5"}, 5),
])
def test_configure_cpu_devices(count, env, expected):
  assert _cpu_device_count(count, **env) == expected


@pytest.mark.parametrize("xla_flags, scheduler", [
    ("", engine.CPU_SCHEDULER),
    ("--xla_force_host_platform_device_count=3", engine.CPU_SCHEDULER),
    ("--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT", "CPU_SCHEDULER_TYPE_DEFAULT"),  # kept
])
def test_configure_cpu_devices_selects_the_scheduler_unless_one_is_set(xla_flags, scheduler):
  clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  code = ("import os; from modit_jax import engine; engine.configure_cpu_devices(None);"
          " import jax; jax.device_count(); print(os.environ['XLA_FLAGS'])")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, text=True,
                          env=dict(clean, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags),
                          capture_output=True, check=True)
  flags = result.stdout.split()
  assert [f for f in flags if engine.CPU_SCHEDULER_XLA_FLAG in f] == [
      f"--{engine.CPU_SCHEDULER_XLA_FLAG}={scheduler}"]
  assert set(xla_flags.split()) <= set(flags)


def test_configure_cpu_devices_rejects_nonpositive_counts():
  with pytest.raises(errors.UserError, match="at least 1"):
    engine.configure_cpu_devices(0)


def test_train_binary_splits_the_cpu_and_names_the_flag_on_an_uneven_batch(tiny_world,
                                                                            tmp_path):
  clean = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

  def train(*flags):
    return subprocess.run(
        [sys.executable, "-m", "modit_jax.cli.train", "--config=configs/pretrain.py:tiny",
         f"--dataset={tiny_world}", f"--workdir={tmp_path / 'run'}", "--config.num_steps=2",
         "--config.warmup_steps=1", "--config.batch_size=12", *flags],
        cwd=REPO, env=dict(clean, JAX_PLATFORMS="cpu"), text=True, capture_output=True)

  ok = train("--cpu_devices=3")
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "on 3 cpu device(s)" in ok.stderr
  uneven = train("--cpu_devices=5")
  assert uneven.returncode == 2
  assert uneven.stderr.strip().splitlines()[-1] == (
      "error: config.batch_size=12 must be divisible by the number of devices (5) "
      "(on CPU, --cpu_devices sets how many)")


def test_train_binary_stops_on_sigterm_with_a_checkpoint(tiny_world, tmp_path):
  """SIGTERM mid-run: exit code 143, one line that names the step, its checkpoint on disk."""
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "modit_jax.cli.train", "--config=configs/pretrain.py:tiny",
       f"--dataset={tiny_world}", f"--workdir={workdir}", "--config.num_steps=100000",
       "--config.log_every=5", "--config.checkpoint_every=100000"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), text=True,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  try:
    log = []
    for line in proc.stderr:  # Training is under way once step 5 is logged.
      log.append(line)
      if "step 5/100000" in line:
        proc.send_signal(signal.SIGTERM)
        break
    log.extend(proc.stderr)
    returncode = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert returncode == 128 + signal.SIGTERM, "".join(log[-30:])
  last = log[-1].strip()
  assert last.startswith("stopped by SIGTERM after step "), last
  step = int(last.split("after step ")[1].split()[0])
  assert step >= 5
  assert last.endswith("; run the same command again to resume")
  assert "Traceback" not in "".join(log)
  assert engine.Checkpointer(str(workdir)).latest_step() == step


def test_train_mesh_puts_wide_models_on_one_cpu_device_unless_told():
  devices = len(jax.devices())
  assert devices > 1 and jax.devices()[0].platform == "cpu"  # the tests' 8 CPU devices
  wide = engine.CPU_ONE_DEVICE_FORWARD_FLOPS
  assert engine.train_mesh(wide).size == 1
  assert engine.train_mesh(wide / 2).size == devices
  assert engine.train_mesh(wide, num_devices=4).size == 4
  assert engine.train_mesh(wide / 2, num_devices=2).size == 2
  with pytest.raises(errors.UserError, match="mesh_devices must be >= 0"):
    engine.train_mesh(wide, num_devices=-1)
