"""The training engine shared by every stage (DESIGN.md section 7).

One module-level pure train step `(state, batch, rng) -> (state, metrics)` compiled with
`jax.jit` over a `Mesh` with a single "data" axis: the batch is sharded on its leading axis,
the state is replicated (or FSDP-sharded) and donated. Around it: an AdamW optimiser with
linear warm-up and cosine decay, an EMA of the parameters kept in the state, Orbax checkpoints
with exact resume, and metrics written by process 0. The engine knows nothing about the model:
a stage hands `train_loop` its initial parameters, a loss function and a batch function.

Step numbering: "step n" is the state after n updates (`state.step == n`). The update that
produces step n + 1 consumes `batch_fn(n, ...)` and the key `fold_in(rng, n)`; checkpoints and
metric records are labelled with n + 1. See docs/engine.md.
"""

import functools
import json
import math
import os
import time
from typing import Any, Callable, Mapping

from absl import logging
from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp

from modit_jax import errors
from modit_jax import stopping

PyTree = Any
Config = Any  # An ml_collections.ConfigDict (or anything with the same attributes).
# `loss_fn(params, batch, rng)`, or `loss_fn(params, batch, rng, frozen)` when the loop is given
# frozen parameters (e.g. the DPO reference).
LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]
BatchFn = Callable[[int, int, int], Mapping[str, np.ndarray]]

DATA_AXIS = "data"
CHECKPOINT_SUBDIR = "checkpoints"
TB_SUBDIR = "tb"
METRICS_FILE = "metrics.jsonl"
# Leaves smaller than this stay replicated under FSDP: sharding biases and norms saves no
# memory worth the extra all-gathers.
DEFAULT_FSDP_MIN_SIZE = 1 << 14
# Folded into the seed so the training key never equals a key a stage used for initialisation.
_TRAIN_RNG_SALT = 0x7472

_OPTIMIZER_FIELDS = ("learning_rate", "warmup_steps", "num_steps", "weight_decay",
                     "grad_clip_norm", "b1", "b2")
_LOOP_FIELDS = ("num_steps", "batch_size", "seed", "log_every", "checkpoint_every",
                "keep_checkpoints", "ema_decay", "fsdp")

_ENV_COORDINATOR = "MODIT_COORDINATOR"
_ENV_NUM_PROCESSES = "MODIT_NUM_PROCESSES"
_ENV_PROCESS_ID = "MODIT_PROCESS_ID"


class NonFiniteLossError(errors.UserError):
  """The loss became NaN or infinite: the run diverged."""


@struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree, so it can be jitted, sharded and saved."""
  step: jax.Array  # int32 scalar: number of updates applied so far.
  params: PyTree
  opt_state: optax.OptState
  ema_params: PyTree


# ----------------------------------------------------------------------------- optimiser


def _require(config: Config, fields: tuple[str, ...]) -> None:
  missing = [f for f in fields if not hasattr(config, f)]
  if missing:
    raise errors.UserError(f"training config is missing field(s): {', '.join(missing)}")


def _validate_optimizer_config(config: Config) -> None:
  _require(config, _OPTIMIZER_FIELDS)
  if config.num_steps <= 0:
    raise errors.UserError(f"config.num_steps must be positive, got {config.num_steps}")
  if not 0 <= config.warmup_steps <= config.num_steps:
    raise errors.UserError(f"config.warmup_steps must be in [0, num_steps={config.num_steps}], "
                           f"got {config.warmup_steps}")
  if config.learning_rate <= 0:
    raise errors.UserError(f"config.learning_rate must be positive, got {config.learning_rate}")
  if config.grad_clip_norm < 0:
    raise errors.UserError("config.grad_clip_norm must be >= 0 (0 disables clipping), "
                           f"got {config.grad_clip_norm}")


def _schedule(config: Config) -> optax.Schedule:
  """Linear warm-up to `learning_rate`, then cosine decay to 0 at `num_steps`.

  The warm-up is `lr * (count + 1) / warmup_steps` rather than optax's (which starts at 0),
  so the first update is not wasted.
  """
  peak = float(config.learning_rate)
  warmup = int(config.warmup_steps)
  decay = max(int(config.num_steps) - warmup, 1)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = peak * (count + 1.0) / max(warmup, 1)
    progress = jnp.clip((count - warmup) / decay, 0.0, 1.0)
    cosine = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < warmup, warm, cosine)

  return schedule


def make_optimizer(config: Config) -> optax.GradientTransformation:
  """AdamW with warm-up + cosine schedule, after clipping gradients by global norm."""
  _validate_optimizer_config(config)
  adamw = optax.adamw(_schedule(config), b1=config.b1, b2=config.b2,
                      weight_decay=config.weight_decay)
  if config.grad_clip_norm == 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)


def learning_rate_at(config: Config, step: int) -> float:
  """The learning rate used by the update that turns state step `step` into `step + 1`."""
  return float(_schedule(config)(step))


def create_train_state(params: PyTree, tx: optax.GradientTransformation) -> TrainState:
  """A step-0 state; its EMA is the initial parameters until the first update replaces them."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params)


