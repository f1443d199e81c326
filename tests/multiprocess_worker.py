"""A tiny model-agnostic training problem for the engine tests, and a multi-process worker.

As a script it is one process of a `jax.distributed` run on loopback (configured through the
MODIT_COORDINATOR / MODIT_NUM_PROCESSES / MODIT_PROCESS_ID environment variables): it trains
the tiny problem with `engine.train_loop` and process 0 writes the final parameters to an
.npz file.

  python tests/multiprocess_worker.py WORKDIR OUT_NPZ NUM_STEPS [STARTED_FILE]

With STARTED_FILE, process 0 creates that file once training is under way (for a test that
then sends a signal), and a stop on a signal (`stopping.TrainingStopped`) prints
"stopped STEP SAVED_STEP" and exits with the stop's exit code.
"""

import functools
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

FEATURES = 8
HIDDEN = 32
DATA_SEED = 1234


class Mlp(nn.Module):
  """Two-layer regression MLP."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.gelu(nn.Dense(HIDDEN)(x))
    return nn.Dense(1)(x)[:, 0]


@functools.cache
def init_params(seed: int = 0) -> Any:
  """Initial parameters (jitted: one compilation instead of one per op; cached: immutable)."""
  init = jax.jit(lambda key: Mlp().init(key, jnp.zeros((1, FEATURES)))["params"])
  return init(jax.random.PRNGKey(seed))


def loss_fn(params: Any, batch: dict[str, jax.Array], rng: jax.Array):
  """Noisy-target MSE; the noise of example i comes from key i of a split over the global
  batch, so it does not depend on how the batch is sharded."""
  pred = Mlp().apply({"params": params}, batch["x"])
  keys = jax.random.split(rng, batch["x"].shape[0])
  noise = jax.vmap(lambda k: jax.random.normal(k, ()))(keys)
  loss = jnp.mean((pred - batch["y"] - 0.1 * noise) ** 2)
  return loss, {"pred_mean": jnp.mean(pred)}


def global_batch(step: int, batch_size: int) -> dict[str, np.ndarray]:
  """The whole batch of update `step`: a pure function of the step."""
  rng = np.random.default_rng([DATA_SEED, step])
  x = rng.normal(size=(batch_size, FEATURES)).astype(np.float32)
  y = np.sin(x.sum(axis=1)).astype(np.float32)
  return {"x": x, "y": y}


def make_batch_fn(batch_size: int):
  """`batch_fn(step, process_index, process_count)`: this process's contiguous rows."""

  def batch_fn(step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]:
    per_process = batch_size // process_count
    rows = slice(process_index * per_process, (process_index + 1) * per_process)
    return {k: v[rows] for k, v in global_batch(step, batch_size).items()}

  return batch_fn


def make_config(**overrides: Any) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      num_steps=6, batch_size=16, seed=0, log_every=2, checkpoint_every=3,
      keep_checkpoints=2, ema_decay=0.9, fsdp=False, learning_rate=1e-2, warmup_steps=2,
      weight_decay=1e-4, grad_clip_norm=1.0, b1=0.9, b2=0.999))
  config.update(overrides)
  return config


def main(argv: list[str]) -> None:
  workdir, out_path, num_steps = argv[1], argv[2], int(argv[3])
  # Imported here so the test module can import this file without the engine side effects.
  from modit_jax import engine  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  from modit_jax import stopping  # pylint: disable=g-import-not-at-top

  assert engine.maybe_initialize_distributed(), "MODIT_COORDINATOR is not set"
  config = make_config(num_steps=num_steps)
  batch_fn = make_batch_fn(config.batch_size)
  started_file = argv[4] if len(argv) > 4 else None
  if started_file:
    config.checkpoint_every = num_steps  # Only the stop saves.
    batches = batch_fn

    def batch_fn(step, process_index, process_count):
      if step == 3 and process_index == 0:
        open(started_file, "w").close()
      return batches(step, process_index, process_count)

  try:
    state = engine.train_loop(config, workdir, init_params=init_params(), loss_fn=loss_fn,
                              batch_fn=batch_fn)
  except stopping.TrainingStopped as stopped:
    print(f"stopped {stopped.step} {stopped.saved_step}", flush=True)
    sys.exit(stopped.exit_code)
  # A collective: every process takes part, process 0 writes.
  host = multihost_utils.process_allgather(
      {"params": state.params, "ema_params": state.ema_params}, tiled=True)
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(host)}
    np.savez(out_path, process_count=jax.process_count(), **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv)