# ----------------------------------------------------------------------------- train step


def ema_weight(num_updates: jax.Array | int, decay: float) -> jax.Array:
  """The weight of the newest parameters in the EMA after `num_updates` (>= 1) updates.

  `(1 - decay) / (1 - decay**t)`: Adam's bias correction applied to the parameter average.
  `ema_t = (1 - w_t) * ema_{t-1} + w_t * params_t` then equals the exponentially weighted
  average of params_1..params_t with weights proportional to decay**(t - i), whatever ema_0
  was (w_1 = 1). Without it an EMA started at the initial parameters keeps decay**t of them:
  at decay 0.999, 37 % after 1000 updates, which would leave a from-scratch model's
  zero-initialised output layers at two thirds of their trained size and a fine-tuned model
  a third of the way back to the stage it started from.
  """
  t = jnp.asarray(num_updates, jnp.float32)
  decay = jnp.float32(decay)  # both sides in float32, so that w_1 is exactly 1
  return (1.0 - decay) / (1.0 - decay ** t)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               frozen: PyTree = None, *, loss_fn: LossFn, tx: optax.GradientTransformation,
               ema_decay: float) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update. Pure: the same inputs give the same outputs on any device layout.

  Args:
    state: the current state.
    batch: the global batch (jitted: sharded on its leading axis over "data").
    rng: the run's base key (the same for every step). The step's key is derived here as
      `jax.random.fold_in(rng, state.step)`, so it depends only on the step number: a
      resumed run draws the same randomness as an uninterrupted one.
    loss_fn: `loss_fn(params, batch, step_rng) -> (scalar loss, dict of scalar aux)`. It must
      derive per-example randomness from the global example index, e.g.
      `jax.random.split(step_rng, global_batch)[i]` for example i, never from the device or
      process (no `axis_index`), so results do not depend on how the batch is sharded.
    frozen: parameters the loss reads but never trains (the DPO reference), passed to
      `loss_fn` as its 4th argument when not None. They are not in the state, so the optimiser,
      the EMA and the checkpoints never see them, and no gradient is taken with respect to them.
    tx: the optimiser.
    ema_decay: the EMA's decay, applied after the update with `ema_weight`: the EMA is the
      bias-corrected average of the parameters after updates 1..t, so the starting
      parameters never weigh in; 0 makes the EMA equal the parameters.

  Returns:
    The new state and metrics {"loss", "grad_norm" (before clipping), **aux}.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  extra = () if frozen is None else (frozen,)
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, batch, step_rng, *extra)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  weight = ema_weight(state.step + 1, ema_decay)
  ema_params = jax.tree.map(lambda e, p: (1.0 - weight) * e + weight * p,
                            state.ema_params, params)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema_params)
  return new_state, metrics


# ----------------------------------------------------------------------------- sharding


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh with axis "data" over all devices (or the first `num_devices`, one process).

  Devices are ordered by (process, id), so process p's devices hold the p-th contiguous block
  of the global batch; `batch_fn` must return that block.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if num_devices is not None:
    if num_devices <= 0 or num_devices > len(devices):
      raise errors.UserError(f"cannot build a mesh of {num_devices} devices: "
                             f"{len(devices)} available")
    if num_devices != len(devices) and jax.process_count() > 1:
      raise errors.UserError("with several processes the mesh must span every device")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), (DATA_AXIS,))


# On CPU the data-parallel split over the host's devices pays for small models only. Depth 4,
# 18 tokens, batch 256, 2 cores split into 4 devices, in one bench run each (docs/benchmarks.md,
# "Again in one hour, and wide models on one CPU device"): width 512 (forward 391 MFLOP an example) ran 1.45x faster
# on one device than on four; width 384 (220 MFLOP) was level; widths 256 and below ran
# 1.1-1.8x faster on four.
CPU_ONE_DEVICE_FORWARD_FLOPS = 300e6


def train_mesh(forward_flops_per_example: float, num_devices: int = 0) -> Mesh:
  """The mesh a training run uses: `make_mesh(num_devices)` when `num_devices` > 0.

  With 0 (automatic): every device, except one CPU device for a model whose forward pass costs
  at least `CPU_ONE_DEVICE_FORWARD_FLOPS` an example, in a single-process run of several CPU
  devices. Results depend on the mesh only through float rounding.
  """
  if num_devices < 0:
    raise errors.UserError(f"mesh_devices must be >= 0 (0: automatic), got {num_devices}")
  if num_devices:
    return make_mesh(num_devices)
  devices = jax.devices()
  if (jax.process_count() == 1 and len(devices) > 1 and devices[0].platform == "cpu"
      and forward_flops_per_example >= CPU_ONE_DEVICE_FORWARD_FLOPS):
    logging.info("training on 1 of the %d CPU devices: a forward pass of %.0f MFLOP an example "
                 "runs faster unsplit (engine.CPU_ONE_DEVICE_FORWARD_FLOPS)", len(devices),
                 forward_flops_per_example / 1e6)
    return make_mesh(1)
  return make_mesh()


def _leaf_sharding(shape: tuple[int, ...], mesh: Mesh, fsdp: bool, min_size: int) -> NamedSharding:
  n = mesh.shape[DATA_AXIS]
  if fsdp and n > 1 and math.prod(shape) >= min_size:
    # Largest axis divisible by the mesh; ties go to the later axis (usually the output one).
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % n == 0]
    if candidates:
      _, axis = max(candidates)
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return NamedSharding(mesh, P(*spec))
  return NamedSharding(mesh, P())


def param_sharding(tree: PyTree, mesh: Mesh, fsdp: bool = False,
                   min_size: int = DEFAULT_FSDP_MIN_SIZE) -> PyTree:
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs), by shape only.

  Replicated unless `fsdp`; with `fsdp`, every leaf of at least `min_size` elements is sharded
  over "data" along its largest axis divisible by the mesh size (leaves with no such axis stay
  replicated). Because the rule looks only at shapes, applying it to a whole `TrainState` gives
  the Adam moments and the EMA the same layout as the parameters they mirror.
  """
  return jax.tree.map(lambda x: _leaf_sharding(tuple(x.shape), mesh, fsdp, min_size), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays are split along their leading (example) axis over "data"."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Same value on every device of `mesh`."""
  return NamedSharding(mesh, P())


def local_row_shardings(num_rows: int) -> tuple[jax.sharding.Sharding, jax.sharding.Sharding]:
  """(rows, replicated) shardings that run a jitted row-wise function on every local device.

  For inference whose rows are independent (sampling): arrays with `num_rows` leading rows
  placed with `rows` are split over this process's devices, and everything else placed with
  `replicated` is copied to each, so the devices share the rows. When the rows do not split
  evenly, or there is one device, both are the first local device.
  """
  devices = jax.local_devices()
  if len(devices) > 1 and num_rows % len(devices) == 0:
    mesh = Mesh(np.array(devices), (DATA_AXIS,))
    return NamedSharding(mesh, P(DATA_AXIS)), NamedSharding(mesh, P())
  single = jax.sharding.SingleDeviceSharding(devices[0])
  return single, single


def device_put_global(tree: PyTree, shardings: PyTree) -> PyTree:
  """Places host values, identical on every process, as global arrays with `shardings`.

  Works multi-process, where `jax.device_put` onto devices of other processes is not possible:
  each process fills only its own shards.
  """
  def put(x, sharding):
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def jit_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float,
                   mesh: Mesh, state_sharding: PyTree,
                   frozen_sharding: PyTree = None) -> Callable[..., tuple[TrainState, dict]]:
  """`train_step` jitted as `(state, batch, rng[, frozen]) -> (state, metrics)` over `mesh`.

  The state (argument 0) is donated: do not use it after the call. `rng` and the metrics are
  replicated; batch arrays must be sharded on "data" (see `shard_batch`). With
  `frozen_sharding`, the step takes the frozen parameters as a 4th argument (not donated).
  """
  step_fn = functools.partial(train_step, loss_fn=loss_fn, tx=tx, ema_decay=float(ema_decay))
  in_shardings = (state_sharding, batch_sharding(mesh), replicated(mesh))
  if frozen_sharding is not None:
    in_shardings += (frozen_sharding,)
  return jax.jit(step_fn, in_shardings=in_shardings,
                 out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,))


def shard_batch(batch_np: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles global batch arrays from each process's contiguous slice of the batch.

  Args:
    batch_np: this process's rows of the global batch (all of it with one process).
    mesh: the training mesh; the leading axis must divide evenly over this process's devices.
  """
  local_devices = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
  num_processes = len({d.process_index for d in mesh.devices.flat})
  sharding = batch_sharding(mesh)
  out = {}
  for name, value in batch_np.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % local_devices:
      raise errors.UserError(
          f"batch array {name!r} has shape {value.shape}: its leading axis must be divisible "
          f"by this process's {local_devices} device(s)")
    global_shape = (value.shape[0] * num_processes,) + value.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out


def _abstract(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs (with shardings) for a tree of arrays or ShapeDtypeStructs."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _abstract_with(tree: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs of `tree` carrying `shardings` (a restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# ----------------------------------------------------------------------------- checkpoints


class Checkpointer:
  """Periodic, keep-N Orbax checkpoints of a `TrainState` under `workdir/checkpoints`.

  Saves are asynchronous (arrays are copied to host before `save` returns, so donating the
  state afterwards is safe); call `wait` or `close` before reading what was written. Every
  process must call `save` and `restore`.
  """

  def __init__(self, workdir: str, save_interval_steps: int = 1, max_to_keep: int | None = None):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_interval_steps,
                                           max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints kept on disk, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: TrainState, force: bool = False) -> bool:
    """Saves `state` as `step` if the save interval says so (or `force`); True if saved."""
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, step: int | None, target_state: PyTree) -> TrainState:
    """Restores `step` (None: the latest) with the structure, dtypes and shardings of
    `target_state` (arrays or ShapeDtypeStructs carrying shardings)."""
    if step is None:
      step = self.latest_step()
      if step is None:
        raise errors.UserError(f"no checkpoint in {self.directory}")
    return self._manager.restore(step, args=ocp.args.StandardRestore(_abstract(target_state)))

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()


def restore_params(checkpoint_dir: str, step: int | None = None, *,
                   use_ema: bool = True) -> PyTree:
  """Parameters from another run's checkpoint, as host numpy arrays: how a stage starts
  from an earlier one.

  Args:
    checkpoint_dir: a `Checkpointer` directory, or a workdir containing `checkpoints/`.
    step: which checkpoint; None takes the latest.
    use_ema: the EMA parameters (usually the better ones to build on) or the raw ones.
  """
  nested = os.path.join(checkpoint_dir, CHECKPOINT_SUBDIR)
  if os.path.isdir(nested):
    checkpoint_dir = nested
  if not os.path.isdir(checkpoint_dir):
    raise errors.UserError(f"checkpoint directory {checkpoint_dir} does not exist")
  manager = ocp.CheckpointManager(
      os.path.abspath(checkpoint_dir), item_handlers=ocp.PyTreeCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    if step is None:
      step = manager.latest_step()
      if step is None:
        raise errors.UserError(f"no checkpoint in {checkpoint_dir}")
    elif step not in manager.all_steps():
      raise errors.UserError(f"no checkpoint for step {step} in {checkpoint_dir}; "
                             f"available: {sorted(manager.all_steps())}")
    metadata = manager.item_metadata(step)
    tree = getattr(metadata, "tree", metadata)
    key = "ema_params" if use_ema else "params"
    # Restore only the wanted subtree, as numpy: the caller places it on its own mesh.
    item = {key: tree[key]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    return restored[key]
  finally:
    manager.close()


# ----------------------------------------------------------------------------- metrics


class MetricWriter:
  """Scalars to TensorBoard (`workdir/tb`) and JSON lines (`workdir/metrics.jsonl`).

  Only process 0 writes; on other processes every method is a no-op. The JSON file is
  appended to, so a resumed run may repeat steps between its last checkpoint and the kill;
  readers should keep the last record of a step.
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      # Imported here so processes that never write do not need tensorboardX.
      import tensorboardX  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._tb = tensorboardX.SummaryWriter(logdir=os.path.join(workdir, TB_SUBDIR))
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes one record: {"step": step, **scalars}."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    # Flushed per record so a killed run keeps everything it logged.
    self._jsonl.flush()

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      self.enabled = False


# ----------------------------------------------------------------------------- loop


def _validate_loop_config(config: Config, mesh: Mesh) -> None:
  _require(config, _LOOP_FIELDS)
  for field in ("batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    if getattr(config, field) <= 0:
      raise errors.UserError(f"config.{field} must be positive, got {getattr(config, field)}")
  if not 0.0 <= config.ema_decay < 1.0:
    raise errors.UserError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
  if config.batch_size % mesh.size:
    hint = (" (on CPU, --cpu_devices sets how many)"
            if mesh.devices.flat[0].platform == "cpu" else "")
    raise errors.UserError(f"config.batch_size={config.batch_size} must be divisible by the "
                           f"number of devices ({mesh.size}){hint}")


def _host_metrics(step: int, metrics: Mapping[str, jax.Array], config: Config,
                  last_saved: int | None) -> dict[str, float]:
  """Fetches metrics to the host and stops the run if the loss is not finite."""
  values = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
  loss = values["loss"]
  if not math.isfinite(loss):
    saved = (f"the last checkpoint is step {last_saved}" if last_saved is not None
             else "no checkpoint was saved")
    raise NonFiniteLossError(
        f"loss is {loss} at step {step} (the update on batch_fn(step={step - 1})): training "
        f"diverged. Lower config.learning_rate (now {config.learning_rate}), lengthen "
        f"config.warmup_steps or lower config.grad_clip_norm; {saved}.")
  return values


def host_copy(tree: PyTree) -> PyTree:
  """Numpy copies of global arrays on every process (all-gathered when sharded over hosts)."""
  leaves = jax.tree.leaves(tree)
  if all(x.is_fully_addressable or x.is_fully_replicated for x in leaves):
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if x.is_fully_replicated
                        else np.asarray(x), tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def validate_config(config: Config, mesh: Mesh | None = None) -> None:
  """Raises `UserError` for a config `train_loop` would refuse; call it before any work."""
  _validate_optimizer_config(config)
  _validate_loop_config(config, make_mesh() if mesh is None else mesh)


def train_loop(config: Config, workdir: str, *, init_params: PyTree, loss_fn: LossFn,
               batch_fn: BatchFn, mesh: Mesh | None = None, frozen_params: PyTree = None,
               before_step: Callable[[int, TrainState], Mapping[str, float] | None] | None = None,
               resume_every: int = 1) -> TrainState:
  """Trains `config.num_steps` updates, resuming from the latest checkpoint in `workdir`.

  Args:
    config: `num_steps, batch_size` (global), `seed, log_every, checkpoint_every,
      keep_checkpoints, ema_decay, fsdp` and the `make_optimizer` fields.
    workdir: holds `checkpoints/`, `tb/` and `metrics.jsonl`.
    init_params: the step-0 parameters, identical on every process (ignored when resuming).
    loss_fn: see `train_step`.
    batch_fn: `batch_fn(step, process_index, process_count)` -> this process's contiguous
      `batch_size // process_count` rows of the global batch for update `step` (0-based). It
      must depend only on its arguments: that is what makes a resumed run exact.
    mesh: defaults to `make_mesh()` (every device).
    frozen_params: parameters passed to every step as `loss_fn`'s 4th argument, placed like
      the parameters (replicated, or FSDP-sharded) and never updated, saved or averaged.
    before_step: `before_step(step, state)`, called on every process before `batch_fn(step,
      ...)` with the state about to be updated (step `step`); it may prepare data that
      `batch_fn` reads (HPPO rebuilds its candidate pool from the current policy). Scalars it
      returns are written to the metrics at `step`. For exact resume it must depend only on
      `step` and the state at `step`.
    resume_every: a run resumes exactly only from a checkpoint at a multiple of this many
      steps (HPPO: its pool period). `checkpoint_every` must be such a multiple; a stop on a
      signal saves only at one.

  Returns:
    The final state (step `num_steps`), also saved as the last checkpoint.

  Raises:
    stopping.TrainingStopped: SIGTERM or Ctrl-C arrived (single process), or JAX's preemption
      service reached its sync point (several processes). The loop finishes the update in
      flight, saves it (see `resume_every`) and stops.
  """
  mesh = make_mesh() if mesh is None else mesh
  tx = make_optimizer(config)
  _validate_loop_config(config, mesh)
  num_steps = int(config.num_steps)

  init_state = functools.partial(create_train_state, tx=tx)
  abstract_state = jax.eval_shape(init_state, init_params)
  shardings = param_sharding(abstract_state, mesh, fsdp=bool(config.fsdp))
  checkpointer = Checkpointer(workdir, save_interval_steps=config.checkpoint_every,
                              max_to_keep=config.keep_checkpoints)
  writer = MetricWriter(workdir)
  try:
    last_saved = checkpointer.latest_step()
    if last_saved is None:
      # Built on the host (one compiled call rather than one per optimiser leaf), then placed.
      state = device_put_global(jax.device_get(jax.jit(init_state)(init_params)), shardings)
    else:
      logging.info("Resuming from the checkpoint at step %d in %s", last_saved,
                   checkpointer.directory)
      state = checkpointer.restore(last_saved, _abstract_with(abstract_state, shardings))
    start = last_saved or 0
    if start >= num_steps:
      logging.info("Checkpoint step %d >= num_steps=%d: nothing to train", start, num_steps)
      return state

    frozen = ()
    frozen_sharding = None
    if frozen_params is not None:
      frozen_sharding = param_sharding(frozen_params, mesh, fsdp=bool(config.fsdp))
      frozen = (device_put_global(frozen_params, frozen_sharding),)
    step_fn = jit_train_step(loss_fn, tx, config.ema_decay, mesh, shardings, frozen_sharding)
    base_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), _TRAIN_RNG_SALT)
    rng = device_put_global(base_rng, replicated(mesh))
    process_index, process_count = jax.process_index(), jax.process_count()
    logging.info("training steps %d-%d on %d %s device(s), %d process(es); %d examples per "
                 "device", start + 1, num_steps, mesh.size, mesh.devices.flat[0].platform,
                 process_count, config.batch_size // mesh.size)

    pending = None  # (step, device metrics) not yet checked for a finite loss.
    interval_start, interval_steps = time.perf_counter(), 0
    # SIGTERM / Ctrl-C from here on: stop after the update in flight (module stopping).
    with stopping.StopRequests() as stops:
      for step in range(start, num_steps):
        if before_step is not None:
          prepared = before_step(step, state)
          if prepared:
            writer.write(step, prepared)
        batch = shard_batch(batch_fn(step, process_index, process_count), mesh)
        state, metrics = step_fn(state, batch, rng, *frozen)
        done = step + 1
        interval_steps += 1
        # The previous step's metrics are checked only now, after this step is dispatched, so
        # fetching them does not leave the devices idle.
        if pending is not None:
          _host_metrics(*pending, config, last_saved)
        pending = (done, metrics)
        log_now = done % config.log_every == 0 or done == num_steps
        save_now = done % config.checkpoint_every == 0 or done == num_steps
        # Asked on every step (a sync point with several processes); the last step just ends.
        stop_now = stops.requested(done) and done < num_steps
        if not (log_now or save_now or stop_now):
          continue
        # Never log or save a diverged state: check this step before either.
        values = _host_metrics(*pending, config, last_saved)
        pending = None
        if log_now:
          elapsed = max(time.perf_counter() - interval_start, 1e-9)
          steps_per_sec = interval_steps / elapsed
          values.update(lr=learning_rate_at(config, step), steps_per_sec=steps_per_sec,
                        examples_per_sec=steps_per_sec * config.batch_size)
          writer.write(done, values)
          logging.info("step %d/%d: loss %.5g, grad_norm %.3g, lr %.3g, %.2f steps/s, "
                       "%.1f examples/s", done, num_steps, values["loss"], values["grad_norm"],
                       values["lr"], steps_per_sec, values["examples_per_sec"])
          interval_start, interval_steps = time.perf_counter(), 0
        if save_now and checkpointer.save(done, state, force=done == num_steps):
          last_saved = done
        if stop_now:
          if last_saved != done and done % resume_every == 0:
            checkpointer.save(done, state, force=True)
            last_saved = done
          checkpointer.wait()
          raise stopping.TrainingStopped(stops.reason, stops.signal_number, done, num_steps,
                                         last_saved, checkpointer.directory, resume_every)
    checkpointer.wait()
    return state
  finally:
    writer.close()
    checkpointer.close()


# ----------------------------------------------------------------------------- multi-host


# On CPU, the host is split into this many JAX devices and every train step is data-parallel
# over them. Four devices ran the default stage-1 step 1.4-1.8x faster than one, on one core
# and on two (docs/benchmarks.md); most likely one device leaves the CPU idle between its
# small ops, and the other devices' programs fill those gaps.
DEFAULT_CPU_DEVICES = 4
_FORCE_DEVICES_XLA_FLAG = "xla_force_host_platform_device_count"
# XLA:CPU's memory-optimised scheduler ran the default width-64 train step 7-14 % faster than
# the default scheduler in alternating processes, and 100 stage-1 updates gave bit-identical
# parameters (a scheduler orders the same ops); at width 256 it is level (docs/benchmarks.md).
CPU_SCHEDULER_XLA_FLAG = "xla_cpu_scheduler_type"
CPU_SCHEDULER = "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def configure_cpu_devices(count: int | None = None) -> None:
  """Sets how many JAX devices the CPU backend has; call before anything uses JAX devices.

  Only the CPU backend is affected: on GPU or TPU, meshes span the accelerators. With
  `count=None` a count the environment already chose (`--xla_force_host_platform_device_count`
  in XLA_FLAGS, or JAX_NUM_CPU_DEVICES) is kept, and otherwise `DEFAULT_CPU_DEVICES` is used.
  Training results depend on the device count only through float rounding (the gradient is a
  mean over devices), but an exact resume needs the same count as the interrupted run.
  Also selects XLA:CPU's `CPU_SCHEDULER` unless XLA_FLAGS already names a scheduler.
  """
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if CPU_SCHEDULER_XLA_FLAG not in xla_flags:
    os.environ["XLA_FLAGS"] = f"{xla_flags} --{CPU_SCHEDULER_XLA_FLAG}={CPU_SCHEDULER}".strip()
  if count is None:
    if _FORCE_DEVICES_XLA_FLAG in xla_flags or os.environ.get("JAX_NUM_CPU_DEVICES"):
      return
    count = DEFAULT_CPU_DEVICES
  if count < 1:
    raise errors.UserError(f"--cpu_devices must be at least 1, got {count}")
  jax.config.update("jax_num_cpu_devices", count)


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` when asked to; returns whether it did.

  Asked means `coordinator_address` is given, or env MODIT_COORDINATOR is set (with
  MODIT_NUM_PROCESSES and MODIT_PROCESS_ID). The address "auto" lets JAX detect the cluster
  (TPU pod slices, Slurm, ...). Must run before anything else touches JAX devices.
  """
  if coordinator_address is None:
    coordinator_address = os.environ.get(_ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(_ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(_ENV_PROCESS_ID)
  if coordinator_address is None:
    return False
  if jax.distributed.is_initialized():
    return True
  # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib. (It is
  # already the default in jax 0.10; older versions defaulted to none.)
  if not jax.config.values.get("jax_cpu_collectives_implementation"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address == "auto":
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  logging.info("JAX distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise errors.UserError(f"environment variable {name}={value!r} is not an integer") from None
